#!/bin/bash
# Session 16, call 4 (the tree at c04a9d7; .before = bf8a287, without split_row_warps): RG-LRU's split programs of
# one row on 4 warps against the rule's 8, alternating; RG-LRU's self-test; issue 15's table as a user gets it; a
# warps sweep of S5 LTI and S4D (one-program rollouts).
export PYTHONPATH=$PWD
R=$OUT/r; mkdir -p $R
git log --oneline -1 > $R/tree.txt 2>/dev/null
FA="--models RGLRU --batches 32 24 --no-loop --no-xla --repeats 10 --warmup 2"
for rep in 1 2; do
  (cd .before && timeout 60 env PYTHONPATH=$PWD:$OLDPWD python -m benchmarks.benchmark_fused_generation $FA --out $R/rglru_before_rep$rep.json > $R/rglru_before_rep$rep.txt 2>&1)
  timeout 60 python -m benchmarks.benchmark_fused_generation $FA --out $R/rglru_after_rep$rep.json > $R/rglru_after_rep$rep.txt 2>&1
done
timeout 90 python -m pallas_kernels.gpu_fused_selftest --only RG-LRU > $R/selftest_rglru.txt 2>&1; echo "rc=$?" >> $R/selftest_rglru.txt
timeout 260 python -m benchmarks.benchmark_capture --models LRU,S5,S4D,ltv.S5,S4,Mamba,RGLRU,S7 --batches 32 1 --steps 512 --repeats 30 --no-cache-runs --out $R/table.json > $R/table.txt 2>&1
timeout 80 python -m benchmarks.benchmark_fused_generation --models S5,S4D --batches 32 1 --no-loop --no-xla --num-warps 0 8 32 --repeats 10 --warmup 2 --out $R/warps_s5_s4d.json > $R/warps_s5_s4d.txt 2>&1
rm -f $R/*.png
cd $OUT && tar czf results.tgz r && rm -rf r
