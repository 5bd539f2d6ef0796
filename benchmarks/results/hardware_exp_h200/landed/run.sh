#!/usr/bin/env bash
# Session 10, call 8: the landed tree (kernel_exp = ex2.approx.ftz): the kernel tests on the GPU, Mamba's step
# profiled, and one synchronous call per step (as lrnnx measures) twice.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
R=$OUT/r; mkdir -p $R
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 100 python -m pytest -q -p no:cacheprovider -n 4 tests/test_selective_scan_kernels.py tests/test_pallas_kernel_math.py > $R/pytest_landed.txt 2>&1; tail -1 $R/pytest_landed.txt
timeout 70 python -m benchmarks.profile_training --models Mamba --path kernels --top 12 --repeats 20 --out $R/profile_landed.json > $R/profile_landed.txt 2>&1
grep "^## \|selective_scan" $R/profile_landed.txt
for i in 1 2; do
  timeout 60 python -m benchmarks.benchmark_training --models Mamba --paths kernels --sweeps seq --seq-lengths 2048 --repeats 30 --out $R/train_landed$i/training.json > $R/train_landed$i.txt 2>&1
  grep "^| Mamba" $R/train_landed$i.txt; grep -i "gradient check" $R/train_landed$i.txt
done
cd $OUT && tar czf results.tgz r
