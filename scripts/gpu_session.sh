#!/usr/bin/env bash
# One GPU session, run through the device tool from the repository root, in parts (each fits one call):
#   scripts/gpu_session.sh compare  benchmark_fused_generation before and after a change, in the same call: the
#                                   tree at .before (carried; e.g. `git archive <commit> | tar -x -C .before`) and
#                                   this one, every model at B=32, 128 and 4096 (fused kernel only)
#   scripts/gpu_session.sh checks   the tests on the real kernels (one-step / multi-token kernels vs the XLA driver for
#                                   every model, fused generation, lrnnx parity, generation), both kernel self-tests,
#                                   the model.step table and the generate-vs-num_steps benchmark
#   scripts/gpu_session.sh tests    only the tests of "checks"
#   scripts/gpu_session.sh recheck  the tests, and the comparison of "compare" again, 20 repeats, for chosen models
#   scripts/gpu_session.sh training the training-scan tests on the real kernels (about 4 min), then every model at
#                                   lrnnx's training point on the XLA path and the kernels (Mamba2 also with its SSD
#                                   form), bounded by --time-budget
#   scripts/gpu_session.sh sweeps   benchmark_training's sweeps and its large configuration, bounded by --time-budget
#   scripts/gpu_session.sh multi    (2 GPUs: kind nvidia-h200-x2) benchmarks/benchmark_multi_gpu.py
#   scripts/gpu_session.sh s4split  S4's rollout split over programs: its self-test cases against the unfused generate,
#                                   then the fused rollout (split) against the XLA program at B=1, 8 and 32 and the
#                                   programs per row at B=1 (S4's policy keeps the XLA program until this is measured)
#   scripts/gpu_session.sh fused    issue 15's table: benchmark_fused_generation for every model at B=1, 32, 256 and
#                                   4096 (fused and XLA program), then capture_graph's cold and warm times
# Results go to $OUT. The parity tests need the fixtures: carry a copy of ../shared/fixtures in .fixtures (LRNNX_FIXTURES).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if [ -d .fixtures ]; then export LRNNX_FIXTURES=$PWD/.fixtures; fi
{ nvidia-smi --query-gpu=name,driver_version --format=csv; python -c "import jax, flax; print(jax.__version__, flax.__version__, jax.devices())"; } > "$OUT/env.txt" 2>&1
gpu_tests() {
  # several pytest workers share the GPU: no preallocation of 75% of its memory per process
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 230 python -m pytest -q -p no:cacheprovider -n 6 \
    tests/test_step_kernels.py tests/test_pallas_fused_generation.py tests/test_convert.py tests/test_generation.py \
    > "$OUT/gpu_tests.txt" 2>&1
}
compare_args="--batches 32 128 4096 --no-loop --repeats 3 --warmup 1"
case "${1:-checks}" in
  compare)
    (cd .before && timeout 260 python -m benchmarks.benchmark_fused_generation $compare_args --out "$OUT/before.json") > "$OUT/before.txt" 2>&1
    timeout 260 python -m benchmarks.benchmark_fused_generation $compare_args --out "$OUT/after.json" > "$OUT/after.txt" 2>&1
    ;;
  checks)
    gpu_tests
    timeout 60 python -m pallas_kernels.gpu_selftest > "$OUT/state_update_selftest.txt" 2>&1
    timeout 90 python -m pallas_kernels.gpu_fused_selftest --quick --out "$OUT/fused_selftest.json" > "$OUT/fused_selftest.txt" 2>&1
    timeout 50 python -m benchmarks.benchmark_generate_steps --models LRU,Mamba --out "$OUT/generate_steps.json" > "$OUT/generate_steps.txt" 2>&1
    timeout 90 python -m benchmarks.benchmark_state_update --skip-ops --batches 1 32 4096 --repeats 10 > "$OUT/model_step.txt" 2>&1
    ;;
  tests)
    gpu_tests
    ;;
  recheck)  # the tests, then the fused comparison again with more repeats for the models whose first run was noisy
    gpu_tests
    args="--models LRU,S5,S5-event,ltv.S5-event,CentaurusPWNeck,S4,S7-small --batches 32 128 --no-xla --no-loop --repeats 20 --warmup 3"
    (cd .before && timeout 110 python -m benchmarks.benchmark_fused_generation $args --out "$OUT/before2.json") > "$OUT/before2.txt" 2>&1
    timeout 110 python -m benchmarks.benchmark_fused_generation $args --out "$OUT/after2.json" > "$OUT/after2.txt" 2>&1
    ;;
  training)
    XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 280 python -m pytest -q -p no:cacheprovider -n 4 \
      tests/test_selective_scan_kernels.py tests/test_diagonal_scan.py tests/test_ssd.py tests/test_mamba2.py \
      > "$OUT/gpu_training_tests.txt" 2>&1
    timeout 280 python -m benchmarks.benchmark_training --models all --paths xla,kernels --sweeps seq \
      --seq-lengths 2048 --time-budget 240 --no-plot --out "$OUT/training_point.json" > "$OUT/training_point.txt" 2>&1
    ;;
  sweeps)
    timeout 560 python -m benchmarks.benchmark_training --models Mamba,RGLRU,LRU,S5,ltv.S5 --paths xla,kernels \
      --sweeps seq,dim,batch,large --time-budget 520 --out "$OUT/training_sweeps.json" > "$OUT/training_sweeps.txt" 2>&1
    ;;
  fused)
    timeout 420 python -m benchmarks.benchmark_fused_generation --batches 1 32 256 4096 --no-loop --repeats 5 \
      --warmup 2 --out "$OUT/fused_generation.json" > "$OUT/fused_generation.txt" 2>&1
    timeout 150 python -m benchmarks.benchmark_capture --models Mamba,RGLRU,S7,S4,LRU --batches 1 32 \
      --out "$OUT/capture.json" > "$OUT/capture.txt" 2>&1
    ;;
  s4split)
    timeout 150 python -m pallas_kernels.gpu_fused_selftest --only S4 --out "$OUT/fused_selftest_s4.json" \
      > "$OUT/fused_selftest_s4.txt" 2>&1
    timeout 200 python -m benchmarks.benchmark_fused_generation --models S4 --batches 1 8 32 --no-loop --repeats 10 \
      --warmup 2 --out "$OUT/fused_s4_split.json" > "$OUT/fused_s4_split.txt" 2>&1
    timeout 150 python -m benchmarks.benchmark_fused_generation --models S4 --batches 1 --no-loop --no-xla \
      --split-programs 2 4 8 16 --repeats 10 --warmup 2 --out "$OUT/fused_s4_programs.json" \
      > "$OUT/fused_s4_programs.txt" 2>&1
    ;;
  multi)
    NCCL_NVLS_ENABLE=0 timeout 560 python -m benchmarks.benchmark_multi_gpu --time-budget 500 \
      --out "$OUT/multi_gpu.json" > "$OUT/multi_gpu.txt" 2>&1
    ;;
esac
tail -n 8 "$OUT"/*.txt
