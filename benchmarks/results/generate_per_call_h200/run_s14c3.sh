#!/bin/bash
# Session 14, call 3: generate after the per-call cuts (no host callback, num_valid kept on the device, batch-major
# program outputs, no slicing program for a whole chunk): timelines, and capture_graph + generate (512 steps) in fresh
# processes, the tree before (HEAD f98cbcd's library, B=32) and after (B=32 and 1).
export PYTHONPATH=$PWD
mkdir -p $OUT/r
timeout 120 python .gpu/trace_probe.py --models LRU,S5,Mamba --batch 32 --out $OUT/r/trace_after_b32 > $OUT/r/trace_after_b32.txt 2>&1; echo "trace rc=$?"
grep -E "^==|untraced|every traced" $OUT/r/trace_after_b32.txt
M=LRU,S5,S4D,ltv.S5,S4,Mamba,RGLRU,S7
timeout 170 python -m benchmarks.benchmark_capture --models $M --batches 32 --steps 512 --no-cache-runs --timeout 60 \
  --out $OUT/r/capture_after_b32.json > $OUT/r/capture_after_b32.txt 2>&1; echo "after b32 rc=$?"; grep "^|" $OUT/r/capture_after_b32.txt
timeout 150 env PYTHONPATH=$PWD/.before:$PWD python -m benchmarks.benchmark_capture --models $M --batches 32 --steps 512 --no-cache-runs --timeout 60 \
  --out $OUT/r/capture_before_b32.json > $OUT/r/capture_before_b32.txt 2>&1; echo "before b32 rc=$?"; grep "^|" $OUT/r/capture_before_b32.txt
timeout 150 python -m benchmarks.benchmark_capture --models $M --batches 1 --steps 512 --no-cache-runs --timeout 60 \
  --out $OUT/r/capture_after_b1.json > $OUT/r/capture_after_b1.txt 2>&1; echo "after b1 rc=$?"; grep "^|" $OUT/r/capture_after_b1.txt
cd $OUT && tar czf results.tgz r
