"""The latency of one exchange between the programs of a split row: global memory (Triton) against a block cluster's
shared memory (Mosaic GPU).

    python -m benchmarks.benchmark_split_exchange [--backends triton,mosaic] [--sizes 2 4 8 16] [--out result.json]

A split rollout (``pallas_kernels.fused_generation``, issue 15) runs a row on ``P`` programs that add their partial
sums every step: the Triton kernels through global memory, meeting at an atomic counter or on tagged words
(``Split.exchange``). Mamba's split over 16 programs takes about 5 µs per step with two exchanges, and a step under
4.5 µs at B=32 needs the weights shared on chip by the rows, which a block cluster's shared memory could hold. This
benchmark measures the exchange alone, so that the two are compared before a kernel is built on either:

* ``triton``: :func:`pallas_kernels.fused_generation.run_cell` on a toy split cell (``W, V`` of ``(256, 128)`` split
  along 256 channels over ``P`` programs: ``h = h / 2 + W x``, ``y = psum(V^T h) / 10``, fed back), each exchange of
  ``Split.exchange``, at ``--batches`` rows (combinations that cannot all be resident are refused and reported);
* ``mosaic``: a ``plgpu.kernel`` of ``--clusters`` clusters of ``P`` blocks, each block's ``(128,)`` vector
  written to its shared memory (one array per slot), a ``ClusterBarrier`` per slot, the ``P`` vectors read with
  ``plgpu.cluster_ref`` and summed, ``v <- sum_j v_j / (2P) + (c + 1) / 100``.

A row's ``batch`` is its rows (Triton) or clusters (Mosaic: one row's exchange each). Each rollout of ``--steps``
steps is checked (against the unsplit XLA driver of the cell, or a float64 NumPy
recurrence), then timed: the median of ``--repeats`` calls after ``--warmup``, in µs per step (one exchange each),
with the ratio to the Triton barrier at the same ``P`` in the same run (at the same batch; B=1 for a cluster). Both need an NVIDIA GPU to
time; on the CPU the Triton rollout runs in interpret mode (one program per row: the exchange code, not its cost)
and the Mosaic kernel is only lowered (Mosaic GPU's interpret mode has no cluster references).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import median_seconds
from pallas_kernels import cells, dispatch
from pallas_kernels import fused_generation as fg
from pallas_kernels import kernel_math as km

#: the toy cell's split channels and features; the Mosaic kernel's lanes
CHANNELS, FEATURES = 256, 128
BACKENDS = ("triton", "mosaic")


def toy_step(p, s, x, inputs, precision, comm=cells.UNSPLIT):
    """The toy split cell: ``h = h / 2 + W x`` over this program's channels, ``y = psum(V^T h) / 10``."""
    h = 0.5 * s["h"] + km.contract(x, p["W"], 1, precision)
    return 0.1 * comm.psum(km.contract(h, p["V"], 0, precision)), {"h": h}


def toy_cell(exchange: str, seed: int = 0) -> cells.Cell:
    """The toy cell with random ``W, V`` ``(CHANNELS, FEATURES)``, split along the channels, exchanging by
    ``exchange``."""
    rng = np.random.default_rng(seed)
    params = {"W": jnp.asarray(rng.standard_normal((CHANNELS, FEATURES)) / np.sqrt(FEATURES), jnp.float32),
              "V": jnp.asarray(rng.standard_normal((CHANNELS, FEATURES)) / np.sqrt(CHANNELS), jnp.float32)}
    return cells.Cell(toy_step, params, split=cells.Split(CHANNELS, {"W": 0, "V": 0}, {"h": 0}, exchange=exchange))


def closed_loop(cell: cells.Cell, state, x0, steps: int):
    """``(B, steps, FEATURES)``: the unsplit XLA driver of ``cell``, each output the next input."""
    def body(carry, _):
        y, state = cells.xla_step(cell, carry[1], carry[0], {})
        return (y, state), y

    with jax.default_matmul_precision("highest"):
        ys = jax.lax.scan(body, (x0, state), None, length=steps)[1]
    return jnp.swapaxes(ys, 0, 1)


