#!/bin/bash
# Session 14, call 1: where the fused rollout's per-call cost goes (probe + ncu's kernel list of one call), and the
# host's cost of eager calls on the GPU machine, before (656d0d9's library) and after.
export PYTHONPATH=$PWD
mkdir -p $OUT/r
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv > $OUT/r/gpu.txt
timeout 240 python .gpu/percall_probe.py --models LRU,S5,S4D,S4,Mamba,RGLRU --batch 32 1 --repeats 30 \
  --out $OUT/r/percall.json > $OUT/r/percall.txt 2>&1; echo "probe rc=$?"; grep '^{' $OUT/r/percall.txt
for m in LRU Mamba; do
  timeout 90 ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv \
    python .gpu/percall_probe.py --ncu-one $m --batch 32 > $OUT/r/ncu_onecall_$m.csv 2>&1; echo "ncu $m rc=$?"
  grep -v '^==PROF==' $OUT/r/ncu_onecall_$m.csv | grep -E 'gpu__time|cuProfiler' | cut -c1-250 | head -30
done
for rep in 1 2; do
  timeout 60 env PYTHONPATH=$PWD/.before:$PWD python benchmarks/benchmark_host_overhead.py --lm-layers 24 --repeats 200 \
    --out $OUT/r/host_before_rep$rep.json > $OUT/r/host_before_rep$rep.txt 2>&1; echo "before rc=$?"
  timeout 60 python -m benchmarks.benchmark_host_overhead --lm-layers 24 --repeats 200 \
    --out $OUT/r/host_after_rep$rep.json > $OUT/r/host_after_rep$rep.txt 2>&1; echo "after rc=$?"
done
tail -12 $OUT/r/host_before_rep1.txt $OUT/r/host_after_rep1.txt
cd $OUT && tar czf results.tgz r
