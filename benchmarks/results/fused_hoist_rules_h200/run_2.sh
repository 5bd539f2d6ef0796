#!/bin/bash
# Session 9, call 1: the selective-scan kernels without masks on full tiles and with gamma*u first (branch scan-opt,
# the tree as carried) against main (.gpu/scan_opt.patch reversed), kernels alone and Mamba's training step,
# alternating; the hoisting rule V2 (state-aware knapsack) on S4D and S4; LRU's training compile warm from JAX's cache.
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $R/gpu.txt
tiling() {  # $1 tag, rest configs
  local tag=$1; shift
  timeout 150 python3 -m benchmarks.benchmark_scan_tiling --configs "$@" --repeats 20 --out $R/scan_tiling_$tag.json > $R/scan_tiling_$tag.txt 2>&1
  echo "tiling $tag rc=$?"; grep -E "ms|\|" $R/scan_tiling_$tag.txt | tail -12
}
train() {  # $1 tag
  timeout 120 python3 -m benchmarks.benchmark_training --models Mamba --paths kernels --sweeps seq --seq-lengths 2048 \
    --repeats 20 --no-plot --out $R/training_mamba_$1.json > $R/training_mamba_$1.txt 2>&1
  echo "train $1 rc=$?"; grep -E "^\| Mamba" $R/training_mamba_$1.txt | head -3
}
tiling opt bwd:128:1:4 bwd:256:2:4 bwd:64:1:4 bwd:256:1:4 fwd:256:2:4:8 fwd:512:4:4:8 fwd:128:1:4:8
train opt1
git apply -R .gpu/scan_opt.patch && echo "main's selective_scan"
tiling main bwd:128:1:4 fwd:256:2:4:8
train main1
git apply .gpu/scan_opt.patch && echo "scan-opt again"
train opt2
git apply -R .gpu/scan_opt.patch
train main2
git apply .gpu/scan_opt.patch
fused() {
  timeout 120 python3 -m benchmarks.benchmark_fused_generation --models S4D,S4,S5 --batches 1 32 \
    --no-loop --no-xla --repeats 10 --warmup 2 --out $R/fused_hoist_$1_h200.json > $R/fused_hoist_$1.txt 2>&1
  echo "fused $1 rc=$?"; grep -E "^\| " $R/fused_hoist_$1.txt | cut -c1-50
}
fused main
git apply .gpu/hoist_v2.patch && echo "hoist v2 applied"
fused v2
git apply -R .gpu/hoist_v2.patch
export JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
for k in cold warm; do
  timeout 100 python3 -m benchmarks.benchmark_training --models LRU --paths xla --sweeps seq --seq-lengths 2048 \
    --repeats 10 --no-plot --out $R/training_lru_cache_$k.json > $R/training_lru_cache_$k.txt 2>&1
  echo "lru $k rc=$?"; grep -E "^\| LRU" $R/training_lru_cache_$k.txt | head -2
done
cd $OUT && tar czf results.tgz r && rm -rf r
