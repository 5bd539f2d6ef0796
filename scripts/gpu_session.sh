#!/usr/bin/env bash
# One GPU session (run through the device tool from the repository root): the parity tests on the GPU,
# the fused-generation self-test and benchmark, and the LTI path benchmark. Results go to $OUT.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version --format=csv; python -c "import jax, flax; print(jax.__version__, flax.__version__, jax.devices())"; } > "$OUT/env.txt" 2>&1
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_convert.py tests/test_lti.py tests/test_scan.py tests/test_discretization.py > "$OUT/gpu_tests.txt" 2>&1
timeout 180 python -m pallas_kernels.gpu_fused_selftest --out "$OUT/fused_selftest.json" > "$OUT/fused_selftest.txt" 2>&1
timeout 150 python -m benchmarks.benchmark_fused_generation --quick --out "$OUT/fused_bench.json" > "$OUT/fused_bench.txt" 2>&1
timeout 60 python -m benchmarks.benchmark_lti_paths --lengths 64 256 1024 4096 16384 --repeats 5 --out "$OUT/lti_paths.json" > "$OUT/lti_paths.txt" 2>&1
tail -n 5 "$OUT"/*.txt
