#!/usr/bin/env bash
# Session 12, call 4: RG-LRU's split in blocks of 8 rows (KernelPolicy.split_block=8, multiply-adds, the most
# resident programs) as "auto" now picks it, against blocks of 16 (dots, the fewest programs: the previous auto).
set -u
export PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
ROOT=$PWD
START=$(date +%s)
left() { echo $(( 480 - ($(date +%s) - START) )); }
CASES="RG-LRU B=64 block 8 split 8|RG-LRU B=100 blocks|RG-LRU k2 bias B=20 block 16 split 4"
PYTHONPATH=$ROOT timeout 120 python .gpu/diag.py "$CASES" 2 $R/diag_rglru_blocks.json > $R/diag_rglru_blocks.txt 2>&1
echo "== diag t=$(( $(date +%s) - START ))"; grep -v Warning $R/diag_rglru_blocks.txt | cut -c1-170
bench() {  # label args...
  local label=$1; shift
  [ $(left) -lt 30 ] && { echo "skip $label: $(left) s left"; return; }
  PYTHONPATH=$ROOT timeout $(( $(left) < 150 ? $(left) - 5 : 150 )) python -m benchmarks.benchmark_fused_generation --no-loop --no-xla --repeats 10 --warmup 2 --no-plot --out $R/$label.json "$@" > $R/$label.txt 2>&1
  echo "== $label t=$(( $(date +%s) - START ))"; tr '\r' '\n' < $R/$label.txt | grep "^| [R]" | cut -d'|' -f2-5 | tr '\n' ';'; echo
}
bench rglru_blocks_1 --models RGLRU --batches 64 128 256 512 --block-batch 0 16
bench rglru_blocks_2 --models RGLRU --batches 64 128 256 512 --block-batch 0 16
cd $OUT && tar czf results.tgz r
