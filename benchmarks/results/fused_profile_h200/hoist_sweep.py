"""Session 13: fused rollouts under several register budgets (fused_generation.HOIST_PER_WARP), alternating, one
process per model. Writes every benchmark row with its budget and repetition."""
import argparse, json, os, sys, tempfile
import jax
import pallas_kernels.fused_generation as fg
from benchmarks import benchmark_fused_generation as bench

p = argparse.ArgumentParser()
p.add_argument("--model"); p.add_argument("--batches", nargs="+"); p.add_argument("--hoists", type=int, nargs="+")
p.add_argument("--warps", nargs="+", default=["0"]); p.add_argument("--reps", type=int, default=2); p.add_argument("--out")
a = p.parse_args()
rows = []
for rep in range(a.reps):
    for h in a.hoists:
        fg.HOIST_PER_WARP = h
        jax.clear_caches()
        path = tempfile.mktemp(suffix=".json")
        bench.main(["--models", a.model, "--batches", *a.batches, "--no-xla", "--no-loop", "--repeats", "10", "--warmup", "2",
                    "--no-plot", "--num-warps", *a.warps, "--out", path])
        for r in json.load(open(path))["rows"]:
            r.update(hoist_per_warp=h, rep=rep)
            rows.append(r)
            print(f"RESULT {a.model} B={r['batch']} {r['variant']} hoist={h} rep={rep}: {r.get('fused_us')} {r.get('note', '')}", flush=True)
        json.dump(rows, open(a.out, "w"), indent=1)
