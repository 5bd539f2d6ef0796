#!/usr/bin/env bash
# Session 12, call 2: the working tree (a row's partials in one load from 16 programs on, fused_generation.
# ONE_LOAD_MIN_PARTS; S5 LTI's hoist "largest") against .before (HEAD) with the exchanges as declared; the split
# cases against the unfused generate first (gate). Then the tagged exchange for Mamba and RG-LRU on the working tree.
set -u
export PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
ROOT=$PWD
START=$(date +%s)
left() { echo $(( 560 - ($(date +%s) - START) )); }
CASES="Mamba|Mamba bilinear bias k3|RG-LRU k2 bias|Mamba B=1|Mamba B=16 split 8|Mamba B=32 block 16 split 16|RG-LRU B=100 blocks|S4|S4 B=1 split 8|RG-LRU B=3 split 8|Mamba zoh event/step B=20 block 16 split 8"
diag() {  # tree label
  (cd $1 && PYTHONPATH=$1 timeout 150 python $ROOT/.gpu/diag.py "$CASES" 2 $R/diag_$2.json > $R/diag_$2.txt 2>&1)
  echo "== diag $2 t=$(( $(date +%s) - START ))"; grep -v Warning $R/diag_$2.txt | cut -c1-150
  python -c "import json,sys; d=json.load(open('$R/diag_$2.json')); sys.exit(0 if len(d) == 11 and all(r['err']<1e-5 for c in d.values() for r in c['runs']) and all(all(c['identical_to_first']) for c in d.values()) else 1)"
}
rows() {  # tree label [models batches]
  [ $(left) -lt 40 ] && { echo "skip rows $2: $(left) s left"; return; }
  (cd $1 && PYTHONPATH=$1 timeout $(( $(left) < 100 ? $(left) - 5 : 100 )) python -m benchmarks.benchmark_fused_generation --models ${3:-Mamba,RGLRU,S4} --batches ${4:-1 8 32} --no-loop --no-xla --repeats 10 --warmup 2 --no-plot --out $R/rows_$2.json > $R/rows_$2.txt 2>&1)
  echo "== rows $2 t=$(( $(date +%s) - START ))"; grep "^| [MRS]" $R/rows_$2.txt | cut -d'|' -f2-5 | tr '\n' ';'; echo
}
if ! diag $ROOT declared; then echo "diag failed: stop"; cd $OUT && tar czf results.tgz r; exit 0; fi
rows $ROOT after_1
rows $ROOT/.before before_1
rows $ROOT after_2
rows $ROOT/.before before_2
T=$ROOT/.tagged; rm -rf $T; mkdir $T; cp -r $ROOT/pallas_kernels $ROOT/lrnnx_jax $ROOT/benchmarks $T/
sed -i "s/^SPLIT_EXCHANGE = .*/SPLIT_EXCHANGE = \"tagged\"/" $T/lrnnx_jax/models/ltv/mamba.py $T/lrnnx_jax/models/ltv/rglru.py
grep -n "^SPLIT_EXCHANGE" $T/lrnnx_jax/models/ltv/mamba.py $T/lrnnx_jax/models/ltv/rglru.py
if diag $T tagged; then
  rows $T tagged_1 Mamba,RGLRU "1 8 32"
  rows $ROOT after_3 Mamba,RGLRU "1 8 32"
  rows $T tagged_2 Mamba,RGLRU "1 8 32"
fi
cd $OUT && tar czf results.tgz r
