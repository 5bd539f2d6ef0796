#!/usr/bin/env bash
# Session 11, call 3: the tagged exchange with one poll loop (no load before it) and the loads after it:
# determinism of the bias cases on both trees, the fused self-tests, and the split cells' µs per step.
set -u
export PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
CASES="Mamba bilinear bias k3|RG-LRU k2 bias|Mamba B=1"
(cd .before && PYTHONPATH=$PWD timeout 120 python ../.gpu/diag.py "$CASES" 2 $R/diag_before.json > $R/diag_before.txt 2>&1); echo "== diag before"; grep -v Warning $R/diag_before.txt | tail -4
export PYTHONPATH=$PWD
timeout 120 python .gpu/diag.py "$CASES" 3 $R/diag_after.json > $R/diag_after.txt 2>&1; echo "== diag after"; grep -v Warning $R/diag_after.txt | tail -4
timeout 200 python -m pallas_kernels.gpu_fused_selftest --out $R/selftest_after.json > $R/selftest_after.txt 2>&1
tail -2 $R/selftest_after.txt; grep -c PASS $R/selftest_after.txt; grep "FAIL\|ERROR\|rror" $R/selftest_after.txt | head -30
timeout 150 python -m benchmarks.benchmark_fused_generation --models Mamba,RGLRU,S4 --batches 1 8 32 --no-loop --no-xla --repeats 10 --warmup 2 --no-plot --out $R/rows_after.json > $R/rows_after.txt 2>&1
echo "== rows after"; grep "^| " $R/rows_after.txt | head -20; tail -3 $R/rows_after.txt
timeout 100 python -m benchmarks.benchmark_fused_generation --models Mamba,RGLRU --batches 64 256 --no-loop --no-xla --repeats 10 --warmup 2 --no-plot --out $R/blocks_after.json > $R/blocks_after.txt 2>&1
echo "== blocks after"; grep "^| " $R/blocks_after.txt | head -20
cd $OUT && tar czf results.tgz r
