#!/bin/bash
# Session 16, call 8 (the tree at HEAD: RG-LRU's split_row_warps ((4, 4), (8, 2))): RG-LRU's self-test and its fused
# rollout under "auto" at B = 1, 8, 16, 32.
export PYTHONPATH=$PWD
R=$OUT/r; mkdir -p $R
timeout 100 python -m pallas_kernels.gpu_fused_selftest --only RG-LRU > $R/selftest_rglru.txt 2>&1; echo "rc=$?" >> $R/selftest_rglru.txt
timeout 80 python -m benchmarks.benchmark_fused_generation --models RGLRU --batches 1 8 16 32 --no-loop --no-xla --repeats 10 --warmup 2 --out $R/rglru_auto.json > $R/rglru_auto.txt 2>&1
rm -f $R/*.png
cd $OUT && tar czf results.tgz r && rm -rf r
