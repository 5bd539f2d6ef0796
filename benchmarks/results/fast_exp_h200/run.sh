#!/usr/bin/env bash
# Session 10, call 4: the scan kernels' exponentials by fast_exp (exp2) against the tree before (.before), alternating.
set -u
export PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
ROOT=$PWD
XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$ROOT timeout 150 python -m pytest -q -p no:cacheprovider -n 4 tests/test_selective_scan_kernels.py tests/test_pallas_kernel_math.py > $R/pytest_after.txt 2>&1
tail -2 $R/pytest_after.txt
prof() { (cd $1 && PYTHONPATH=$PWD timeout 80 python -m benchmarks.profile_training --models Mamba --path kernels --top 10 --repeats 20 --out $R/profile_$2.json > $R/profile_$2.txt 2>&1); grep "^## \|selective_scan" $R/profile_$2.txt; }
train() { (cd $1 && PYTHONPATH=$PWD timeout 70 python -m benchmarks.benchmark_training --models Mamba --paths kernels --sweeps seq --seq-lengths 2048 --repeats 30 --out $R/train_$2/training.json > $R/train_$2.txt 2>&1); grep "^| Mamba" $R/train_$2.txt; }
prof $ROOT/.before before1; prof $ROOT after1; prof $ROOT/.before before2; prof $ROOT after2
train $ROOT/.before before1; train $ROOT after1; train $ROOT/.before before2; train $ROOT after2
PYTHONPATH=$ROOT timeout 40 python -m benchmarks.benchmark_scan_tiling --configs fwd:256:2:4:8 bwd:128:1:4 --repeats 20 --out $R/tiling_after.json > $R/tiling_after.txt 2>&1; tail -3 $R/tiling_after.txt
cd $OUT && tar czf results.tgz r
