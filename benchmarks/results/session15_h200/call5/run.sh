#!/bin/bash
# Session 15, call 5 (the tree at c048599): A/B of reading a split row's partials in one load from 4 programs on
# (.variant: ONE_LOAD_MIN_PARTS = 4; the tree: 16), now that the barrier spins on loads; alternating fresh processes.
export PYTHONPATH=$PWD
R=$OUT/r; mkdir -p $R
FA="--models Mamba,RGLRU,S4 --batches 1 8 32 --no-loop --no-xla --repeats 10 --warmup 2"
for rep in 1 2; do
  timeout 80 python -m benchmarks.benchmark_fused_generation $FA --out $R/oneload16_rep$rep.json > $R/oneload16_rep$rep.txt 2>&1
  (cd .variant && timeout 80 env PYTHONPATH=$PWD:$OLDPWD python -m benchmarks.benchmark_fused_generation $FA --out $R/oneload4_rep$rep.json > $R/oneload4_rep$rep.txt 2>&1)
done
rm -f $R/*.png
cd $OUT && tar czf results.tgz r && rm -rf r
