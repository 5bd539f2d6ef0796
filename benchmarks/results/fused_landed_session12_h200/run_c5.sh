#!/usr/bin/env bash
# Session 12, call 5: the landed tree (d6dbe5f): every fused self-test case; simplified_state_update's kernels
# (blocks of 4 by multiply-adds, 16 by dots, rows) against its reference; then every model at B=1 and 32, fused and
# XLA, as issue 15 measures (auto).
set -u
export PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
START=$(date +%s)
left() { echo $(( 430 - ($(date +%s) - START) )); }
PYTHONPATH=$PWD timeout 170 python -m pallas_kernels.gpu_fused_selftest --out $R/selftest_all.json > $R/selftest_all.txt 2>&1
echo "== selftest rc=$? t=$(( $(date +%s) - START ))"; grep -v Warning $R/selftest_all.txt | grep -E "FAIL|ALL|Error|error" | head -20
PYTHONPATH=$PWD timeout 90 python -m pytest -q -p no:cacheprovider tests/test_pallas_simplified.py -k "matches_reference" > $R/pytest_simplified.txt 2>&1
echo "== simplified rc=$? t=$(( $(date +%s) - START ))"; tail -3 $R/pytest_simplified.txt
PYTHONPATH=$PWD timeout $(( $(left) - 5 )) python -m benchmarks.benchmark_fused_generation --batches 32 1 --no-loop --repeats 10 --warmup 2 --no-plot --out $R/all_models_b1_32.json > $R/all_models_b1_32.txt 2>&1
echo "== all models t=$(( $(date +%s) - START ))"; tr '\r' '\n' < $R/all_models_b1_32.txt | grep "^| " | cut -d'|' -f2-8
cd $OUT && tar czf results.tgz r
