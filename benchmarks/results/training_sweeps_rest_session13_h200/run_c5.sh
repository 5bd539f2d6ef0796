#!/bin/bash
# Session 13, call 5: S7's remaining training sweep points (XLA path against the kernels): H=256, the batch sweep, the
# sequence sweep below 2048.
export PYTHONPATH=$PWD
mkdir -p $OUT/r
timeout 200 python -m benchmarks.benchmark_training --models S7 --paths xla,kernels --sweeps batch,dim --model-dims 256 \
  --repeats 5 --time-budget 170 --no-plot --out $OUT/r/training_s7_batch_h256.json > $OUT/r/training_s7_batch_h256.txt 2>&1
echo "s7 batch rc=$?"; grep -E "stopped" $OUT/r/training_s7_batch_h256.txt
timeout 230 python -m benchmarks.benchmark_training --models S7 --paths xla,kernels --sweeps seq --seq-lengths 8,16,32,64,128,256,512,1024 \
  --repeats 5 --time-budget 200 --no-plot --out $OUT/r/training_s7_seq.json > $OUT/r/training_s7_seq.txt 2>&1
echo "s7 seq rc=$?"; grep -E "stopped" $OUT/r/training_s7_seq.txt
cut -d, -f1-10,14 $OUT/r/training_s7_batch_h256.csv $OUT/r/training_s7_seq.csv
cd $OUT && tar czf results.tgz r
