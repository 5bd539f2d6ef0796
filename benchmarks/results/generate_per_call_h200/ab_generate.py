"""generate through a captured graph (512 steps and 1 step) and the fused runner (control), µs per call, in one
process; run it alternately with the library before and after a change (PYTHONPATH).

    python .gpu/ab_generate.py --tag after --out ab_after1.json
"""
import argparse
import json

import jax
from flax import nnx

from benchmarks.benchmark_fused_generation import MODELS, fused_runner
from benchmarks.benchmark_inference import make_inputs
from benchmarks.timing import median_seconds
from lrnnx_jax import generation
from lrnnx_jax.convert import model_class
from pallas_kernels import dispatch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="LRU,S5,Mamba")
    p.add_argument("--batches", type=int, nargs="+", default=[32, 1])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--tag", required=True)
    p.add_argument("--scale", type=float, default=0.01, help="the random first input's scale (1: may diverge)")
    p.add_argument("--compiler-options", type=json.loads, default=None, help="GenerationConfig.compiler_options")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rows = []
    for batch in args.batches:
        for name in args.models.split(","):
            spec = next(m for m in MODELS if m.name == name)
            model = model_class(spec.lrnnx_name)(**spec.kwargs, rngs=nnx.Rngs(0))
            model.eval()
            x0, _ = make_inputs(batch, model.d_model, False)
            x0 = args.scale * x0  # 0.01: a bounded closed loop (no inf/NaN) for most models
            graph = generation.capture_graph(model, batch, config=generation.GenerationConfig(
                compiler_options=args.compiler_options))
            row = dict(tag=args.tag, scale=args.scale, compiler_options=args.compiler_options, model=name, batch=batch, fused_program=bool(graph.spec.fused))
            for steps in (512, 1):
                run = lambda s=steps: generation.generate(model, x0, s, graph_cache=graph)  # noqa: E731
                row[f"generate{steps}_us"] = 1e6 * median_seconds(run, 5, args.repeats)
            row["finite"] = bool(jax.numpy.all(jax.numpy.isfinite(generation.generate(model, x0, 512, graph_cache=graph))))
            fused = fused_runner(model, x0, None, 512, dispatch.KernelConfig(use_kernels="always"))[0]
            row["fused_runner512_us"] = 1e6 * median_seconds(fused, 5, args.repeats)
            print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
            rows.append(row)
    with open(args.out, "w") as f:
        json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
