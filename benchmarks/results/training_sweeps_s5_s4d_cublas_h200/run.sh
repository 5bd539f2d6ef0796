#!/bin/bash
# Session 9, call 6: more of the diagonal models' training sweeps with cuBLAS GEMMs (S5 LTI, then S4D).
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
R=$OUT/r; mkdir -p $R
timeout 240 python3 -m benchmarks.benchmark_training --models S5,S4D --paths xla,kernels --sweeps seq,dim,batch \
  --check-precision same --compiler-options '{"xla_gpu_enable_triton_gemm": false}' --repeats 5 --time-budget 190 \
  --no-plot --out $R/training_sweeps_s5_s4d_cublas_h200.json > $R/training_sweeps_s5_s4d_cublas.txt 2>&1
echo "sweeps rc=$?"; grep -E "^\| (S5|S4D) " $R/training_sweeps_s5_s4d_cublas.txt | head -40
cd $OUT && tar czf results.tgz r && rm -rf r
