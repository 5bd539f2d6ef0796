#!/bin/bash
# Session 14, call 9: the changed generation path on the GPU: the fused self-test (quick cases, the fallbacks, and
# generate through the fused program over several chunks with a partial last one, against the XLA program), then
# tests/test_generation.py on the GPU (the accelerator's slicing program and finiteness flags).
export PYTHONPATH=$PWD
mkdir -p $OUT/r
timeout 170 python -m pallas_kernels.gpu_fused_selftest --quick --out $OUT/r/selftest_quick.json > $OUT/r/selftest_quick.txt 2>&1
echo "selftest rc=$?"; grep -E "PASS|FAIL|fused_program" $OUT/r/selftest_quick.txt | tail -15
timeout 120 python -m pytest -q -x -p no:cacheprovider tests/test_generation.py > $OUT/r/pytest_generation_gpu.txt 2>&1
echo "pytest rc=$?"; tail -5 $OUT/r/pytest_generation_gpu.txt
