#!/usr/bin/env bash
# Session 11, call 2: the tagged exchange, the words used only as loaded in the loop that checked them:
# the fused self-tests, then the split cells' µs per step (the counter barrier's were measured in call 1).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
R=$OUT/r; mkdir -p $R
T0=$(date +%s)
timeout 240 python -m pallas_kernels.gpu_fused_selftest --out $R/selftest_after.json > $R/selftest_after.txt 2>&1
tail -2 $R/selftest_after.txt; grep -c PASS $R/selftest_after.txt; grep "FAIL\|Error\|error" $R/selftest_after.txt | head -30
echo "selftest s: $(( $(date +%s) - T0 ))"
for i in 1 2; do
  timeout 150 python -m benchmarks.benchmark_fused_generation --models Mamba,RGLRU,S4 --batches 1 8 32 --no-loop --no-xla --repeats 10 --warmup 2 --no-plot --out $R/rows_after_$i.json > $R/rows_after_$i.txt 2>&1
  echo "== rows after $i"; grep "^| " $R/rows_after_$i.txt | head -20
done
timeout 100 python -m benchmarks.benchmark_fused_generation --models Mamba,RGLRU --batches 64 256 --no-loop --no-xla --repeats 10 --warmup 2 --no-plot --out $R/blocks_after.json > $R/blocks_after.txt 2>&1
echo "== blocks after"; grep "^| " $R/blocks_after.txt | head -20
cd $OUT && tar czf results.tgz r
