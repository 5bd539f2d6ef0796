timeout 250 python -m pallas_kernels.gpu_fused_selftest --quick > $OUT/r/selftest_quick.txt 2>&1
