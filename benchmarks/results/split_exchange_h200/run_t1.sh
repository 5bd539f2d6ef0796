#!/usr/bin/env bash
# Session 11, call 1: the tagged exchange (no atomic barrier) against the counter barrier (.before = HEAD):
# the fused self-tests on the new tree, then the split cells' µs per step, alternating before / after.
set -u
export PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/gpu.txt
PYTHONPATH=$PWD timeout 240 python -m pallas_kernels.gpu_fused_selftest --out $R/selftest_after.json > $R/selftest_after.txt 2>&1
tail -2 $R/selftest_after.txt; grep -c PASS $R/selftest_after.txt; grep "FAIL\|Error\|error" $R/selftest_after.txt | head
for i in 1 2; do
  for tree in before after; do
    if [ $tree = before ]; then P=$PWD/.before; else P=$PWD; fi
    (cd $P && PYTHONPATH=$P timeout 150 python -m benchmarks.benchmark_fused_generation --models Mamba,RGLRU,S4 --batches 1 8 32 --no-loop --no-xla --repeats 10 --warmup 2 --no-plot --out $R/rows_${tree}_$i.json > $R/rows_${tree}_$i.txt 2>&1)
    echo "== rows $tree $i"; grep "^| " $R/rows_${tree}_$i.txt | head -20
    (cd $P && PYTHONPATH=$P timeout 100 python -m benchmarks.benchmark_fused_generation --models Mamba,RGLRU --batches 64 256 --no-loop --no-xla --repeats 10 --warmup 2 --no-plot --out $R/blocks_${tree}_$i.json > $R/blocks_${tree}_$i.txt 2>&1)
    echo "== blocks $tree $i"; grep "^| " $R/blocks_${tree}_$i.txt | head -20
  done
done
cd $OUT && tar czf results.tgz r
