#!/usr/bin/env bash
# Session 12, call 3: blocks of 2-8 rows per program by multiply-adds (dispatch.MULTIPLY_ADD), split over programs:
# the new self-test cases against the unfused generate (twice each), then µs per step for every block x programs.
set -u
export PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
ROOT=$PWD
START=$(date +%s)
left() { echo $(( 570 - ($(date +%s) - START) )); }
CASES="Mamba B=32 block 4 split 16|Mamba B=32 block 2 split 8|Mamba zoh event/step B=20 block 8 split 8|RG-LRU B=32 block 4 split 16|S5 block 4, B=32"
PYTHONPATH=$ROOT timeout 150 python .gpu/diag.py "$CASES" 2 $R/diag_small_blocks.json > $R/diag_small_blocks.txt 2>&1
echo "== diag t=$(( $(date +%s) - START ))"; grep -v Warning $R/diag_small_blocks.txt | cut -c1-170
bench() {  # label args...
  local label=$1; shift
  [ $(left) -lt 30 ] && { echo "skip $label: $(left) s left"; return; }
  PYTHONPATH=$ROOT timeout $(( $(left) < 150 ? $(left) - 5 : 150 )) python -m benchmarks.benchmark_fused_generation --no-loop --no-xla --repeats 10 --warmup 2 --no-plot --out $R/$label.json "$@" > $R/$label.txt 2>&1
  echo "== $label t=$(( $(date +%s) - START ))"; grep "^| [MRLS]" $R/$label.txt | cut -d'|' -f2-5 | tr '\n' ';'; echo
}
bench b32 --models Mamba,RGLRU --batches 32 --block-batch 0 2 4 8 --split-programs 4 8 16
bench b64_256 --models Mamba,RGLRU --batches 64 128 256 --block-batch 0 4 8 16 --split-programs 0 4 8 16
bench b32_again --models Mamba,RGLRU --batches 32 --block-batch 0 2 4 8 --split-programs 4 8 16
bench unsplit --models LRU,S5 --batches 256 4096 --block-batch 0 4 8 16
cd $OUT && tar czf results.tgz r
