"""Time the Pallas state-update kernels against the pure-XLA step, on the GPU.

    python -m benchmarks.benchmark_state_update [--batches 1 32 256 4096] [--out table.md]

For each op configuration and batch size, one jitted program runs ``--steps``
consecutive steps (unrolled; each step's output is the next step's input, and
the state is donated), once with the kernel and once with the reference. It
reports microseconds per step and the effective bandwidth (each input and the
state read once, the state and the output written once) as a fraction of the
device-to-device copy bandwidth measured in the same run. It also checks that
the kernel updates the donated state in place, and times ``model.step`` of every
model (H=128) on the XLA driver of its cell and on the one-step fused kernel: the
measurement behind each cell's ``KernelPolicy.step_max_batch``.

Needs only jax, flax and numpy; prints Markdown tables (and writes them to ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import copy_bandwidth, median_seconds
from pallas_kernels import dispatch
from pallas_kernels import gpu_selftest as cases

KERNEL = dispatch.KernelConfig(use_kernels="always")
REFERENCE = dispatch.KernelConfig(use_kernels="never")

#: (name, op, builder arguments except batch, KernelConfig changes); H=128 except Mamba (d_model=1024:
#: D=2048). The simplified op runs both of its paths: one row per program and blocks of 16 rows.
OP_CONFIGS = [
    ("Mamba (selective, D=2048, N=16)", "selective", dict(dim=2048, dstate=16), {}),
    ("S5 (simplified zoh, P=64, H=128), 1 row/program", "simplified", dict(P=64, H_in=128, planes=True), dict(block_batch=1)),
    ("S5 (simplified zoh, P=64, H=128), 16 rows/program", "simplified", dict(P=64, H_in=128, planes=True), dict(block_batch=16)),
    ("LRU (simplified, P=64, H=128), 1 row/program", "simplified",
     dict(P=64, H_in=128, planes=True, discretization="no_discretization"), dict(block_batch=1)),
    ("LRU (simplified, P=64, H=128), 16 rows/program", "simplified",
     dict(P=64, H_in=128, planes=True, discretization="no_discretization"), dict(block_batch=16)),
]

#: (name, module, class, kwargs) of the models whose generate is timed
MODELS = [
    ("LRU", "lrnnx_jax.models.lti.lru", "LRU", dict(d_model=128, d_state=64)),
    ("S5 (LTI, zoh)", "lrnnx_jax.models.lti.s5", "S5", dict(d_model=128, d_state=64, discretization="zoh")),
    ("S5 (LTV)", "lrnnx_jax.models.ltv.s5", "S5", dict(d_model=128, d_state=64)),
    ("S4", "lrnnx_jax.models.lti.s4", "S4", dict(d_model=128, d_state=64, transposed=False)),
    ("S4D", "lrnnx_jax.models.lti.s4d", "S4D", dict(d_model=128, d_state=64, transposed=False)),
    ("Centaurus (neck)", "lrnnx_jax.models.lti.centaurus", "Centaurus", dict(d_model=128, d_state=64, sub_state_dim=2)),
    ("Mamba", "lrnnx_jax.models.ltv.mamba", "Mamba", dict(d_model=128, d_state=16)),
    ("RG-LRU", "lrnnx_jax.models.ltv.rglru", "RGLRU", dict(d_model=128)),
    ("S7", "lrnnx_jax.models.ltv.s7", "S7", dict(d_model=128, d_state=64)),
]


def _nbytes(tree) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree) if hasattr(a, "dtype"))


def time_op(op: str, kwargs, config, steps: int, repeats: int) -> float:
    """Seconds per step of ``steps`` chained steps in one jitted program (state donated)."""
    fn = cases.OPS[op]
    static = {k: v for k, v in kwargs.items() if isinstance(v, (str, bool)) or v is None}
    dynamic = {k: v for k, v in kwargs.items() if k not in static and k != "state"}

    def chained(state, inputs):
        inputs = dict(inputs)
        for _ in range(steps):
            y, state = fn(state, **inputs, **static, config=config)
            inputs["x"] = y.astype(inputs["x"].dtype)
        return state

    run = jax.jit(chained, donate_argnums=0)
    holder = [jax.tree.map(jnp.copy, kwargs["state"])]

    def once():
        holder[0] = run(holder[0], dynamic)
        return holder[0]

    jax.block_until_ready(once())
    return median_seconds(once, 0, repeats) / steps


def step_bytes(op: str, kwargs) -> int:
    """Bytes one step must move: every array argument read once, the state and the output written once."""
    out = jax.eval_shape(lambda: cases.OPS[op](**kwargs, config=REFERENCE))[0]
    rest = {k: v for k, v in kwargs.items() if k != "state"}
    return _nbytes(rest) + 2 * _nbytes(kwargs["state"]) + out.size * out.dtype.itemsize


def op_table(batches, steps, repeats, bandwidth):
    rows = ["| op | batch | kernel µs/step | XLA µs/step | speed-up | kernel GB/s | kernel % of copy BW | XLA % of copy BW |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    rng = np.random.default_rng(0)
    for name, op, spec, changes in OP_CONFIGS:
        for batch in batches:
            kwargs = cases.BUILDERS[op](rng, batch=batch, **spec)
            n_bytes = step_bytes(op, kwargs)
            t_kernel = time_op(op, kwargs, dataclasses.replace(KERNEL, **changes), steps, repeats)
            t_ref = time_op(op, kwargs, REFERENCE, steps, repeats)
            rows.append(
                f"| {name} | {batch} | {t_kernel * 1e6:.2f} | {t_ref * 1e6:.2f} | {t_ref / t_kernel:.2f}x | "
                f"{n_bytes / t_kernel / 1e9:.0f} | {100 * n_bytes / t_kernel / bandwidth:.0f}% | "
                f"{100 * n_bytes / t_ref / bandwidth:.0f}% |"
            )
            print(rows[-1], flush=True)
    return rows


def floor_row(steps, repeats):
    """The launch floor: a ``pallas_call`` that only adds 1 to a (32, 128) array, chained like the ops."""
    pl, _ = dispatch.pallas_modules()

    def body(x_ref, o_ref):
        o_ref[...] = x_ref[...] + 1.0

    add_one = pl.pallas_call(body, out_shape=jax.ShapeDtypeStruct((32, 128), jnp.float32),
                             compiler_params=dispatch.compiler_params(KERNEL), interpret=dispatch.interpret_mode(KERNEL))

    def chained(x):
        for _ in range(steps):
            x = add_one(x)
        return x

    run = jax.jit(chained)
    x = jnp.zeros((32, 128), jnp.float32)
    jax.block_until_ready(run(x))
    t = median_seconds(lambda: run(x), 0, repeats) / steps
    return f"Launch floor: a pallas_call adding 1 to a (32, 128) array, chained {steps}x: {t * 1e6:.2f} µs per call"


def in_place_table():
    rows = ["| op | state bytes | aliased bytes | temp bytes | same buffer after the call |", "|---|---:|---:|---:|---|"]
    rng = np.random.default_rng(1)
    for op, spec in (("selective", dict(batch=256, dim=2048, dstate=16)),
                     ("simplified", dict(batch=256, P=64, H_in=128, planes=True))):
        r = cases.in_place_report(op, cases.BUILDERS[op](rng, **spec), KERNEL)
        rows.append(f"| {op} | {r['state_bytes']} | {r['alias_bytes']} | {r['temp_bytes']} | {r['same_buffer']} |")
    return rows


def time_model_step(model, batch: int, config, steps: int, repeats: int) -> float:
    """Seconds per ``model.step`` of ``steps`` chained steps in one jitted program (cache donated)."""
    from flax import nnx

    graphdef, state = nnx.split(model)

    def chained(cache, x):
        m = nnx.merge(graphdef, state)
        for _ in range(steps):
            x, cache = m.step(x, cache, kernel_config=config)
        return cache, x

    run = jax.jit(chained, donate_argnums=0)
    x = jax.random.normal(jax.random.key(0), (batch, model.d_model)) * 0.1
    holder = [model.allocate_inference_cache(batch)]

    def once():
        holder[0], y = run(holder[0], x)
        return y

    jax.block_until_ready(once())
    return median_seconds(once, 0, repeats) / steps


def model_step_table(batches, steps, repeats):
    """µs per ``model.step`` of every model: the XLA driver of its cell (``use_kernels="never"``) and the
    one-step fused kernel (``"always"``; models whose cell it cannot take say so), and what ``"auto"``
    runs on this device by the cell's policy. This is the measurement behind each cell's ``step_max_batch``."""
    from flax import nnx

    from pallas_kernels import fused_generation

    rows = ["| model | batch | XLA driver µs/step | one-step kernel µs/step | kernel speed-up | auto runs |",
            "|---|---:|---:|---:|---:|---|"]
    for name, module, cls, kwargs in MODELS:
        model = getattr(importlib.import_module(module), cls)(**kwargs, rngs=nnx.Rngs(0))
        cell = model.cell()
        for batch in batches:
            t_xla = time_model_step(model, batch, REFERENCE, steps, repeats)
            reason = fused_generation.unsupported_reason(cell, batch, jnp.float32)
            t_kernel = None if reason is not None else time_model_step(model, batch, KERNEL, steps, repeats)
            auto = "XLA" if reason is not None or cell.policy.slower_reason("step", batch) else "kernel"
            kernel = reason if t_kernel is None else f"{t_kernel * 1e6:.2f}"
            speedup = "" if t_kernel is None else f"{t_xla / t_kernel:.2f}x"
            rows.append(f"| {name} | {batch} | {t_xla * 1e6:.2f} | {kernel} | {speedup} | {auto} |")
            print(rows[-1], flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256, 4096])
    parser.add_argument("--steps", type=int, default=16, help="chained steps per timed program")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-models", action="store_true", help="no model.step table")
    parser.add_argument("--skip-ops", action="store_true", help="only the model.step table")
    parser.add_argument("--out", default=None, help="also write the tables (Markdown) here")
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    lines = [f"Device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
             f"kernels interpret={dispatch.interpret_mode(KERNEL)}"]
    bandwidth = copy_bandwidth()
    lines.append(f"Device-to-device copy bandwidth (read + write): {bandwidth / 1e9:.0f} GB/s")
    print("\n".join(lines), flush=True)
    if not args.skip_ops:
        lines += ["", f"### State update, µs per step ({args.steps} chained steps per program, median of {args.repeats})", ""]
        lines += [floor_row(args.steps, args.repeats), ""]
        print(lines[-2], flush=True)
        lines += op_table(args.batches, args.steps, args.repeats, bandwidth)
        lines += ["", "### In-place update (state donated)", ""] + in_place_table()
    if not args.skip_models:
        lines += ["", f"### model.step, µs per step ({args.steps} chained steps per program, median of {args.repeats})", ""]
        lines += model_step_table(args.batches, args.steps, args.repeats)
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
