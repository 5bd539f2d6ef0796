#!/bin/bash
# session 8, GPU call 6: S5 LTI's dense skip in the fused rollout (timing only; four variants, fresh processes)
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../../.."  # the repository root
R=$OUT/r; mkdir -p $R
for v in dense axis0 diag none; do
  PYTHONPATH=$PWD timeout 60 python3 benchmarks/results/fused_s5_skip_h200/s5_skip.py $v $R/fused_s5_skip_$v.json > $R/fused_s5_skip_$v.txt 2>&1
  echo "$v rc=$?"; grep -E "^\| S5" $R/fused_s5_skip_$v.txt | cut -c1-60
done
cd $OUT && tar czf results.tgz r && rm -rf r
