#!/bin/bash
# Session 9, call 4: the test files of the training kernels on the GPU (real kernels), then Mamba's training step with
# the conv kernels (the tree as carried; --paths kernels forces them) against without (.gpu/conv.patch reversed),
# alternating twice.
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
R=$OUT/r; mkdir -p $R
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_causal_conv.py tests/test_selective_scan_kernels.py \
  > $R/pytest_training_kernels_h200.txt 2>&1
echo "pytest rc=$?"; tail -4 $R/pytest_training_kernels_h200.txt
one() {  # $1 tag
  timeout 120 python3 -m benchmarks.profile_training --models Mamba --path kernels --top 14 --repeats 20 \
    --out $R/profile_mamba_$1.json > $R/profile_mamba_$1.txt 2>&1
  echo "profile $1 rc=$?"; grep -E "^## |conv|scan|fusion" $R/profile_mamba_$1.txt | head -12 | cut -c1-150
  timeout 120 python3 -m benchmarks.benchmark_training --models Mamba --paths kernels --sweeps seq --seq-lengths 2048 \
    --repeats 30 --no-plot --out $R/training_mamba_$1.json > $R/training_mamba_$1.txt 2>&1
  echo "train $1 rc=$?"; grep -E "^\| Mamba|gradient check" $R/training_mamba_$1.txt | head -3
}
for i in 1 2; do
  one conv_kernels$i
  git apply -R .gpu/conv.patch
  one xla_conv$i
  git apply .gpu/conv.patch
done
cd $OUT && tar czf results.tgz r && rm -rf r
