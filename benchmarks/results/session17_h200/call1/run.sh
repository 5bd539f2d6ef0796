#!/bin/bash
# Session 17, call 1 (the tree at 237b902): issue 15's table with RG-LRU's 2-warp rows; where capture's time goes
# (JAX's trace / lowering / backend-compile events per model); S7's XLA program with cuBLAS GEMMs against XLA's
# default (step and capture), alternating.
export PYTHONPATH=$PWD
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/gpu.txt 2>&1
timeout 270 python -m benchmarks.benchmark_capture --models LRU,S5,S4D,ltv.S5,S4,Mamba,RGLRU,S7 --batches 32 1 --steps 512 --repeats 30 --no-cache-runs --out $R/table.json > $R/table.txt 2>&1
CUB='{"xla_gpu_enable_triton_gemm": false}'
for m in S7 Mamba S4 RGLRU; do for b in 32 1; do
  timeout 40 python .gpu/capture_probe.py $m $b >> $R/probe.txt 2>&1
  timeout 40 python .gpu/capture_probe.py $m $b "$CUB" >> $R/probe.txt 2>&1
done; done
for rep in 1 2; do
  timeout 60 python -m benchmarks.benchmark_capture --models S7 --batches 32 1 --steps 512 --repeats 30 --no-cache-runs --out $R/s7_default_rep$rep.json > $R/s7_default_rep$rep.txt 2>&1
  timeout 60 python -m benchmarks.benchmark_capture --models S7 --batches 32 1 --steps 512 --repeats 30 --no-cache-runs --compiler-options "$CUB" --out $R/s7_cublas_rep$rep.json > $R/s7_cublas_rep$rep.txt 2>&1
done
cd $OUT && tar czf results.tgz r && rm -rf r
