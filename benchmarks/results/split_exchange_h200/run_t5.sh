#!/usr/bin/env bash
# Session 11, call 5: the tagged exchange that waits on one sentinel word per program, then reads every word once
# (repeating when one lacked the tag): the split cases against the unfused generate, then µs per step, alternating
# with the counter barrier (.before = HEAD).
set -u
export PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
CASES="Mamba|Mamba bilinear bias k3|RG-LRU k2 bias|Mamba B=1|Mamba B=16 split 8|Mamba B=32 block 16 split 16|RG-LRU B=100 blocks|S4|S4 B=1 split 8|RG-LRU B=3 split 8|Mamba zoh event/step B=20 block 16 split 8"
PYTHONPATH=$PWD timeout 150 python .gpu/diag.py "$CASES" 2 $R/diag_after.json > $R/diag_after.txt 2>&1; echo "== diag after"; grep -v Warning $R/diag_after.txt | cut -c1-160
if ! python -c "import json,sys; d=json.load(open('$R/diag_after.json')); sys.exit(0 if len(d) == 11 and all(r['err']<1e-5 for c in d.values() for r in c['runs']) else 1)"; then
  echo "diag failed: stop"; cd $OUT && tar czf results.tgz r; exit 0
fi
rows() {  # tree, label
  (cd $1 && PYTHONPATH=$1 timeout 120 python -m benchmarks.benchmark_fused_generation --models Mamba,RGLRU,S4 --batches 1 8 32 --no-loop --no-xla --repeats 10 --warmup 2 --no-plot --out $R/rows_$2.json > $R/rows_$2.txt 2>&1)
  echo "== rows $2"; grep "^| [MRS]" $R/rows_$2.txt | cut -d'|' -f2-5
}
rows $PWD after_1
rows $PWD/.before before_1
rows $PWD after_2
PYTHONPATH=$PWD timeout 100 python -m benchmarks.benchmark_fused_generation --models Mamba,RGLRU --batches 64 256 --no-loop --no-xla --repeats 10 --warmup 2 --no-plot --out $R/blocks_after.json > $R/blocks_after.txt 2>&1
echo "== blocks after"; grep "^| [MR]" $R/blocks_after.txt | cut -d'|' -f2-5
rows $PWD/.before before_2
cd $OUT && tar czf results.tgz r
