#!/bin/bash
# Session 13, call 1: the exchange benchmark (Mosaic GPU cluster vs Triton), then unrun self-test cases.
export PYTHONPATH=$PWD
mkdir -p $OUT/r
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/r/gpu.txt 2>&1
( time timeout 200 python -m benchmarks.benchmark_split_exchange --backends mosaic --out $OUT/r/split_exchange_mosaic.json ) > $OUT/r/mosaic.log 2>&1
tail -40 $OUT/r/mosaic.log
( time timeout 170 python -m benchmarks.benchmark_split_exchange --backends triton --out $OUT/r/split_exchange_triton.json ) > $OUT/r/triton.log 2>&1
tail -40 $OUT/r/triton.log
for c in "S4 legt" "S7" "LRU B=1" "LRU H=100" "Mamba H=72"; do
  timeout 60 python -m pallas_kernels.gpu_fused_selftest --only "$c" >> $OUT/r/selftest.log 2>&1
done
tail -30 $OUT/r/selftest.log
cd $OUT && tar czf results.tgz r
