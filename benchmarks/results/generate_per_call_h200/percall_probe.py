"""Where a fused rollout's per-call cost goes: the whole jitted fused_generate against its parts.

    python .gpu/percall_probe.py --models LRU,S5,S4,Mamba --batch 32 --out percall.json
    ncu --profile-from-start off --metrics gpu__time_duration.sum --csv python .gpu/percall_probe.py --ncu-one LRU

Timed (median of --repeats after --warmup, µs per call, until ready):
  full_N      the benchmark's jitted fused_generate over N steps (N = steps, steps // 2)
  kernel_N    run_cell alone with the cell's parameters precomputed (as jit arguments)
  prep        the cell's parameters from the model's leaves (model.cell().params), jitted
  floor       a jitted x + 1 on x0 (dispatch floor)
  pallas_floor a one-program pallas_call writing x0 + 1
"""
import argparse
import ctypes
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.benchmark_fused_generation import MODELS, fused_runner
from benchmarks.benchmark_inference import make_inputs
from benchmarks.timing import median_seconds
from lrnnx_jax.convert import model_class
from pallas_kernels import dispatch
from pallas_kernels import fused_generation as fg

ALWAYS = dispatch.KernelConfig(use_kernels="always")


def profiler(start: bool):
    cuda = ctypes.CDLL("libcuda.so.1")
    ctx = ctypes.c_void_p()
    cuda.cuInit(0)
    dev = ctypes.c_int()
    cuda.cuDeviceGet(ctypes.byref(dev), 0)
    cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev)
    cuda.cuCtxSetCurrent(ctx)
    rc = cuda.cuProfilerStart() if start else cuda.cuProfilerStop()
    print("cuProfiler", "start" if start else "stop", rc, flush=True)


def runners(name: str, batch: int, steps: int):
    spec = next(m for m in MODELS if m.name == name)
    model = model_class(spec.lrnnx_name)(**spec.kwargs, rngs=nnx.Rngs(0))
    x0, _ = make_inputs(batch, model.d_model, False)
    treedef, leaves = jax.tree.structure(model), jax.tree.leaves(model)
    config = dispatch.resolve(ALWAYS)

    prep = jax.jit(lambda leaves: jax.tree.unflatten(treedef, leaves).cell().params)
    params = prep(leaves)
    cell = model.cell()
    state0 = model.cell_state(model.allocate_inference_cache(batch))
    row_inputs = model.cell_inputs((batch,), None)

    def kernel(n):
        @jax.jit
        def run(params, x0, state):
            return fg.run_cell(cell._replace(params=params), state, x0, n, row_inputs, config=config)[0]
        return lambda: run(params, x0, state0)

    floor = jax.jit(lambda x: x + 1)
    out = {
        f"full_{steps}": fused_runner(model, x0, None, steps, ALWAYS)[0],
        f"full_{steps // 2}": fused_runner(model, x0, None, steps // 2, ALWAYS)[0],
        f"kernel_{steps}": kernel(steps),
        f"kernel_{steps // 2}": kernel(steps // 2),
        "prep": lambda: prep(leaves),
        "floor": lambda: floor(x0),
    }
    return out


def pallas_floor(x0):
    pl, _ = dispatch.pallas_modules()

    def body(x_ref, o_ref):
        o_ref[...] = x_ref[...] + 1.0

    call = jax.jit(pl.pallas_call(body, out_shape=jax.ShapeDtypeStruct(x0.shape, x0.dtype),
                                  interpret=jax.default_backend() == "cpu"))
    return lambda: call(x0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="LRU,S5,S4,Mamba")
    p.add_argument("--batch", type=int, nargs="+", default=[32])
    p.add_argument("--steps", type=int, default=512)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--ncu-one", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.ncu_one:
        fns = runners(args.ncu_one, args.batch[0], args.steps)
        for fn in fns.values():
            for _ in range(2):
                jax.block_until_ready(fn())
        full = fns[f"full_{args.steps}"]
        profiler(True)
        jax.block_until_ready(full())
        profiler(False)
        return
    rows = []
    for batch in args.batch:
        x0, _ = make_inputs(batch, 128, False)
        base = median_seconds(pallas_floor(x0), args.warmup, args.repeats)
        for name in args.models.split(","):
            fns = runners(name, batch, args.steps)
            row = dict(model=name, batch=batch, pallas_floor_us=1e6 * base)
            for key, fn in fns.items():
                row[f"{key}_us"] = 1e6 * median_seconds(fn, args.warmup, args.repeats)
            s, h = args.steps, args.steps // 2
            for kind in ("full", "kernel"):
                per_step = (row[f"{kind}_{s}_us"] - row[f"{kind}_{h}_us"]) / (s - h)
                row[f"{kind}_step_us"] = per_step
                row[f"{kind}_call_us"] = row[f"{kind}_{s}_us"] - s * per_step
            print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
            rows.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=str(jax.devices()[0]), jax=jax.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
