"""Training speed of Mamba's scan: the XLA path against the Pallas training-scan kernels (forward + backward).

    python -m benchmarks.benchmark_train_scan                 # the issue's point, on a GPU
    python -m benchmarks.benchmark_train_scan --quick         # a tiny CPU smoke run (kernels in interpret mode)
    python -m benchmarks.benchmark_train_scan --out results/train_scan_h200.json

For each path (``xla``: ``KernelConfig(use_kernels="never")``, the chunked associative scan;
``kernels``: ``use_kernels="always"``, :mod:`pallas_kernels.selective_scan`) and each level

* ``model``: ``jit(grad(sum(Mamba(x))))`` w.r.t. every parameter and ``x`` (the issue's measurement:
  B=32, d_model=128 (D=256), L=2048, d_state=16; lrnnx's CUDA scan was reported at 5.85 ms on an H200 and
  this library's XLA path at 28.4 ms; lrnnx numbers are not printed here, they come only from a results
  file of the same device kind);
* ``scan``: the scan alone, ``jit(grad(sum(y) + sum(h_last)))`` w.r.t. all its inputs, on the same shapes,

it compiles the program (the compile time is reported: the Triton lowering is part of it), reads XLA's
memory analysis of the compiled program (``peak = argument + output + temp - alias``), and reports the
median wall time after warm-up (:func:`benchmarks.timing.median_seconds`). The two paths' gradients are
compared (relative error of every leaf against the XLA path) before timing.

GPU only for meaningful numbers; on a CPU the kernels run in Pallas interpret mode (``--quick`` checks the
script end to end).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.benchmark_scan_memory import memory_stats
from benchmarks.timing import median_seconds
from lrnnx_jax.models.ltv import mamba as mamba_module
from lrnnx_jax.models.ltv.mamba import Mamba
from pallas_kernels import KernelConfig
from pallas_kernels import selective_scan as ss

PATHS = {"xla": KernelConfig(use_kernels="never"), "kernels": KernelConfig(use_kernels="always")}
LEVELS = ("model", "scan")
MiB = 2**20


def model_step(model: Mamba, x, tau):
    """``jit(grad(sum(model(x))))`` w.r.t. the parameters and ``x``, and its arguments."""
    graphdef, params = nnx.split(model)

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x, tau))

    return jax.jit(jax.grad(loss, argnums=(0, 1))), (params, x)


def scan_inputs(model: Mamba, x, tau):
    """The scan's inputs as the model's forward computes them: ``u``, ``delta``, ``B``, ``C``, ``z``, ``A``, ``D``,
    ``h0`` and ``dtA_bias`` (event mode's ``delta_A = event_step(tau, dtA_bias)``)."""
    from lrnnx_jax.core import conv

    x_in, z = model._split_in_proj(x)
    u = jax.nn.silu(conv.causal_conv1d(x_in, model.conv_weight[...], model._conv_bias()))
    inputs = model._ssm_inputs(u, z, None)
    return {**inputs, "A": model._A(), "D": model.D[...], "dtA_bias": model.dtA_proj.bias[...],
            "h0": jnp.zeros((x.shape[0], model.d_inner, model.d_state), x.dtype)}


def scan_step(model: Mamba, path: str, x, tau, chunk: int):
    """``jit(grad(sum(y) + sum(h_last)))`` of the scan alone, w.r.t. all its inputs, and its arguments."""
    arrays = jax.jit(lambda x: scan_inputs(model, x, tau))(x)

    def loss(a):
        if path == "kernels":
            delta_A = None if tau is None else mamba_module.event_step(tau, a["dtA_bias"])
            y, h = ss.kernel_scan(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], delta_A, None, a["h0"],
                                  discretization=model.discretization, chunk=chunk, config=PATHS[path])
        else:  # the model's XLA path
            inputs = {k: a[k] for k in ("u", "delta", "B", "C", "z")}
            if tau is not None:
                inputs["tau"] = tau
            y, h = mamba_module.selective_scan(inputs, a["A"], a["dtA_bias"], a["D"], a["h0"],
                                               discretization=model.discretization, chunk_size=model.chunk_size)
        return jnp.sum(y) + jnp.sum(h)

    return jax.jit(jax.grad(loss)), (arrays,)


