#!/bin/bash
# Session 15, call 4 (the tree at c2df3fe): A/B of the barrier's arrival without a result (.variant: the atomic add's
# result unused, the spin starts from 0); issue 15's table as a user gets it (capture_graph, then generate, plain and
# through a CapturedModel); the host's cost per call of the layers with a CapturedModel.
export PYTHONPATH=$PWD
R=$OUT/r; mkdir -p $R
FA="--models Mamba,RGLRU --batches 1 32 --no-loop --no-xla --repeats 10 --warmup 2"
for rep in 1 2; do
  timeout 80 python -m benchmarks.benchmark_fused_generation $FA --out $R/arrive_atom_rep$rep.json > $R/arrive_atom_rep$rep.txt 2>&1
  (cd .variant && timeout 80 env PYTHONPATH=$PWD:$OLDPWD python -m benchmarks.benchmark_fused_generation $FA --out $R/arrive_red_rep$rep.json > $R/arrive_red_rep$rep.txt 2>&1)
done
timeout 260 python -m benchmarks.benchmark_capture --models LRU,S5,S4D,ltv.S5,S4,Mamba,RGLRU,S7 --batches 32 1 --steps 512 --repeats 30 --no-cache-runs --out $R/table.json > $R/table.txt 2>&1
timeout 90 python -m benchmarks.benchmark_host_overhead --models LRU,Mamba,S4 --repeats 200 --out $R/host_layers.json > $R/host_layers.txt 2>&1
rm -f $R/*.png
cd $OUT && tar czf results.tgz r && rm -rf r
