#!/bin/bash
# Session 15, call 8: the final tree's fused paths on the H200 (gpu_fused_selftest --quick).
export PYTHONPATH=$PWD
mkdir -p $OUT/r
timeout 200 python -m pallas_kernels.gpu_fused_selftest --quick > $OUT/r/selftest_quick.txt 2>&1
echo "rc=$?" >> $OUT/r/selftest_quick.txt
