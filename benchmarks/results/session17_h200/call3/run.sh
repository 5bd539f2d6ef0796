#!/bin/bash
# Session 17, call 3 (the tree at ea2d80b: S5 LTI's dense skip folded with C B_bar,
# the output read from the decayed previous state; .before = 237b902): S5 LTI as a user gets it (capture_graph, then
# generate, module / CapturedModel) and the fused rollout at B = 1, 8, 32, alternating fresh processes; the fused
# self-test's S5 and LRU cases on the patched tree.
export PYTHONPATH=$PWD
R=$OUT/r; mkdir -p $R
CA="--models S5 --batches 32 1 --steps 512 --repeats 30 --no-cache-runs"
FA="--models S5,S5-event --batches 1 8 32 --no-loop --no-xla --repeats 10 --warmup 2 --no-plot"
for rep in 1 2 3; do
  (cd .before && timeout 60 env PYTHONPATH=$PWD:$OLDPWD python -m benchmarks.benchmark_capture $CA --out $R/capture_before_rep$rep.json > $R/capture_before_rep$rep.txt 2>&1)
  timeout 60 python -m benchmarks.benchmark_capture $CA --out $R/capture_after_rep$rep.json > $R/capture_after_rep$rep.txt 2>&1
done
for rep in 1 2; do
  (cd .before && timeout 60 env PYTHONPATH=$PWD:$OLDPWD python -m benchmarks.benchmark_fused_generation $FA --out $R/fused_before_rep$rep.json > $R/fused_before_rep$rep.txt 2>&1)
  timeout 60 python -m benchmarks.benchmark_fused_generation $FA --out $R/fused_after_rep$rep.json > $R/fused_after_rep$rep.txt 2>&1
done
timeout 60 python -m pallas_kernels.gpu_fused_selftest --only S5 > $R/selftest_s5.txt 2>&1; echo "rc=$?" >> $R/selftest_s5.txt
timeout 60 python -m pallas_kernels.gpu_fused_selftest --only LRU > $R/selftest_lru.txt 2>&1; echo "rc=$?" >> $R/selftest_lru.txt
timeout 120 python -m pytest -q -p no:cacheprovider tests/test_pallas_fused_generation.py -k "dense_skip" > $R/pytest_dense_skip.txt 2>&1
cd $OUT && tar czf results.tgz r && rm -rf r
