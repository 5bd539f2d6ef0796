#!/bin/bash
# Session 13, call 3: register budgets (HOIST_PER_WARP) for Mamba's split at B=32 and S5 LTI, after ncu showed spills.
export PYTHONPATH=$PWD
mkdir -p $OUT/r
timeout 300 python .gpu/hoist_sweep.py --model Mamba --batches 32 --hoists 2560 1536 1024 512 256 --warps 0 4 --out $OUT/r/hoist_mamba.json > $OUT/r/hoist_mamba.txt 2>&1
echo "mamba rc=$?"; grep RESULT $OUT/r/hoist_mamba.txt
timeout 170 python .gpu/hoist_sweep.py --model S5 --batches 32 1 --hoists 2560 2048 1536 --out $OUT/r/hoist_s5.json > $OUT/r/hoist_s5.txt 2>&1
echo "s5 rc=$?"; grep RESULT $OUT/r/hoist_s5.txt
cd $OUT && tar czf results.tgz r
