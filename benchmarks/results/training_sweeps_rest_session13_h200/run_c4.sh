#!/bin/bash
# Session 13, call 4: issue 14's remaining sweep points (S5 LTV's batch sweep with cuBLAS GEMMs, S7's dimension and
# batch sweeps, the large configuration of the diagonal models), and the fused rollouts at issue 15's point again.
export PYTHONPATH=$PWD
mkdir -p $OUT/r
CUBLAS='{"xla_gpu_enable_triton_gemm": false}'
timeout 110 python -m benchmarks.benchmark_training --models ltv.S5 --paths xla,kernels --sweeps batch --batch-sizes 16,64,128 \
  --check-precision same --compiler-options "$CUBLAS" --repeats 5 --time-budget 80 --no-plot --out $OUT/r/training_s5ltv_batch_cublas.json \
  > $OUT/r/training_s5ltv_batch_cublas.txt 2>&1; echo "s5ltv rc=$?"; tail -15 $OUT/r/training_s5ltv_batch_cublas.txt
timeout 150 python -m benchmarks.benchmark_training --models LRU,S5,ltv.S5,S4D --paths xla,kernels --sweeps large \
  --check-precision same --compiler-options "$CUBLAS" --repeats 5 --time-budget 120 --no-plot --out $OUT/r/training_large_diagonal_cublas.json \
  > $OUT/r/training_large_diagonal_cublas.txt 2>&1; echo "large rc=$?"; tail -15 $OUT/r/training_large_diagonal_cublas.txt
timeout 190 python -m benchmarks.benchmark_training --models S7 --paths xla,kernels --sweeps dim,batch \
  --repeats 5 --time-budget 160 --no-plot --out $OUT/r/training_s7_dim_batch.json \
  > $OUT/r/training_s7_dim_batch.txt 2>&1; echo "s7 rc=$?"; tail -15 $OUT/r/training_s7_dim_batch.txt
for rep in 1 2; do
  timeout 45 python -m benchmarks.benchmark_fused_generation --models S4D,S5,S4 --batches 32 --no-xla --no-loop --repeats 20 \
    --warmup 3 --no-plot --out $OUT/r/fused_b32_rep$rep.json > $OUT/r/fused_b32_rep$rep.txt 2>&1; echo "fused rc=$?"; grep -E "^\| S" $OUT/r/fused_b32_rep$rep.txt
done
cd $OUT && tar czf results.tgz r
