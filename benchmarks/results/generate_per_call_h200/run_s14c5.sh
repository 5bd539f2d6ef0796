#!/bin/bash
# Session 14, call 5: issue 15's table as a user gets it (capture_graph in a fresh process, then generate of 512
# steps, median of 30) for every model at B=32 and 1 on the changed tree; the timeline of the 24-layer language
# model's generate_tokens (1 and 32 tokens).
export PYTHONPATH=$PWD
mkdir -p $OUT/r
M=LRU,S5,S4D,ltv.S5,S4,Mamba,RGLRU,S7
timeout 300 python -m benchmarks.benchmark_capture --models $M --batches 32 1 --steps 512 --repeats 30 --no-cache-runs --timeout 60 \
  --out $OUT/r/capture_generate512.json > $OUT/r/capture_generate512.txt 2>&1; echo "capture rc=$?"; grep "^|" $OUT/r/capture_generate512.txt | cut -c1-60
timeout 100 python .gpu/trace_probe.py --models LM24 --out $OUT/r/trace_lm > $OUT/r/trace_lm.txt 2>&1; echo "lm rc=$?"
grep -E "^==|untraced|every traced" $OUT/r/trace_lm.txt
head -60 $OUT/r/trace_lm/LM24_generate_tokens1.txt | cut -c1-150
cd $OUT && tar czf results.tgz r
