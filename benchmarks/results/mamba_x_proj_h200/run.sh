#!/bin/bash
# Session 9, call 3: Mamba's x_proj as one contraction (the tree as carried) against by blocks (.gpu/xproj.patch
# reversed), alternating twice: the training step profiled, then the benchmark's synchronous step.
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
R=$OUT/r; mkdir -p $R
one() {  # $1 tag
  timeout 120 python3 -m benchmarks.profile_training --models Mamba --path kernels --top 12 --repeats 20 \
    --out $R/profile_mamba_$1.json > $R/profile_mamba_$1.txt 2>&1
  echo "profile $1 rc=$?"; grep -E "^## |gemm|fusion" $R/profile_mamba_$1.txt | head -14 | cut -c1-120
  timeout 120 python3 -m benchmarks.benchmark_training --models Mamba --paths kernels --sweeps seq --seq-lengths 2048 \
    --repeats 30 --no-plot --out $R/training_mamba_$1.json > $R/training_mamba_$1.txt 2>&1
  echo "train $1 rc=$?"; grep -E "^\| Mamba" $R/training_mamba_$1.txt | head -3
}
for i in 1 2; do
  one one_contraction$i
  git apply -R .gpu/xproj.patch
  one blocks$i
  git apply .gpu/xproj.patch
done
cd $OUT && tar czf results.tgz r && rm -rf r
