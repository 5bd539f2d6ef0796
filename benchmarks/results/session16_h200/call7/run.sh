#!/bin/bash
# Session 16, call 7 (the tree at c04a9d7): RG-LRU's split rows on 2 warps against 4 (its split_row_warps) at
# B = 1, 8, 16, 32, two runs.
export PYTHONPATH=$PWD
R=$OUT/r; mkdir -p $R
for rep in 1 2; do
  timeout 100 python -m benchmarks.benchmark_fused_generation --models RGLRU --batches 1 8 16 32 --no-loop --no-xla --num-warps 4 2 --repeats 10 --warmup 2 --out $R/rglru_warps_rep$rep.json > $R/rglru_warps_rep$rep.txt 2>&1
done
rm -f $R/*.png
cd $OUT && tar czf results.tgz r && rm -rf r
