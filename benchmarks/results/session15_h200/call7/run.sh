#!/bin/bash
# Session 15, call 7: S5 LTI's factored input (c10c4ed: B_bar = gamma B, one real contraction) against the tree before
# it (.before = 9c89f09), alternating fresh processes; the S5 self-test on the new tree; its row of issue 15's table.
export PYTHONPATH=$PWD
R=$OUT/r; mkdir -p $R
FA="--models S5,S5-event --batches 1 32 --no-loop --no-xla --repeats 10 --warmup 2"
for rep in 1 2; do
  (cd .before && timeout 70 env PYTHONPATH=$PWD:$OLDPWD python -m benchmarks.benchmark_fused_generation $FA --out $R/s5_before_rep$rep.json > $R/s5_before_rep$rep.txt 2>&1)
  timeout 70 python -m benchmarks.benchmark_fused_generation $FA --out $R/s5_after_rep$rep.json > $R/s5_after_rep$rep.txt 2>&1
done
timeout 90 python -m pallas_kernels.gpu_fused_selftest --only S5 > $R/selftest_s5.txt 2>&1
timeout 60 python -m benchmarks.benchmark_capture --models S5 --batches 32 1 --steps 512 --repeats 30 --no-cache-runs --out $R/table_s5.json > $R/table_s5.txt 2>&1
rm -f $R/*.png
cd $OUT && tar czf results.tgz r && rm -rf r
