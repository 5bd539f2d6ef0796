"""Time the speculative-decoding verify step, ``checkpointing_ssu``, against its alternatives, on the GPU.

    python -m benchmarks.benchmark_ssu [--tokens 1 4 8 16] [--batches 1 32 256] [--out ssu.json]
    python -m benchmarks.benchmark_ssu --quick        # a tiny smoke run (CPU: the kernel in interpret mode)

Two shapes: a serving shape (Mamba-2 at Nemotron-3-Super's tensor-parallel 8: nheads 16, headdim 64,
dstate 128, ngroups 1, one A per head) and lrnnx's Mamba shape (the per-channel variant: nheads 1,
dim = d_inner = 2048, dstate 16, as benchmarks/benchmark_state_update.py). For each shape, number of
draft tokens ``T`` and batch (one slot per row, a random number of accepted drafts per slot), one
jitted program runs ``--steps`` consecutive calls (each call's caches feed the next, donated) of:

* ``kernel``: :func:`pallas_kernels.checkpointing_ssu` with the Pallas kernel;
* ``reference``: the same op's pure-JAX reference under ``jax.jit``;
* ``naive``: what storing every draft's state costs: select the accepted draft's state from the
  previous call's ``T`` stored states, then ``T`` single-token updates (the XLA step of
  ``selective_state_update``) keeping all ``T`` states;
* ``single``: one plain single-token ``selective_state_update`` (the faster of its kernel and its
  XLA step), the cost of decoding without speculation.

It prints a Markdown table of microseconds per call and the two targets: at batch 32, the T=8 verify
step within 2x one single-token update; at batch 256, the kernel at least 1.5x faster than the naive
alternative. It also reports the compiled kernel program's memory analysis with the caches donated
(aliased bytes against the caches' bytes, temporary bytes against the state's), and writes
everything as JSON to ``--out``.

Needs only jax, flax and numpy.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import median_seconds
from pallas_kernels import dispatch
from pallas_kernels.checkpointing_ssu import checkpointing_ssu
from pallas_kernels.selective import selective_state_update

KERNEL = dispatch.KernelConfig(use_kernels="always")
REFERENCE = dispatch.KernelConfig(use_kernels="never")
CACHES = ("state", "old_x", "old_B", "old_dt", "old_cumAdt", "cache_buf_idx")

#: name -> (nheads, headdim, dstate, ngroups, per-channel A)
SHAPES = {
    "serving (H=16, P=64, N=128)": (16, 64, 128, 1, False),
    "Mamba (per channel, D=2048, N=16)": (1, 2048, 16, 1, True),
}
QUICK_SHAPES = {
    "serving (quick: H=2, P=8, N=16)": (2, 8, 16, 1, False),
    "Mamba (quick: per channel, D=32, N=4)": (1, 32, 4, 1, True),
}


def make_case(rng, shape, batch: int, T: int):
    """Arguments of :func:`checkpointing_ssu` with one slot per row, caches of ``T`` tokens (consistent running
    sums), a random buffer and a random number of accepted drafts per slot, at realistic steps."""
    H, P, N, G, per_channel = shape
    normal = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))
    lead = (H, P) if per_channel else (H,)
    if per_channel:
        A = -np.broadcast_to(np.arange(1, N + 1, dtype=np.float32), (H, P, N)).copy()
    else:
        A = -rng.uniform(1, 16, H).astype(np.float32)
    old_dt = rng.uniform(1e-3, 0.1, (batch, 2, *lead, T)).astype(np.float32)
    old_cumAdt = np.cumsum(old_dt if per_channel else A[:, None] * old_dt, axis=-1, dtype=np.float32)
    step = rng.uniform(1e-3, 0.1, lead).astype(np.float32)
    return dict(
        state=normal(batch, H, P, N), old_x=normal(batch, T, H, P), old_B=normal(batch, 2, T, G, N),
        old_dt=jnp.asarray(old_dt), old_cumAdt=jnp.asarray(old_cumAdt),
        cache_buf_idx=jnp.asarray(rng.integers(0, 2, batch), jnp.int32),
        prev_num_accepted_tokens=jnp.asarray(rng.integers(0, T + 1, batch), jnp.int32),
        x=normal(batch, T, H, P), dt=0.5 * normal(batch, T, *lead), A=jnp.asarray(A), B=normal(batch, T, G, N),
        C=normal(batch, T, G, N), D=normal(H), z=normal(batch, T, H, P),
        dt_bias=jnp.asarray(step + np.log(-np.expm1(-step))), dt_softplus=True,
    )


def _chained(run, carry, inputs, repeats: int, warmup: int, steps: int) -> float:
    """Seconds per call of ``run(carry, inputs) -> carry`` (``steps`` calls per program; ``carry`` donated)."""
    holder = [jax.tree.map(jnp.copy, carry)]

    def once():
        holder[0] = run(holder[0], inputs)
        return holder[0]

    jax.block_until_ready(once())
    return median_seconds(once, warmup, repeats) / steps


def time_verify(kw, config, steps, repeats, warmup) -> float:
    inputs = {k: v for k, v in kw.items() if k not in CACHES and k != "dt_softplus"}

    def chained(caches, inputs):
        for _ in range(steps):
            _, new = checkpointing_ssu(*caches, **inputs, dt_softplus=True, config=config)
            caches = tuple(getattr(new, k) for k in CACHES)
        return caches

    run = jax.jit(chained, donate_argnums=0)
    return _chained(run, tuple(kw[k] for k in CACHES), inputs, repeats, warmup, steps)


def _per_channel(kw):
    """The single-token op's per-channel layout of A, D and dt_bias, and a function giving token t's dt."""
    H, P, N = kw["state"].shape[1:]
    if kw["A"].ndim == 3:
        A, bias, token_dt = kw["A"], kw["dt_bias"], lambda dt, t: dt[:, t]
    else:
        A = jnp.broadcast_to(kw["A"][:, None, None], (H, P, N))
        bias = jnp.broadcast_to(kw["dt_bias"][:, None], (H, P))
        token_dt = lambda dt, t: jnp.broadcast_to(dt[:, t, :, None], dt.shape[:1] + (H, P))
    return A, jnp.broadcast_to(kw["D"].reshape(H, -1), (H, P)), bias, token_dt


def time_naive(kw, steps, repeats, warmup) -> float:
    """Store every draft's state: read the accepted one, run T single-token XLA steps, write all T states."""
    A, D, bias, token_dt = _per_channel(kw)
    T = kw["x"].shape[1]
    rep = kw["state"].shape[1] // kw["B"].shape[2]
    rows = jnp.arange(kw["state"].shape[0])

    def call(carry, inputs):
        state, drafts = carry  # (S, H, P, N): the last checkpoint; (S, T, H, P, N): the previous call's draft states
        K = inputs["prev_num_accepted_tokens"]
        accepted = drafts[rows, jnp.maximum(K - 1, 0)]
        h = jnp.where((K > 0)[:, None, None, None], accepted, state)
        states, h_t = [], h
        for t in range(T):
            B, C = (jnp.repeat(inputs[k][:, t], rep, axis=1) for k in ("B", "C"))
            _, h_t = selective_state_update(h_t, inputs["x"][:, t], token_dt(inputs["dt"], t), A, B, C, D, inputs["z"][:, t],
                                            bias, True, config=REFERENCE)
            states.append(h_t)
        return h, jnp.stack(states, axis=1)

    def chained(carry, inputs):
        for _ in range(steps):
            carry = call(carry, inputs)
        return carry

    run = jax.jit(chained, donate_argnums=0)
    drafts = jnp.broadcast_to(kw["state"][:, None], (kw["state"].shape[0], T) + kw["state"].shape[1:])
    inputs = {k: kw[k] for k in ("prev_num_accepted_tokens", "x", "dt", "B", "C", "z")}
    return _chained(run, (kw["state"], drafts), inputs, repeats, warmup, steps)


