#!/bin/bash
# Session 9, call 5: causal_conv's kernels alone over tiles and one or two backward passes (against XLA's conv),
# then Mamba's training step with the fastest settings against the XLA conv (.gpu/conv.patch reversed), alternating.
export PYTHONUNBUFFERED=1 PYTHONPATH=$(cd "$(dirname "$0")/.." && pwd)
cd "$(dirname "$0")/.."
R=$OUT/r; mkdir -p $R
timeout 150 python3 .gpu/conv_sweep.py $R/conv_tiles_h200.json $R/best_settings.txt \
  fwd:32:128:4 fwd:16:128:4 fwd:64:128:4 fwd:32:256:4 fwd:32:64:2 fwd:8:256:2 \
  bwd:32:128:4 bwd:8:128:4 bwd:16:128:4 bwd:8:128:2 bwd:4:128:2 bwd:16:64:2 bwd:8:256:4 \
  bwd2:32:128:4 bwd2:16:128:4 bwd2:64:128:4 bwd2:32:256:4 bwd2:16:256:4 > $R/conv_tiles.txt 2>&1
echo "sweep rc=$?"; grep -E "ms|BEST" $R/conv_tiles.txt
S=$(cat $R/best_settings.txt); echo "settings: $S"
SETS=""; for s in $S; do SETS="$SETS --set $s"; done
one() {  # $1 tag
  timeout 100 python3 .gpu/with_constants.py "$S" benchmarks.profile_training --models Mamba --path kernels --top 14 \
    --repeats 20 --out $R/profile_mamba_$1.json > $R/profile_mamba_$1.txt 2>&1
  echo "profile $1 rc=$?"; grep -E "^## |conv|fusion" $R/profile_mamba_$1.txt | head -9 | cut -c1-200
}
one conv_kernels1
git apply -R .gpu/conv.patch; one xla_conv1; git apply .gpu/conv.patch
one conv_kernels2
git apply -R .gpu/conv.patch; one xla_conv2; git apply .gpu/conv.patch
timeout 100 python3 -m benchmarks.benchmark_training --models Mamba --paths kernels --sweeps seq --seq-lengths 2048 \
  --repeats 30 --no-plot $SETS --out $R/training_mamba_conv_kernels.json > $R/training_mamba_conv_kernels.txt 2>&1
echo "train rc=$?"; grep -E "^\| Mamba|gradient check" $R/training_mamba_conv_kernels.txt | head -3
cd $OUT && tar czf results.tgz r && rm -rf r
