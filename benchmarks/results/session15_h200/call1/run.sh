#!/bin/bash
# Session 15, call 1: (a) the language model's generate_tokens through a CapturedModel on the H200;
# (b) A/B of the split barrier's spin (HEAD: atomic adds of 0; .variant: volatile loads of the counter), alternating
#     fresh processes; the variant's self-test for Mamba; (c) the XLA program's in-place batch-major write (414666c)
#     against 3e12994 (.before) at B=4096, S5 (XLA program there).
export PYTHONPATH=$PWD
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $R/device.txt
python -c "import jax, flax; print(jax.__version__, flax.__version__, jax.devices())" >> $R/device.txt 2>&1
FG="--models Mamba,RGLRU,S4 --batches 1 8 32 --no-loop --no-xla --repeats 10 --warmup 2"
for rep in 1 2; do
  timeout 120 python -m benchmarks.benchmark_fused_generation $FG --out $R/spin_atomic_rep$rep.json > $R/spin_atomic_rep$rep.txt 2>&1
  (cd .variant && timeout 120 env PYTHONPATH=$PWD:$OLDPWD python -m benchmarks.benchmark_fused_generation $FG --out $R/spin_load_rep$rep.json > $R/spin_load_rep$rep.txt 2>&1)
done
(cd .variant && timeout 150 env PYTHONPATH=$PWD:$OLDPWD python -m pallas_kernels.gpu_fused_selftest --only Mamba > $R/selftest_spin_load_mamba.txt 2>&1)
timeout 120 python -m benchmarks.benchmark_host_overhead --models LM --lm-layers 24 --repeats 100 --out $R/host_lm24.json > $R/host_lm24.txt 2>&1
XG="--models S5 --batches 4096 --no-loop --repeats 5 --warmup 2"
for rep in 1 2; do
  (cd .before && timeout 90 env PYTHONPATH=$PWD:$OLDPWD python -m benchmarks.benchmark_fused_generation $XG --out $R/xla_write_before_rep$rep.json > $R/xla_write_before_rep$rep.txt 2>&1)
  timeout 90 python -m benchmarks.benchmark_fused_generation $XG --out $R/xla_write_after_rep$rep.json > $R/xla_write_after_rep$rep.txt 2>&1
done