def time_single(kw, config, steps, repeats, warmup) -> float:
    """One single-token ``selective_state_update`` (the first draft token), state donated."""
    A, D, bias, token_dt = _per_channel(kw)
    rep = kw["state"].shape[1] // kw["B"].shape[2]
    inputs = dict(x=kw["x"][:, 0], dt=token_dt(kw["dt"], 0), B=jnp.repeat(kw["B"][:, 0], rep, axis=1),
                  C=jnp.repeat(kw["C"][:, 0], rep, axis=1), z=kw["z"][:, 0])

    def chained(state, inputs):
        for _ in range(steps):
            _, state = selective_state_update(state, inputs["x"], inputs["dt"], A, inputs["B"], inputs["C"], D, inputs["z"],
                                              bias, True, config=config)
        return state

    run = jax.jit(chained, donate_argnums=0)
    return _chained(run, kw["state"], inputs, repeats, warmup, steps)


def memory_report(kw) -> dict:
    """The compiled kernel program with the caches donated: aliased and temporary bytes."""
    inputs = {k: v for k, v in kw.items() if k not in CACHES and k != "dt_softplus"}
    fn = jax.jit(lambda caches, inputs: checkpointing_ssu(*caches, **inputs, dt_softplus=True, config=KERNEL), donate_argnums=0)
    analysis = fn.lower(tuple(kw[k] for k in CACHES), inputs).compile().memory_analysis()
    return dict(cache_bytes=int(sum(kw[k].nbytes for k in CACHES)), state_bytes=int(kw["state"].nbytes),
                alias_bytes=getattr(analysis, "alias_size_in_bytes", None), temp_bytes=getattr(analysis, "temp_size_in_bytes", None))


