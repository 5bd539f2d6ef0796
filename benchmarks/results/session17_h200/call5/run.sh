#!/bin/bash
# Session 17, call 5 (the tree at 0cfde8f plus .gpu/readout_one_reduction.patch: the diagonal cells' readout Re(C h)
# summed in one reduction over both planes; .before = 0cfde8f): the diagonal models' fused rollouts, alternating
# fresh processes; one self-test case.
export PYTHONPATH=$PWD
R=$OUT/r; mkdir -p $R
FA="--models LRU,S5,ltv.S5,CentaurusNeck --batches 1 32 --no-loop --no-xla --repeats 10 --warmup 2 --no-plot"
for rep in 1 2; do
  (cd .before && timeout 45 env PYTHONPATH=$PWD:$OLDPWD python -m benchmarks.benchmark_fused_generation $FA --out $R/before_rep$rep.json > $R/before_rep$rep.txt 2>&1)
  timeout 45 python -m benchmarks.benchmark_fused_generation $FA --out $R/after_rep$rep.json > $R/after_rep$rep.txt 2>&1
done
timeout 30 python -m pallas_kernels.gpu_fused_selftest --only "LRU B=1" > $R/selftest_lru_b1.txt 2>&1; echo "rc=$?" >> $R/selftest_lru_b1.txt
cd $OUT && tar czf results.tgz r && rm -rf r
