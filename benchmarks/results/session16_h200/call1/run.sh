#!/bin/bash
# Session 16, call 1: the captured eager calls (a175a93, 98c3f85) on the H200 (their tests and the host-overhead
# benchmark's captured_step column); S7's cell with x_proj's contractions at the projection precision (working tree)
# against HEAD (.before), alternating fresh processes.
export PYTHONPATH=$PWD
R=$OUT/r; mkdir -p $R
git log --oneline -1 > $R/tree.txt 2>/dev/null; git diff --stat >> $R/tree.txt 2>/dev/null; nvidia-smi -L >> $R/tree.txt
timeout 150 python -m pytest tests/test_model_contract.py tests/test_decoding.py tests/test_generation.py -k "captur or graph" -q -p no:cacheprovider > $R/pytest_captured.txt 2>&1; echo "rc=$?" >> $R/pytest_captured.txt
timeout 170 python -m benchmarks.benchmark_host_overhead --models LRU,Mamba,S4,LM --lm-layers 24 --repeats 200 --out $R/host_overhead.json > $R/host_overhead.txt 2>&1; echo "rc=$?" >> $R/host_overhead.txt
FA="--models S7 --batches 32 1 --steps 512 --repeats 30 --no-cache-runs"
for rep in 1 2; do
  (cd .before && timeout 60 env PYTHONPATH=$PWD:$OLDPWD python -m benchmarks.benchmark_capture $FA --out $R/s7_before_rep$rep.json > $R/s7_before_rep$rep.txt 2>&1)
  timeout 60 python -m benchmarks.benchmark_capture $FA --out $R/s7_after_rep$rep.json > $R/s7_after_rep$rep.txt 2>&1
done
rm -f $R/*.png
cd $OUT && tar czf results.tgz r && rm -rf r