def run(shapes, tokens, batches, steps, repeats, warmup):
    """Time every configuration; returns ``(rows, table lines)``."""
    rng = np.random.default_rng(0)
    rows = []
    lines = ["| shape | T | batch | kernel µs | reference µs | naive µs | single-token µs | kernel / single | naive / kernel |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, shape in shapes.items():
        for T in tokens:
            for batch in batches:
                kw = make_case(rng, shape, batch, T)
                t_kernel = time_verify(kw, KERNEL, steps, repeats, warmup)
                t_ref = time_verify(kw, REFERENCE, steps, repeats, warmup)
                t_naive = time_naive(kw, steps, repeats, warmup)
                t_single_kernel = time_single(kw, KERNEL, steps, repeats, warmup)
                t_single_xla = time_single(kw, REFERENCE, steps, repeats, warmup)
                t_single = min(t_single_kernel, t_single_xla)
                row = dict(shape=name, T=T, batch=batch, kernel_us=t_kernel * 1e6, reference_us=t_ref * 1e6,
                           naive_us=t_naive * 1e6, single_us=t_single * 1e6, single_kernel_us=t_single_kernel * 1e6,
                           single_xla_us=t_single_xla * 1e6, kernel_over_single=t_kernel / t_single,
                           naive_over_kernel=t_naive / t_kernel)
                rows.append(row)
                lines.append(f"| {name} | {T} | {batch} | {row['kernel_us']:.2f} | {row['reference_us']:.2f} | "
                             f"{row['naive_us']:.2f} | {row['single_us']:.2f} | {row['kernel_over_single']:.2f}x | "
                             f"{row['naive_over_kernel']:.2f}x |")
                print(lines[-1], flush=True)
    return rows, lines


def targets(rows) -> list[dict]:
    """The two targets, per shape, where the run has the rows: T=8 verify <= 2x single at batch 32; naive >= 1.5x kernel
    at batch 256."""
    out = []
    for row in rows:
        if row["T"] == 8 and row["batch"] == 32:
            out.append(dict(shape=row["shape"], target="T=8 verify <= 2x one single-token update at batch 32",
                            value=row["kernel_over_single"], met=row["kernel_over_single"] <= 2.0))
        if row["batch"] == 256:
            out.append(dict(shape=row["shape"], T=row["T"], target="kernel >= 1.5x faster than naive at batch 256",
                            value=row["naive_over_kernel"], met=row["naive_over_kernel"] >= 1.5))
    return out


def _target_line(goal) -> str:
    where = goal["shape"] + (f", T={goal['T']}" if "T" in goal else "")
    return f"- {where}: {goal['target']}: {goal['value']:.2f}x, {'met' if goal['met'] else 'NOT met'}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 8, 16], help="draft tokens T per call")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--steps", type=int, default=8, help="chained calls per timed program")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, T 1 and 4, batches 1 and 2, one repeat (a smoke run)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    shapes = SHAPES
    if args.quick:
        shapes, args.tokens, args.batches, args.steps, args.repeats, args.warmup = QUICK_SHAPES, [1, 4], [1, 2], 1, 1, 1

    device = jax.devices()[0]
    header = (f"Device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
              f"kernels interpret={dispatch.interpret_mode(KERNEL)}; {args.steps} chained calls per program, "
              f"median of {args.repeats}")
    print(header, flush=True)
    rows, lines = run(shapes, args.tokens, args.batches, args.steps, args.repeats, args.warmup)
    goals = targets(rows)
    lines += ["", "Targets:"] + ([_target_line(g) for g in goals] or ["- none in this run (they need T=8 at batch 32, and batch 256)"])
    first_shape = next(iter(shapes.values()))
    memory = memory_report(make_case(np.random.default_rng(1), first_shape, 2 if args.quick else 32, 4 if args.quick else 8))
    lines += ["", f"In place (kernel, caches donated, {next(iter(shapes))}): {memory['alias_bytes']} of {memory['cache_bytes']} "
                  f"cache bytes aliased; {memory['temp_bytes']} temporary bytes (state: {memory['state_bytes']})"]
    print("\n" + header + "\n\n" + "\n".join(lines))
    if args.out:
        result = dict(device=device.device_kind, backend=jax.default_backend(), jax=jax.__version__,
                      interpret=dispatch.interpret_mode(KERNEL), steps=args.steps, repeats=args.repeats, rows=rows,
                      targets=goals, memory=memory, command="python -m benchmarks.benchmark_ssu " + " ".join(sys.argv[1:] if argv is None else argv))
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
