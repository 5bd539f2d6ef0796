#!/bin/bash
# Session 16, call 6 (the tree at c04a9d7 + BENCHMARKS commits): fewer warps for the split rollouts at small batches
# (Mamba over 16 programs at B=1, S4 and RG-LRU over 8), and S5 LTV's one-program warps at B=1; two runs each.
export PYTHONPATH=$PWD
R=$OUT/r; mkdir -p $R
for rep in 1 2; do
  timeout 120 python -m benchmarks.benchmark_fused_generation --models Mamba,S4,RGLRU --batches 1 8 --no-loop --no-xla --num-warps 0 1 2 --repeats 10 --warmup 2 --out $R/split_warps_rep$rep.json > $R/split_warps_rep$rep.txt 2>&1
  timeout 60 python -m benchmarks.benchmark_fused_generation --models ltv.S5 --batches 1 32 --no-loop --no-xla --num-warps 0 8 --repeats 10 --warmup 2 --out $R/s5ltv_warps_rep$rep.json > $R/s5ltv_warps_rep$rep.txt 2>&1
done
rm -f $R/*.png
cd $OUT && tar czf results.tgz r && rm -rf r