def relative_errors(ours, theirs) -> float:
    """The largest ``max|ours - theirs| / max|theirs|`` over the leaves (leaves of zeros skipped)."""
    worst = 0.0
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        scale = float(jnp.max(jnp.abs(b)))
        if scale > 0:
            worst = max(worst, float(jnp.max(jnp.abs(a - b))) / scale)
    return worst


def measure(args) -> list[dict]:
    rng = np.random.default_rng(args.seed)
    x = jnp.asarray(rng.standard_normal((args.batch, args.length, args.d_model)), jnp.float32)
    tau = jnp.asarray(rng.uniform(0.5, 1.5, (args.batch, args.length)), jnp.float32) if args.event else None
    rows = []
    for level in args.levels:
        results = {}
        for path in args.paths:
            model = Mamba(d_model=args.d_model, d_state=args.d_state, discretization=args.discretization,
                          kernel_config=PATHS[path], rngs=nnx.Rngs(args.seed))
            fn, fn_args = model_step(model, x, tau) if level == "model" else scan_step(model, path, x, tau, args.chunk)
            row = {"level": level, "path": path}
            start = time.perf_counter()
            compiled = fn.lower(*fn_args).compile()
            row["compile_s"] = time.perf_counter() - start
            row.update(memory_stats(compiled))
            results[path] = compiled(*fn_args)
            row["median_ms"] = 1e3 * median_seconds(lambda: compiled(*fn_args), args.warmup, args.repeats)
            rows.append(row)
        if "xla" in results and "kernels" in results:
            for row in rows:
                if row["level"] == level and row["path"] == "kernels":
                    row["max_relative_error_vs_xla"] = relative_errors(results["kernels"], results["xla"])
        for row in rows:
            if row["level"] == level:
                print(markdown_row(row), flush=True)
    return rows


def markdown_row(row: dict) -> str:
    error = row.get("max_relative_error_vs_xla")
    return (f"| {row['level']} | {row['path']} | {row['median_ms']:.3f} | {row['peak_bytes'] / MiB:.1f} "
            f"| {row['temp_size_in_bytes'] / MiB:.1f} | {row['compile_s']:.1f} | {'-' if error is None else f'{error:.1e}'} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=128, help="H (D = 2 H)")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--discretization", default="mamba", choices=ss.DISCRETIZATIONS)
    parser.add_argument("--event", action="store_true", help="event mode (integration_timesteps)")
    parser.add_argument("--chunk", type=int, default=ss.DEFAULT_CHUNK, help="steps per checkpoint of the kernels")
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS))
    parser.add_argument("--levels", nargs="+", choices=LEVELS, default=list(LEVELS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat: a smoke run (CPU)")
    parser.add_argument("--out", help="write the rows as JSON to this path")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.d_model, args.length, args.d_state, args.warmup, args.repeats = 2, 8, 32, 4, 1, 1
        args.chunk = min(args.chunk, 8)

    device = jax.devices()[0]
    env = {"device": f"{device.platform}:{device.device_kind}", "num_cpu_cores": os.cpu_count(), "jax": jax.__version__,
           "python": platform.python_version(),
           "config": {k: getattr(args, k) for k in ("batch", "d_model", "length", "d_state", "discretization", "event",
                                                    "chunk", "warmup", "repeats", "seed")}}
    print(f"Mamba(d_model={args.d_model}, d_state={args.d_state}, {args.discretization}) forward + backward, "
          f"B={args.batch}, L={args.length}{', event mode' if args.event else ''}; {env['device']}, jax {env['jax']}")
    if device.platform != "gpu":
        print("not on a GPU: the kernels run in Pallas interpret mode; the times say nothing about the kernels")
    print("| level | path | median ms | peak MiB | temp MiB | compile s | max rel. error vs xla |")
    print("|---|---|---:|---:|---:|---:|---:|")
    rows = measure(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": env, "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
