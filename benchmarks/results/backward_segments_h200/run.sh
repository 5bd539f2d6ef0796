#!/usr/bin/env bash
# Session 10, call 1: the backward in time segments (BACKWARD_PROGRAMS), tests on the real kernels, then A/B.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
R=$OUT/r; mkdir -p $R
{ nvidia-smi --query-gpu=name,driver_version --format=csv; python -c "import jax, flax, sys; print(sys.version, jax.__version__, flax.__version__, jax.devices())"; } > $R/env.txt 2>&1
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 170 python -m pytest -q -p no:cacheprovider -n 4 tests/test_selective_scan_kernels.py > $R/pytest_selective.txt 2>&1
tail -3 $R/pytest_selective.txt
for p in 1024 4096 2048 8192 16384; do
  timeout 60 python -m benchmarks.benchmark_scan_tiling --configs bwd:128:1:4 --backward-programs $p --repeats 20 --out $R/tiling_bwd_p$p.json > $R/tiling_bwd_p$p.txt 2>&1
  tail -1 $R/tiling_bwd_p$p.txt
done
for p in 1024 4096 8192 1024 4096 8192; do
  timeout 80 python -m benchmarks.profile_training --models Mamba --path kernels --top 8 --repeats 20 --set pallas_kernels.selective_scan.BACKWARD_PROGRAMS=$p --out $R/profile_p${p}_$SECONDS.json > $R/profile_p${p}_$SECONDS.txt 2>&1
done
for p in 4096 1024 4096; do
  timeout 70 python -m benchmarks.benchmark_training --models Mamba --paths kernels --sweeps seq --seq-lengths 2048 --repeats 30 --set pallas_kernels.selective_scan.BACKWARD_PROGRAMS=$p --out $R/train_p${p}_$SECONDS.json > $R/train_p${p}_$SECONDS.txt 2>&1
done
grep -h "busy\|pipelined\|in flight\|synchronous\|selective_scan" $R/profile_*.txt | head -60
cd $OUT && tar czf results.tgz r
