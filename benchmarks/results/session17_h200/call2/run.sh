#!/bin/bash
# Session 17, call 2 (the tree at 237b902 plus .gpu/direct_readout.patch; .before = 237b902): the diagonal and S4
# cells reading their output from the decayed previous state and the input's whole direct path, against the tree
# without, alternating fresh processes; the fused self-test on the patched tree.
export PYTHONPATH=$PWD
R=$OUT/r; mkdir -p $R
FA="--models LRU,S5,S5-event,ltv.S5,ltv.S5-event,CentaurusNeck,S4D,S4 --batches 32 1 --no-loop --no-xla --repeats 10 --warmup 2 --no-plot"
for rep in 1 2; do
  (cd .before && timeout 100 env PYTHONPATH=$PWD:$OLDPWD python -m benchmarks.benchmark_fused_generation $FA --out $R/before_rep$rep.json > $R/before_rep$rep.txt 2>&1)
  timeout 100 python -m benchmarks.benchmark_fused_generation $FA --out $R/after_rep$rep.json > $R/after_rep$rep.txt 2>&1
done
XA="--models LRU,S5 --batches 4096 --no-loop --repeats 5 --warmup 2 --no-plot"
(cd .before && timeout 80 env PYTHONPATH=$PWD:$OLDPWD python -m benchmarks.benchmark_fused_generation $XA --out $R/big_before.json > $R/big_before.txt 2>&1)
timeout 80 python -m benchmarks.benchmark_fused_generation $XA --out $R/big_after.json > $R/big_after.txt 2>&1
timeout 220 python -m pallas_kernels.gpu_fused_selftest > $R/selftest.txt 2>&1; echo "rc=$?" >> $R/selftest.txt
cd $OUT && tar czf results.tgz r && rm -rf r
