#!/usr/bin/env bash
# Session 12, call 1. (1) S5 LTI: hoisting rule x skip orientation on the working tree (KernelPolicy.hoist, landed
# "largest" for lti.S5), alternating; the S5 self-test cases on the working tree. (2) one_load (.after = HEAD +
# .gpu/one_load.patch) against .before (HEAD) with the barrier exchange (as landed for Mamba and RG-LRU).
set -u
export PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
START=$(date +%s)
left() { echo $(( 560 - ($(date +%s) - START) )); }
s5() {  # hoist skip label
  PYTHONPATH=$PWD timeout 90 python .gpu/s5_variants.py $1 $2 $R/s5_$3.json > $R/s5_$3.txt 2>&1
  echo "== s5 $3 ($1 $2) t=$(( $(date +%s) - START ))"; grep "^| S5" $R/s5_$3.txt | cut -d'|' -f2-5 | tr '\n' ';'; echo
}
s5 largest dense L1; s5 smallest dense S1; s5 largest axis0 LA1; s5 smallest axis0 SA1
s5 largest dense L2; s5 smallest dense S2; s5 largest axis0 LA2
PYTHONPATH=$PWD timeout 100 python -m pallas_kernels.gpu_fused_selftest --only S5 --out $R/selftest_s5.json > $R/selftest_s5.txt 2>&1
echo "== selftest S5 t=$(( $(date +%s) - START ))"; grep -v Warning $R/selftest_s5.txt | tail -15 | cut -c1-150
CASES="Mamba|RG-LRU k2 bias|Mamba B=1|Mamba B=32 block 16 split 16|S4|S4 B=1 split 8|RG-LRU B=3 split 8"
rows() {  # tree label
  [ $(left) -lt 70 ] && { echo "skip rows $2: $(left) s left"; return; }
  (cd $1 && PYTHONPATH=$1 timeout $(( $(left) < 110 ? $(left) - 5 : 110 )) python -m benchmarks.benchmark_fused_generation --models Mamba,RGLRU,S4 --batches 1 8 32 --no-loop --no-xla --repeats 10 --warmup 2 --no-plot --out $R/rows_$2.json > $R/rows_$2.txt 2>&1)
  echo "== rows $2 t=$(( $(date +%s) - START ))"; grep "^| [MRS]" $R/rows_$2.txt | cut -d'|' -f2-5 | tr '\n' ';'; echo
}
(cd $PWD/.after && PYTHONPATH=$PWD/.after timeout 100 python $OLDPWD/.gpu/diag.py "$CASES" 1 $R/diag_after_barrier.json > $R/diag_after_barrier.txt 2>&1)
echo "== diag after barrier t=$(( $(date +%s) - START ))"; grep -v Warning $R/diag_after_barrier.txt | cut -c1-120
rows $PWD/.after after_barrier_1
rows $PWD/.before before_barrier_1
rows $PWD/.after after_barrier_2
rows $PWD/.before before_barrier_2
cd $OUT && tar czf results.tgz r
