#!/bin/bash
# Session 16, call 3: S7's WB laid out (H, N, H) so the drive sums along the last axis (working tree) against HEAD
# (.before = the projection-precision tree), alternating fresh processes: the XLA program (S7, benchmark_capture) and
# the fused rollout (S7-small); S7's self-test on the new layout; RG-LRU at B=256 with 4 warps against the rule (8).
export PYTHONPATH=$PWD
R=$OUT/r; mkdir -p $R
git log --oneline -1 > $R/tree.txt 2>/dev/null; git diff --stat >> $R/tree.txt
FA="--models S7 --batches 32 1 --steps 512 --repeats 30 --no-cache-runs"
FB="--models S7-small --batches 1 32 --no-loop --no-xla --repeats 10 --warmup 2"
for rep in 1 2; do
  (cd .before && timeout 60 env PYTHONPATH=$PWD:$OLDPWD python -m benchmarks.benchmark_capture $FA --out $R/s7_before_rep$rep.json > $R/s7_before_rep$rep.txt 2>&1)
  timeout 60 python -m benchmarks.benchmark_capture $FA --out $R/s7_after_rep$rep.json > $R/s7_after_rep$rep.txt 2>&1
  (cd .before && timeout 60 env PYTHONPATH=$PWD:$OLDPWD python -m benchmarks.benchmark_fused_generation $FB --out $R/s7small_before_rep$rep.json > $R/s7small_before_rep$rep.txt 2>&1)
  timeout 60 python -m benchmarks.benchmark_fused_generation $FB --out $R/s7small_after_rep$rep.json > $R/s7small_after_rep$rep.txt 2>&1
done
timeout 90 python -m pallas_kernels.gpu_fused_selftest --only S7 > $R/selftest_s7.txt 2>&1; echo "rc=$?" >> $R/selftest_s7.txt
for rep in 1 2; do
  timeout 80 python -m benchmarks.benchmark_fused_generation --models RGLRU --batches 256 --no-loop --no-xla --num-warps 0 4 --repeats 10 --warmup 2 --out $R/rglru_warps256_rep$rep.json > $R/rglru_warps256_rep$rep.txt 2>&1
done
rm -f $R/*.png
cd $OUT && tar czf results.tgz r && rm -rf r
