#!/bin/bash
# Session 17, call 4 (the tree at d1d3ff4, S5 LTI's folded direct path; .before = 237b902): S5 LTI where the fused
# rollout runs blocks of rows (B = 64, 128, 256: "auto" takes the fused rollout up to 256), fused against the XLA
# program, before and after the fold.
export PYTHONPATH=$PWD
R=$OUT/r; mkdir -p $R
FA="--models S5,S5-event --batches 64 128 256 --no-loop --repeats 5 --warmup 2 --no-plot"
(cd .before && timeout 100 env PYTHONPATH=$PWD:$OLDPWD python -m benchmarks.benchmark_fused_generation $FA --out $R/blocks_before.json > $R/blocks_before.txt 2>&1)
timeout 100 python -m benchmarks.benchmark_fused_generation $FA --out $R/blocks_after.json > $R/blocks_after.txt 2>&1
cd $OUT && tar czf results.tgz r && rm -rf r
