#!/bin/bash
# Session 16, call 2: S7's XLA program's kernels per step (s7_probe.py; the tree at 332ce0b); S4's split exchange,
# tagged words (the tree) against the barrier (.variant: SPLIT_EXCHANGE = "barrier") at B = 1, 8, 16, 32,
# alternating fresh processes; RG-LRU at B=32 with 4 warps per split program against the default (8).
export PYTHONPATH=$PWD
R=$OUT/r; mkdir -p $R
git log --oneline -1 > $R/tree.txt 2>/dev/null
timeout 120 python .gpu/s7_probe.py --out $R/s7 --batches 32 1 > $R/s7_probe.txt 2>&1
FA="--models S4 --batches 1 8 16 32 --no-loop --no-xla --repeats 10 --warmup 2"
for rep in 1 2; do
  timeout 80 python -m benchmarks.benchmark_fused_generation $FA --out $R/s4_tagged_rep$rep.json > $R/s4_tagged_rep$rep.txt 2>&1
  (cd .variant && timeout 80 env PYTHONPATH=$PWD:$OLDPWD python -m benchmarks.benchmark_fused_generation $FA --out $R/s4_barrier_rep$rep.json > $R/s4_barrier_rep$rep.txt 2>&1)
done
for rep in 1 2; do
  timeout 80 python -m benchmarks.benchmark_fused_generation --models RGLRU --batches 32 --no-loop --no-xla --num-warps 0 4 --repeats 10 --warmup 2 --out $R/rglru_warps_rep$rep.json > $R/rglru_warps_rep$rep.txt 2>&1
done
rm -f $R/*.png $R/*/*.png
cd $OUT && tar czf results.tgz r && rm -rf r
