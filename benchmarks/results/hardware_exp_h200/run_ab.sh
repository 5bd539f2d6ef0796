#!/usr/bin/env bash
# Session 10, call 7: the scan kernels' exponentials on ex2.approx.ftz (inline asm; .fastexp, HW_EXP 2: both kernels,
# 1: the forward only) against the tree before (.before), alternating; the kernel tests on the GPU first.
set -u
export PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
ROOT=$PWD
(cd .fastexp && cp -r $ROOT/tests . && XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD timeout 120 python -m pytest -q -p no:cacheprovider -n 4 tests/test_selective_scan_kernels.py > $R/pytest_hwexp.txt 2>&1); tail -2 $R/pytest_hwexp.txt
prof() { (cd $1 && PYTHONPATH=$PWD timeout 80 python -m benchmarks.profile_training --models Mamba --path kernels --top 10 --repeats 20 $3 --out $R/profile_$2.json > $R/profile_$2.txt 2>&1); grep "^## \|selective_scan" $R/profile_$2.txt; }
prof $ROOT/.before before1 ""
prof $ROOT/.fastexp hw2_1 ""
prof $ROOT/.fastexp hw1_1 "--set pallas_kernels.selective_scan.HW_EXP=1"
prof $ROOT/.fastexp hw2_2 ""
prof $ROOT/.before before2 ""
cd $OUT && tar czf results.tgz r
