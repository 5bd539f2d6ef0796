#!/bin/bash
# Session 14, call 6: does a diverging closed loop (inf/NaN) change generate's time? scale 1 (the benchmarks' input)
# against 0.01, alternating processes, B=32.
export PYTHONPATH=$PWD
mkdir -p $OUT/r
for rep in 1 2; do
  for scale in 1 0.01; do
    timeout 80 python .gpu/ab_generate.py --models LRU,S4D,S5,S4 --batches 32 --scale $scale --tag scale$scale \
      --out $OUT/r/scale${scale}_rep$rep.json 2>&1 | grep '^{'
  done
done
