"""Tiling of Mamba's training-scan kernels: :mod:`pallas_kernels.selective_scan`'s forward and backward kernels alone.

    python -m benchmarks.benchmark_scan_tiling --configs fwd:256:2:8 bwd:128:2:8 bwd:64:1:8 [--out tiling.json]
    python -m benchmarks.benchmark_scan_tiling --quick      # a tiny CPU smoke run (interpret mode)

Each configuration ``KIND:TILE:WARPS:CHUNK[:LOAD]`` (``KIND`` ``fwd`` or ``bwd``; ``TILE`` the state elements per
program, the module's ``FORWARD_TILE`` / ``BACKWARD_TILE``; ``WARPS`` the warps per program; ``CHUNK`` the steps per
checkpoint; ``LOAD`` the kernel's steps per pipelined load, ``FORWARD_LOAD_STEPS`` / ``BACKWARD_LOAD_STEPS``, the
module's when absent) is jitted alone on the issue's shape (B=32, L=2048, D=256, N=16, float32, discretization ``mamba``,
``D`` and ``z`` given; random inputs, fixed seed), compiled (the seconds are reported: the Triton lowering is
part of them) and timed: the median of ``--repeats`` calls after ``--warmup``. The defaults of
``selective_scan.py`` cite the rows of this benchmark. GPU only for meaningful numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import median_seconds, overridden
from pallas_kernels import KernelConfig
from pallas_kernels import selective_scan as ss

KINDS = ("fwd", "bwd")


def parse_config(text: str) -> dict:
    """``"KIND:TILE:WARPS:CHUNK[:LOAD]"`` -> ``{"kind", "tile", "warps", "chunk", "load"}`` (a ValueError naming the
    text)."""
    parts = text.split(":")
    if len(parts) not in (4, 5) or parts[0] not in KINDS or not all(p.isdigit() and int(p) > 0 for p in parts[1:]):
        raise ValueError(f"a configuration is KIND:TILE:WARPS:CHUNK[:LOAD] with KIND in {KINDS} and positive "
                         f"integers, got {text!r}")
    load = int(parts[4]) if len(parts) == 5 else ss.FORWARD_LOAD_STEPS if parts[0] == "fwd" else ss.BACKWARD_LOAD_STEPS
    return {"kind": parts[0], "tile": int(parts[1]), "warps": int(parts[2]), "chunk": int(parts[3]), "load": load}


def make_inputs(batch: int, length: int, dim: int, N: int, seed: int = 0) -> dict:
    """The scan's inputs at a training-like scale (``delta`` after softplus, ``A`` negative)."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, dtype=np.float32))  # noqa: E731
    return dict(u=normal(batch, length, dim), delta=jax.nn.softplus(normal(batch, length, dim) - 1.0),
                A=-jnp.exp(normal(dim, N) * 0.5), B=normal(batch, length, N), C=normal(batch, length, N),
                D=normal(dim), z=normal(batch, length, dim))


@contextlib.contextmanager
def tiling(config: dict):
    """``selective_scan``'s ``FORWARD_TILE`` and ``BACKWARD_TILE`` set to ``config["tile"]`` and the steps per load of
    ``config["kind"]`` (``FORWARD_LOAD_STEPS`` or ``BACKWARD_LOAD_STEPS``) to ``config["load"]`` (read when a kernel
    is traced)."""
    load = "FORWARD_LOAD_STEPS" if config["kind"] == "fwd" else "BACKWARD_LOAD_STEPS"
    with overridden(ss, FORWARD_TILE=config["tile"], BACKWARD_TILE=config["tile"], **{load: config["load"]}):
        yield


def kernel_call(config: dict, inputs: dict, interpret: bool):
    """The jitted kernel of ``config`` and its arguments (the backward's checkpoints come from the forward kernel at
    the module's tiling: they do not depend on it). The length must be a multiple of the forward's steps per load."""
    kernels = KernelConfig(use_kernels="always", num_warps=config["warps"], interpret=interpret or None)
    chunk = config["chunk"]
    batch, _, dim = inputs["u"].shape
    h0 = jnp.zeros((batch, dim, inputs["A"].shape[-1]), jnp.float32)
    forward = jax.jit(lambda i, h0: ss.forward_kernel(**i, h0=h0, chunk=chunk, config=kernels))
    if config["kind"] == "fwd":
        return forward, (inputs, h0)
    y, h_last, checkpoints = forward(inputs, h0)
    dy = jnp.asarray(np.random.default_rng(1).standard_normal(y.shape, dtype=np.float32))
    backward = jax.jit(lambda i, ckpt, dy, dh: ss.backward_kernel(
        i["u"], i["delta"], i["A"], i["B"], i["C"], i["D"], i["z"], None, None, ckpt, dy, dh, chunk=chunk,
        config=kernels))
    return backward, (inputs, checkpoints, dy, jnp.zeros_like(h_last))


def measure(config: dict, inputs: dict, warmup: int, repeats: int, interpret: bool) -> dict:
    fn, args = kernel_call(config, inputs, interpret)
    with tiling(config):
        start = time.perf_counter()
        compiled = fn.lower(*args).compile()
        compile_s = time.perf_counter() - start
    ms = 1e3 * median_seconds(lambda: compiled(*args), warmup, repeats)
    return {**config, "ms": ms, "compile_s": compile_s}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = [f"fwd:{ss.FORWARD_TILE}:{ss.FORWARD_WARPS}:{ss.DEFAULT_CHUNK}",
                f"bwd:{ss.BACKWARD_TILE}:{ss.BACKWARD_WARPS}:{ss.DEFAULT_CHUNK}"]
    parser.add_argument("--configs", nargs="+", default=defaults,
                        help="KIND:TILE:WARPS:CHUNK[:LOAD] (default: the module's tiling)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=256, help="D (d_inner)")
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat, interpret mode (CPU)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    try:
        configs = [parse_config(c) for c in args.configs]
    except ValueError as error:
        parser.error(str(error))
    if args.quick:
        args.batch, args.length, args.dim, args.d_state, args.warmup, args.repeats = 2, 16, 8, 4, 0, 1
    inputs = make_inputs(args.batch, args.length, args.dim, args.d_state)
    rows = []
    for config in configs:
        rows.append(measure(config, inputs, args.warmup, args.repeats, args.quick))
        print(json.dumps(rows[-1]), flush=True)
    print("| kernel | tile | warps | chunk | steps per load | ms | compile s |\n|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        load = r["load"] if r["kind"] == "fwd" else "-"
        print(f"| {r['kind']} | {r['tile']} | {r['warps']} | {r['chunk']} | {load} | {r['ms']:.3f} | "
              f"{r['compile_s']:.1f} |")
    if args.out:
        record = {"device": jax.devices()[0].device_kind, "versions": f"jax {jax.__version__}, Python "
                  f"{platform.python_version()}", "command": " ".join(sys.argv),
                  "shape": dict(batch=args.batch, length=args.length, dim=args.dim, d_state=args.d_state),
                  "rows": rows}
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
