#!/bin/bash
# Session 15, call 3 (the tree at 447e518): the landed barrier spin's self-test for RG-LRU; A/B: no CTA barrier after
# the spin (.variant); S4 on the barrier instead of its tagged words (.variant2); a warps sweep of the split cells;
# where capture_graph's seconds go (JAX's compile events) for the models whose capture exceeded 1 s.
export PYTHONPATH=$PWD
R=$OUT/r; mkdir -p $R
timeout 120 python -m pallas_kernels.gpu_fused_selftest --only RG-LRU > $R/selftest_rglru.txt 2>&1
FA="--models Mamba,RGLRU --batches 1 32 --no-loop --no-xla --repeats 10 --warmup 2"
FB="--models S4 --batches 1 8 32 --no-loop --no-xla --repeats 10 --warmup 2"
for rep in 1 2; do
  timeout 90 python -m benchmarks.benchmark_fused_generation $FA --out $R/postbar_main_rep$rep.json > $R/postbar_main_rep$rep.txt 2>&1
  (cd .variant && timeout 90 env PYTHONPATH=$PWD:$OLDPWD python -m benchmarks.benchmark_fused_generation $FA --out $R/postbar_none_rep$rep.json > $R/postbar_none_rep$rep.txt 2>&1)
  timeout 90 python -m benchmarks.benchmark_fused_generation $FB --out $R/s4_tagged_rep$rep.json > $R/s4_tagged_rep$rep.txt 2>&1
  (cd .variant2 && timeout 90 env PYTHONPATH=$PWD:$OLDPWD python -m benchmarks.benchmark_fused_generation $FB --out $R/s4_barrier_rep$rep.json > $R/s4_barrier_rep$rep.txt 2>&1)
done
timeout 120 python -m benchmarks.benchmark_fused_generation --models Mamba,RGLRU --batches 1 32 --no-loop --no-xla --num-warps 4 8 16 --repeats 10 --warmup 2 --out $R/warps.json > $R/warps.txt 2>&1
for mb in "Mamba 32" "S4 1" "RGLRU 1" "S7 32"; do
  set -- $mb
  timeout 60 python .gpu/capture_probe.py $1 $2 $R/capture_probe_$1_$2.json > /dev/null 2>&1
done
rm -f $R/*.png
cd $OUT && tar czf results.tgz r && rm -rf r
