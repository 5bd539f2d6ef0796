#!/bin/bash
# Session 14, call 2: jax.profiler timelines of one call (generate 512 / 1 step with and without _assemble's host
# callback, the fused runner, model.step), B=32 LRU, S5, Mamba; B=1 LRU, Mamba.
export PYTHONPATH=$PWD
mkdir -p $OUT/r
timeout 250 python .gpu/trace_probe.py --models LRU,S5,Mamba --batch 32 --out $OUT/r/trace_b32 > $OUT/r/trace_b32.txt 2>&1; echo "b32 rc=$?"
grep -E "^==|untraced|every traced" $OUT/r/trace_b32.txt
timeout 150 python .gpu/trace_probe.py --models LRU,Mamba --batch 1 --out $OUT/r/trace_b1 > $OUT/r/trace_b1.txt 2>&1; echo "b1 rc=$?"
grep -E "^==|untraced|every traced" $OUT/r/trace_b1.txt
echo ===; cat $OUT/r/trace_b32/LRU_B32_generate512.txt | head -80
cd $OUT && tar czf results.tgz r
