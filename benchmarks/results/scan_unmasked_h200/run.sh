#!/bin/bash
# Session 9, call 2: scan-opt (the tree as carried) against main's selective_scan (.gpu/scan_opt.patch reversed),
# alternating twice: Mamba's training step profiled (device time per kernel) and the two kernels alone.
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
R=$OUT/r; mkdir -p $R
one() {  # $1 tag
  timeout 120 python3 -m benchmarks.profile_training --models Mamba --path kernels --top 8 --repeats 20 \
    --out $R/profile_mamba_$1.json > $R/profile_mamba_$1.txt 2>&1
  echo "profile $1 rc=$?"; grep -E "selective_scan|step|busy|Mamba" $R/profile_mamba_$1.txt | head -12
  timeout 100 python3 -m benchmarks.benchmark_scan_tiling --configs bwd:128:1:4 fwd:256:2:4:8 --repeats 30 \
    --out $R/scan_tiling_$1.json > $R/scan_tiling_$1.txt 2>&1
  echo "tiling $1 rc=$?"; grep -E "^\| (fwd|bwd)" $R/scan_tiling_$1.txt
}
for i in 1 2; do
  one opt$i
  git apply -R .gpu/scan_opt.patch
  one main$i
  git apply .gpu/scan_opt.patch
done
cd $OUT && tar czf results.tgz r && rm -rf r
