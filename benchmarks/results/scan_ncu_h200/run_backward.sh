#!/usr/bin/env bash
# Session 10, call 3: ncu on the backward scan kernel alone (where its time goes; the SASS with its stall samples).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
R=$OUT/r; mkdir -p $R
timeout 240 ncu --clock-control none -k regex:selective_scan_bwd -c 1 --set full --import-source no \
  -o $R/ncu_bwd python -m benchmarks.benchmark_scan_tiling --configs bwd:128:1:4 --warmup 0 --repeats 1 > $R/ncu_run.txt 2>&1
tail -3 $R/ncu_run.txt
if [ -f $R/ncu_bwd.ncu-rep ]; then
  ncu --import $R/ncu_bwd.ncu-rep --page details > $R/ncu_details.txt 2>&1
  ncu --import $R/ncu_bwd.ncu-rep --page source --csv --print-source sass > $R/ncu_sass.csv 2>&1
  grep -E "selective_scan|Duration|Registers Per|Achieved Occupancy|Executed Ipc A|Issue Slots Busy|No Eligible|Executed Instructions  |Warp Cycles Per Issued|Grid Size|Block Size" $R/ncu_details.txt | head -40
fi
cd $OUT && tar czf results.tgz r
