#!/bin/bash
# Session 13, call 2: Nsight Compute on the fused rollouts at B=32 (and Mamba's split at B=1); S5 LTI with every
# parameter in registers (HOIST_PER_WARP 3200) against today's 2560.
export PYTHONPATH=$PWD
mkdir -p $OUT/r
(which ncu; ncu --version) > $OUT/r/ncu_version.txt 2>&1
prof() {  # name model batch
  timeout 110 ncu --clock-control none --set full -k regex:fused_generation -c 1 --csv --page details \
    python -m benchmarks.benchmark_fused_generation --models $2 --batches $3 --no-xla --no-loop --repeats 1 --warmup 0 --no-plot \
    > $OUT/r/ncu_$1.csv 2> $OUT/r/ncu_$1.err
  echo "$1 rc=$? lines=$(wc -l < $OUT/r/ncu_$1.csv)"
}
prof lru_b32 LRU 32
prof s5_b32 S5 32
prof mamba_b32 Mamba 32
prof mamba_b1 Mamba 1
prof s4_b32 S4 32
for rep in 1 2; do for h in 2560 3200; do
  timeout 80 python -c "import sys; import pallas_kernels.fused_generation as fg; fg.HOIST_PER_WARP=$h; from benchmarks import benchmark_fused_generation as b; b.main(sys.argv[1:])" \
    --models S5 --batches 32 1 --no-xla --no-loop --repeats 10 --warmup 2 --no-plot --out $OUT/r/s5_hoist${h}_rep${rep}.json > $OUT/r/s5_hoist${h}_rep${rep}.txt 2>&1
  echo "hoist $h rep $rep rc=$?"; grep -E "^\| S5" $OUT/r/s5_hoist${h}_rep${rep}.txt
done; done
cd $OUT && tar czf results.tgz r