def cluster_exchange(clusters: int, parts: int, steps: int):
    """The Mosaic GPU kernel: ``x (clusters, parts, 128)`` -> the vectors after ``steps`` exchanges (``steps`` even:
    the loop runs two steps an iteration, so that each slot's shared-memory array is static)."""
    if steps % 2:
        raise ValueError(f"steps must be even for the mosaic kernel, got {steps}")
    from jax.experimental.pallas import mosaic_gpu as plgpu

    lanes = FEATURES

    @functools.partial(
        plgpu.kernel, out_type=jax.ShapeDtypeStruct((clusters, parts, lanes), jnp.float32),
        scratch_types=dict(io=plgpu.SMEM((lanes,), jnp.float32), part0=plgpu.SMEM((lanes,), jnp.float32),
                           part1=plgpu.SMEM((lanes,), jnp.float32), copied=plgpu.Barrier(),
                           met=plgpu.ClusterBarrier(collective_axes=("c",), num_barriers=2)),
        grid=(clusters,), grid_names=("g",), cluster=(parts,), cluster_names=("c",))
    def kernel(x_ref, out_ref, io, part0, part1, copied, met):
        g, c = jax.lax.axis_index("g"), jax.lax.axis_index("c")
        plgpu.copy_gmem_to_smem(x_ref.at[g, c], io, copied)
        plgpu.barrier_wait(copied)
        bias = 0.01 * (c + 1).astype(jnp.float32)

        def step(slot: int, v):
            part = (part0, part1)[slot]  # (a cluster reference to a slice of one array does not lower)
            part[...] = v
            plgpu.barrier_arrive(met.at[slot])
            plgpu.barrier_wait(met.at[slot])
            total = part[...]
            for j in range(1, parts):
                total = total + plgpu.cluster_ref(part, {"c": jax.lax.rem(c + j, parts)})[...]
            return total * (0.5 / parts) + bias

        io[...] = jax.lax.fori_loop(0, steps // 2, lambda _, v: step(1, step(0, v)), io[...])
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(io, out_ref.at[g, c])
        plgpu.wait_smem_to_gmem(0)

    return jax.jit(kernel)


def cluster_reference(x: np.ndarray, steps: int) -> np.ndarray:
    """The Mosaic kernel's recurrence in float64."""
    parts = x.shape[1]
    v = x.astype(np.float64)
    bias = 0.01 * (np.arange(parts) + 1.0)[None, :, None]
    for _ in range(steps):
        v = v.sum(axis=1, keepdims=True) * (0.5 / parts) + bias
    return v


def _relative_error(got, want) -> float:
    want = np.asarray(want, np.float64)
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


def _timed(run, args) -> dict:
    """``{"us_per_step": ...}`` of ``run()`` on a GPU; ``{}`` elsewhere (interpret mode would time the interpreter)."""
    if jax.default_backend() != "gpu":
        return {}
    return {"us_per_step": 1e6 * median_seconds(run, args.warmup, args.repeats) / args.steps}


def bench_triton(args) -> list[dict]:
    rows = []
    rng = np.random.default_rng(1)
    interpret = jax.default_backend() != "gpu"
    for exchange in cells.EXCHANGES:
        cell = toy_cell(exchange)
        for batch in args.batches:
            x0 = jnp.asarray(rng.standard_normal((batch, FEATURES)), jnp.float32)
            state = {"h": jnp.zeros((batch, CHANNELS), jnp.float32)}
            reference = closed_loop(cell, state, x0, args.steps)
            for parts in args.sizes:
                row = dict(backend="triton", exchange=exchange, batch=batch, parts=parts, steps=args.steps)
                config = dispatch.KernelConfig(use_kernels="always", split_programs=parts,
                                               interpret=True if interpret else None)
                try:
                    run = jax.jit(lambda x0, state, config=config, cell=cell: fg.run_cell(
                        cell, state, x0, args.steps, config=config)[0])
                    start = time.perf_counter()
                    ys = jax.block_until_ready(run(x0, state))
                    row.update(first_call_s=time.perf_counter() - start, error=_relative_error(ys, reference),
                               **_timed(lambda run=run: run(x0, state), args))
                except ValueError as error:  # a split that cannot be resident, or does not cut the channels
                    row.update(note=str(error)[:200])
                rows.append(row)
                _report(row)
    return rows


def bench_mosaic(args) -> list[dict]:
    rows = []
    for parts in args.sizes:
        row = dict(backend="mosaic", exchange="cluster", batch=args.clusters, parts=parts, steps=args.steps)
        x = np.random.default_rng(parts).standard_normal((args.clusters, parts, FEATURES)).astype(np.float32)
        try:
            run = cluster_exchange(args.clusters, parts, args.steps)
            if jax.default_backend() != "gpu":
                start = time.perf_counter()
                text = jax.export.export(run, platforms=["cuda"])(jax.ShapeDtypeStruct(x.shape, x.dtype)).mlir_module()
                row.update(lowered_s=time.perf_counter() - start, lowered=("mosaic_gpu" in text),
                           note="lowered only: Mosaic GPU kernels run on an NVIDIA GPU")
            else:
                start = time.perf_counter()
                got = jax.block_until_ready(run(x))
                row.update(first_call_s=time.perf_counter() - start,
                           error=_relative_error(got, cluster_reference(x, args.steps)), **_timed(lambda: run(x), args))
        except Exception as error:  # noqa: BLE001 - e.g. a cluster size the device does not take: report, go on
            row.update(note=f"{type(error).__name__}: {str(error)[:300]}")
        rows.append(row)
        _report(row)
    return rows


def _report(row: dict) -> None:
    shown = {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in row.items()}
    print(" ".join(f"{k}={v}" for k, v in shown.items()), flush=True)


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each timed row's ratio to the Triton barrier with the same ``P``: at the same batch for a Triton row, at one
    row per cluster's worth (B=1) for a Mosaic row."""
    baseline = {(row["parts"], row["batch"]): row["us_per_step"] for row in rows
                if row["backend"] == "triton" and row["exchange"] == "barrier" and "us_per_step" in row}
    for row in rows:
        base = baseline.get((row["parts"], row["batch"] if row["backend"] == "triton" else 1))
        if base is not None and "us_per_step" in row:
            row["ratio_to_triton_barrier"] = row["us_per_step"] / base
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated, of {BACKENDS}")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8, 16], help="programs per row (P)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="rows (triton)")
    parser.add_argument("--clusters", type=int, default=16, help="clusters (mosaic)")
    parser.add_argument("--steps", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None, help="write the rows as JSON to this file")
    args = parser.parse_args(argv)
    backends = args.backends.split(",")
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        parser.error(f"--backends: unknown {unknown}; expected some of {BACKENDS}")
    device = jax.devices()[0]
    print(f"device: {getattr(device, 'device_kind', device)} ({jax.default_backend()}), jax {jax.__version__}",
          flush=True)
    rows = []
    if "triton" in backends:
        rows += bench_triton(args)
    if "mosaic" in backends:
        rows += bench_mosaic(args)
    rows = with_ratios(rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": str(getattr(device, "device_kind", device)), "jax": jax.__version__,
                       "argv": sys.argv, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
