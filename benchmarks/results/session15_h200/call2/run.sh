#!/bin/bash
# Session 15, call 2 (call 1's A/B results exceeded the file count and did not come back): A/B of the split barrier's
# spin (HEAD: atomic adds of 0; .variant: volatile loads of the counter), alternating fresh processes, S4 (tagged
# exchange, unchanged code) as the control; then the XLA program's batch-major in-place write (414666c) against
# 3e12994 (.before) at B=4096 (S5 takes the XLA program there).
export PYTHONPATH=$PWD
R=$OUT/r; mkdir -p $R
(cd .variant && env PYTHONPATH=$PWD:$OLDPWD python -c "import pallas_kernels.fused_generation as f; print(f.__file__)") > $R/variant_path.txt 2>&1
FG="--models Mamba,RGLRU,S4 --batches 1 8 32 --no-loop --no-xla --repeats 10 --warmup 2"
for rep in 1 2; do
  timeout 100 python -m benchmarks.benchmark_fused_generation $FG --out $R/spin_atomic_rep$rep.json > $R/spin_atomic_rep$rep.txt 2>&1
  (cd .variant && timeout 100 env PYTHONPATH=$PWD:$OLDPWD python -m benchmarks.benchmark_fused_generation $FG --out $R/spin_load_rep$rep.json > $R/spin_load_rep$rep.txt 2>&1)
done
XG="--models S5 --batches 4096 --no-loop --repeats 5 --warmup 2"
for rep in 1 2; do
  (cd .before && timeout 60 env PYTHONPATH=$PWD:$OLDPWD python -m benchmarks.benchmark_fused_generation $XG --out $R/xla_write_before_rep$rep.json > $R/xla_write_before_rep$rep.txt 2>&1)
  timeout 60 python -m benchmarks.benchmark_fused_generation $XG --out $R/xla_write_after_rep$rep.json > $R/xla_write_after_rep$rep.txt 2>&1
done
rm -f $R/*.png
cd $OUT && tar czf results.tgz r && rm -rf r
