#!/bin/bash
# Session 14, call 4: generate (captured, 512 steps and 1 step) before (HEAD f98cbcd's library) and after the
# per-call cuts, alternating fresh processes, with the fused runner as the control.
export PYTHONPATH=$PWD
mkdir -p $OUT/r
for rep in 1 2; do
  timeout 100 env PYTHONPATH=$PWD/.before:$PWD python .gpu/ab_generate.py --tag before --out $OUT/r/ab_before_rep$rep.json 2>&1 | grep '^{'
  timeout 100 python .gpu/ab_generate.py --tag after --out $OUT/r/ab_after_rep$rep.json 2>&1 | grep '^{'
done
cd $OUT && tar czf results.tgz r
