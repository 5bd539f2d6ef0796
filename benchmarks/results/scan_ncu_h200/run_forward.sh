#!/usr/bin/env bash
# Session 10, call 2: ncu on the scan kernels (where the backward's time goes), then the remaining cuBLAS sweeps.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
R=$OUT/r; mkdir -p $R
which ncu nvdisasm cuobjdump > $R/tools.txt 2>&1; ncu --version >> $R/tools.txt 2>&1
timeout 200 ncu --clock-control none -k regex:selective_scan -c 2 --set full --import-source no \
  -o $R/ncu_scan python -m benchmarks.benchmark_scan_tiling --configs fwd:256:2:4:8 bwd:128:1:4 --warmup 0 --repeats 1 > $R/ncu_run.txt 2>&1
tail -5 $R/ncu_run.txt
if [ -f $R/ncu_scan.ncu-rep ]; then
  ncu --import $R/ncu_scan.ncu-rep --page details > $R/ncu_details.txt 2>&1
  ncu --import $R/ncu_scan.ncu-rep --page source --csv --print-source sass > $R/ncu_sass.csv 2>&1
  grep -E "Duration|Registers Per|Achieved Occupancy|Executed Ipc A|Issue Slots Busy|No Eligible|Stall|Local|Executed Instructions  |Warp Cycles Per Issued" $R/ncu_details.txt | head -60
fi
timeout 300 python -m benchmarks.benchmark_training --models S4D,ltv.S5 --paths xla,kernels --sweeps seq,dim,batch \
  --seq-lengths 256,512,1024 --check-precision same --compiler-options '{"xla_gpu_enable_triton_gemm": false}' \
  --repeats 5 --time-budget 230 --out $R/sweeps_cublas/training.json > $R/sweeps_cublas.txt 2>&1
grep "^|" $R/sweeps_cublas.txt | head -40
cd $OUT && tar czf results.tgz r
