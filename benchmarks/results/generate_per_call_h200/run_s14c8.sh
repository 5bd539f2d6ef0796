#!/bin/bash
# Session 14, call 8: the generation program with and without XLA's command buffers (CUDA graphs), alternating.
export PYTHONPATH=$PWD
mkdir -p $OUT/r
for rep in 1 2; do
  timeout 100 python .gpu/ab_generate.py --tag default --out $OUT/r/cmdbuf_default_rep$rep.json 2>&1 | grep '^{'
  timeout 100 python .gpu/ab_generate.py --tag no_cmdbuf --compiler-options '{"xla_gpu_enable_command_buffer": ""}' \
    --out $OUT/r/cmdbuf_off_rep$rep.json 2>&1 | grep '^{'
done
