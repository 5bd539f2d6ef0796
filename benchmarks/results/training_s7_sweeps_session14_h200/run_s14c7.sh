#!/bin/bash
# Session 14, call 7: S7's training sweep points not reached in session 13 (L = 128-1024; B = 64, 128; H = 256),
# XLA path against the kernels; gradients compared at the timed precision (--check-precision same) to save compiles.
export PYTHONPATH=$PWD
mkdir -p $OUT/r
timeout 250 python -m benchmarks.benchmark_training --models S7 --paths xla,kernels --sweeps seq --seq-lengths 128,256,512,1024 \
  --check-precision same --repeats 5 --time-budget 215 --no-plot --out $OUT/r/training_s7_seq_long.json > $OUT/r/training_s7_seq_long.txt 2>&1
echo "seq rc=$?"; grep -E "stopped" $OUT/r/training_s7_seq_long.txt; cut -d, -f1-10 $OUT/r/training_s7_seq_long.csv
timeout 250 python -m benchmarks.benchmark_training --models S7 --paths xla,kernels --sweeps batch,dim --batch-sizes 64,128 --model-dims 256 \
  --check-precision same --repeats 5 --time-budget 215 --no-plot --out $OUT/r/training_s7_batch_dim.json > $OUT/r/training_s7_batch_dim.txt 2>&1
echo "batch/dim rc=$?"; grep -E "stopped" $OUT/r/training_s7_batch_dim.txt; cut -d, -f1-10 $OUT/r/training_s7_batch_dim.csv
cd $OUT && tar czf results.tgz r
