#!/bin/bash
# NEXT SESSION, one call: the knapsack hoisting (branch hoist-knapsack = .gpu/hoist_knapsack.patch) against main's
# smallest-first rule: the fused rollout at B=1 and 32 of the models that re-read a parameter tile (S5, S4D, Mamba,
# RG-LRU, S4), main's tree first, then the patch applied to the copy on the device, then its self-tests.
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
R=$OUT/r; mkdir -p $R
bench() {
  timeout 150 python3 -m benchmarks.benchmark_fused_generation --models S5,S5-event,S4D,Mamba,RGLRU,S4 --batches 1 32 \
    --no-loop --no-xla --repeats 10 --warmup 2 --out $R/fused_hoist_$1_h200.json > $R/fused_hoist_$1.txt 2>&1
  echo "bench $1 rc=$?"; grep -E "^\| " $R/fused_hoist_$1.txt | cut -c1-60
}
bench smallest_first
git apply .gpu/hoist_knapsack.patch && echo "patch applied"
bench knapsack
timeout 200 python3 -m pallas_kernels.gpu_fused_selftest --out $R/fused_selftest_knapsack_h200.json > $R/fused_selftest_knapsack.txt 2>&1
echo "selftest rc=$?"; tail -2 $R/fused_selftest_knapsack.txt
cd $OUT && tar czf results.tgz r && rm -rf r
