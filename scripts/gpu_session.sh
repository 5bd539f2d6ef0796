#!/usr/bin/env bash
# One GPU session, run through the device tool from the repository root, in two parts (each fits one call):
#   scripts/gpu_session.sh checks   the tests on the real kernels (step kernels vs pure-JAX step for every model,
#                                   lrnnx parity incl. generate, generation), both kernel self-tests
#   scripts/gpu_session.sh tests    only the tests of "checks"
#   scripts/gpu_session.sh bench    the state-update benchmark (ops, launch floor, generate with/without kernels)
#                                   and the fused-generation benchmark
# Results go to $OUT. The parity tests need the fixtures: carry a copy in .fixtures (LRNNX_PARITY_FIXTURES).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if [ -d .fixtures ]; then export LRNNX_PARITY_FIXTURES=$PWD/.fixtures; fi
{ nvidia-smi --query-gpu=name,driver_version --format=csv; python -c "import jax, flax; print(jax.__version__, flax.__version__, jax.devices())"; } > "$OUT/env.txt" 2>&1
gpu_tests() {
  # several pytest workers share the GPU: no preallocation of 75% of its memory per process
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 240 python -m pytest -q -p no:cacheprovider -n 4 \
    tests/test_step_kernels.py tests/test_convert.py tests/test_generation.py > "$OUT/gpu_tests.txt" 2>&1
}
case "${1:-checks}" in
  checks)
    gpu_tests
    timeout 120 python -m pallas_kernels.gpu_selftest > "$OUT/state_update_selftest.txt" 2>&1
    timeout 200 python -m pallas_kernels.gpu_fused_selftest --out "$OUT/fused_selftest.json" > "$OUT/fused_selftest.txt" 2>&1
    ;;
  tests)
    gpu_tests
    ;;
  bench)
    timeout 330 python -m benchmarks.benchmark_state_update --out "$OUT/state_update.md" > "$OUT/state_update.txt" 2>&1
    timeout 240 python -m benchmarks.benchmark_fused_generation --quick --out "$OUT/fused_bench.json" > "$OUT/fused_bench.txt" 2>&1
    ;;
esac
tail -n 8 "$OUT"/*.txt
