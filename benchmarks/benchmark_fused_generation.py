"""Microseconds per generated step: the fused kernel, the compile-once XLA program and a Python loop.

    python -m benchmarks.benchmark_fused_generation [--batches 32 1 256 4096] [--out results.json]

For every model of :data:`MODELS` (H=128, d_state=64, 16 for Mamba, 512 steps) and
batch size, in the same run:

* ``fused``: :func:`pallas_kernels.fused_generation.fused_generate` under ``jax.jit``
  (parameters as arguments), or the reason it falls back;
* ``xla``: ``lrnnx_jax.generation.generate`` with a graph from ``capture_graph``
  (the compile-once XLA program, default ``GenerationConfig``);
* ``loop``: a Python loop over a jitted ``model.step`` (``--no-loop`` skips it).

``xla`` and ``loop`` run under ``use_kernels="never"``, so they stay the pure XLA
paths whatever ``generate`` dispatches to.

Each time is the median over ``--repeats`` whole rollouts after ``--warmup`` untimed
ones, divided by the steps. For the fused kernel it also reports the bytes that must
cross HBM (the outputs written, the streamed per-step inputs read, the state and
parameters once per program) as a fraction of the device-to-device copy bandwidth
measured in the same run (the number to read at B=4096). Where ``"auto"`` keeps the
XLA program (the cell's ``KernelPolicy``) the fused kernel is timed anyway and the note says
so. ``--block-batch``, ``--num-warps`` and
``--precision`` add fused variants (tuning). Prints a Markdown table; ``--out`` writes
every number as JSON.

``--fixed-cost`` also times every fused variant and the XLA program over half the steps, and
splits each rollout's time into what one more step costs and what a call costs whatever its
steps (the line through the two medians, :func:`step_and_call_us`): ``fused_step_us`` and
``fused_call_us``, ``xla_step_us`` and ``xla_call_us``. ``fused_us`` (the whole call over the
steps) is what the issue's table compares; the split says how much of it a longer rollout
would amortise.

PyTorch lrnnx's numbers come from a results file (``--anchors PATH``, default
``benchmarks/results/lrnnx_anchors.json``: CUDA-graph replay on an H100 at B=32, H=128,
512 steps) and fill ``lrnnx_us`` only where this run's device kind names the anchor's
device and the row has its configuration; the skipped anchors are listed with why.

Shows a progress bar (tqdm) and writes a plot of µs per generated step against the
batch size (fused and XLA, and lrnnx where compared) to ``--plot`` (default: next to
``--out``, else ``benchmark_results/fused_generation.png``; ``--no-plot`` for none).
Needs jax, flax and numpy; without tqdm or matplotlib (the ``bench`` extra) it prints
plain progress lines and writes no plot.

On an H100, with the self-test, in one call of about 10 minutes::

    python -m pallas_kernels.gpu_fused_selftest --out selftest.json
    python -m benchmarks.benchmark_fused_generation --repeats 10 --out bench.json

and a tuning run of the diagonal kernels' paths::

    python -m benchmarks.benchmark_fused_generation --models LRU,S5,ltv.S5-event --batches 32 256 4096 \
        --block-batch 1 16 32 --num-warps 0 4 8 --no-loop --repeats 5
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import pathlib
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import anchors as anchors_lib
from benchmarks.benchmark_inference import make_inputs
from benchmarks.reporting import Progress, add_plot_and_anchor_arguments, batch_axes, pyplot, save, write_plot
from benchmarks.timing import copy_bandwidth, median_seconds
from lrnnx_jax import generation
from lrnnx_jax.convert import model_class
from pallas_kernels import dispatch
from pallas_kernels import fused_generation as fg


@dataclasses.dataclass(frozen=True)
class BenchModel:
    name: str
    lrnnx_name: str
    kwargs: dict
    event: bool = False


H, N = 128, 64
MODELS = [
    BenchModel("LRU", "lti.LRU", dict(d_model=H, d_state=N)),
    BenchModel("S5", "lti.S5", dict(d_model=H, d_state=N, discretization="zoh")),
    BenchModel("S5-event", "lti.S5", dict(d_model=H, d_state=N, discretization="async"), event=True),
    BenchModel("ltv.S5", "ltv.S5", dict(d_model=H, d_state=N)),
    BenchModel("ltv.S5-event", "ltv.S5", dict(d_model=H, d_state=N), event=True),
    BenchModel("CentaurusNeck", "lti.Centaurus", dict(d_model=H, d_state=N, sub_state_dim=2, mode="neck")),
    BenchModel("CentaurusPWNeck", "lti.Centaurus", dict(d_model=H, d_state=N, sub_state_dim=2, mode="pw")),
    BenchModel("CentaurusDWS", "lti.Centaurus", dict(d_model=H, d_state=H, sub_state_dim=2, mode="dws")),
    BenchModel("Mamba", "ltv.Mamba", dict(d_model=H, d_state=16)),
    BenchModel("Mamba-event", "ltv.Mamba", dict(d_model=H, d_state=16), event=True),
    BenchModel("RGLRU", "ltv.RGLRU", dict(d_model=H)),
    BenchModel("S4", "lti.S4", dict(d_model=H, d_state=N, transposed=False)),
    BenchModel("S4D", "lti.S4D", dict(d_model=H, d_state=N, transposed=False)),
    BenchModel("S7", "ltv.S7", dict(d_model=H, d_state=N)),
    BenchModel("S7-small", "ltv.S7", dict(d_model=32, d_state=32)),  # the largest S7 whose weights fit on chip
]


NEVER = dispatch.KernelConfig(use_kernels="never")


def fused_runner(model, x0, tau, steps: int, config: dispatch.KernelConfig):
    """The jitted fused rollout (whether or not ``"auto"`` would choose it)."""
    treedef = jax.tree.structure(model)
    leaves = jax.tree.leaves(model)
    tau = None if tau is None else jnp.asarray(tau)

    @jax.jit
    def run(leaves, x0, tau):
        return fg.fused_generate(jax.tree.unflatten(treedef, leaves), x0, steps, tau, config=config)

    start = time.perf_counter()
    jax.block_until_ready(run(leaves, x0, tau))
    return (lambda: run(leaves, x0, tau)), time.perf_counter() - start


def xla_runner(model, x0, tau, steps: int):
    graph = generation.capture_graph(model, x0.shape[0], event_mode=tau is not None, kernel_config=NEVER)
    return (lambda: generation.generate(model, x0, steps, graph_cache=graph, integration_timesteps=tau)), graph.compile_time_s


def loop_runner(model, x0, tau, steps: int):
    treedef = jax.tree.structure(model)
    leaves = jax.tree.leaves(model)
    cache0 = model.allocate_inference_cache(x0.shape[0])
    tau = None if tau is None else jnp.asarray(tau)

    @jax.jit
    def step(leaves, x_t, cache, tau):
        return jax.tree.unflatten(treedef, leaves).step(x_t, cache, integration_timesteps=tau, kernel_config=NEVER)

    def run():
        cache, x_t, ys = cache0, x0, []
        for _ in range(steps):
            x_t, cache = step(leaves, x_t, cache, tau)
            ys.append(x_t)
        return jnp.stack(ys, axis=1)

    start = time.perf_counter()
    jax.block_until_ready(step(leaves, x0, cache0, tau))
    return run, time.perf_counter() - start


def step_and_call_us(seconds: float, half_seconds: float, steps: int) -> tuple[float, float]:
    """``(µs per step, µs per call)`` of the line through a rollout's median time over ``steps`` steps and over
    ``steps // 2``: what each further step costs, and what every call costs besides its steps."""
    half = steps // 2
    step = (seconds - half_seconds) / (steps - half)
    return 1e6 * step, 1e6 * (seconds - steps * step)


def timed_per_step(make_run, steps: int, args, prefix: str) -> dict:
    """``{prefix}_us`` (the median call over ``steps`` steps, per step) of ``make_run(steps)``'s rollout, and with
    ``--fixed-cost`` ``{prefix}_step_us`` and ``{prefix}_call_us`` (:func:`step_and_call_us`)."""
    seconds = median_seconds(make_run(steps), args.warmup, args.repeats)
    row = {f"{prefix}_us": 1e6 * seconds / steps}
    if args.fixed_cost:
        half_seconds = median_seconds(make_run(steps // 2), args.warmup, args.repeats)
        row[f"{prefix}_step_us"], row[f"{prefix}_call_us"] = step_and_call_us(seconds, half_seconds, steps)
    return row


def hbm_bytes(model, batch: int, steps: int, event: bool, config: dispatch.KernelConfig) -> int:
    """Bytes the fused rollout must move through HBM: outputs, state in/out, parameters per program.

    (Event-mode timesteps of shape (B, 1) are per-row inputs: nothing is streamed per step.)"""
    cell = model.cell()
    params = fg.padded_params(cell)
    state = jax.eval_shape(lambda: model.cell_state(model.allocate_inference_cache(batch)))
    size = lambda tree: sum(math.prod(a.shape) for a in jax.tree.leaves(tree)) * 4  # noqa: E731
    block = fg.effective_block_batch(cell.blockable, batch, config)
    return batch * steps * model.d_model * 4 + 2 * size(state) + size(params) * -(-batch // block)


def fused_configs(args, blockable: bool, split: bool) -> list[dispatch.KernelConfig]:
    """Every combination of ``--block-batch``, ``--num-warps``, ``--precision`` and ``--split-programs``
    (0: automatic).

    Cells that only have the one-row path (not ``blockable``) skip the block variants and the precisions
    (which only change the block path's dots); cells without a split skip the split variants.
    """
    configs = []
    for block, warps, precision, parts in itertools.product(args.block_batch, args.num_warps, args.precision,
                                                            args.split_programs):
        if (not blockable and (block > 1 or precision != "highest")) or (parts and not split):
            continue
        configs.append(dispatch.KernelConfig(use_kernels="always", block_batch=block or None, num_warps=warps or None,
                                             precision=precision, split_programs=parts or None))
    return list(dict.fromkeys(configs))


def lrnnx_columns(spec: BenchModel, batch: int, steps: int, anchors: anchors_lib.Anchors) -> dict:
    """``lrnnx_us`` and ``lrnnx_device`` from the anchor of this device kind and configuration (else None)."""
    anchor = anchors.find(model=spec.name, B=batch, H=spec.kwargs["d_model"], steps=steps,
                          d_state=spec.kwargs.get("d_state"))
    return dict(lrnnx_us=None if anchor is None else anchor.value, lrnnx_device=None if anchor is None else anchor.device)


def bench_model(spec: BenchModel, batch: int, args, bandwidth: float, anchors: anchors_lib.Anchors) -> list[dict]:
    model = model_class(spec.lrnnx_name)(**spec.kwargs, rngs=nnx.Rngs(0))
    x0, tau = make_inputs(batch, model.d_model, spec.event)
    steps = args.steps
    base = dict(model=spec.name, batch=batch, steps=steps, **lrnnx_columns(spec, batch, steps, anchors))
    rows = []
    reason = fg.model_unsupported_reason(model, batch, spec.event)
    slower = None if reason is not None else model.cell().policy.slower_reason("rollout", batch)
    xla = dict(xla_us=None)
    loop_us = None
    # the XLA program and step (use_kernels="never"), whatever generate would dispatch to
    if not args.no_xla:
        xla = timed_per_step(lambda n: xla_runner(model, x0, tau, n)[0], steps, args, "xla")
    if not args.no_loop and batch in args.loop_batches:
        run, _ = loop_runner(model, x0, tau, steps)
        loop_us = 1e6 * median_seconds(run, 1, max(1, args.repeats // 4)) / steps
    base.update(xla, loop_us=loop_us)
    if reason is not None:
        return [dict(base, variant="fallback", fused_us=None, note=reason)]
    cell = model.cell()
    for config in fused_configs(args, cell.blockable, cell.split is not None):
        compile_s = []

        def make_run(n, config=config):
            run, seconds = fused_runner(model, x0, tau, n, config)
            compile_s.append(seconds)
            return run

        try:
            fused = timed_per_step(make_run, steps, args, "fused")
        except Exception as error:  # noqa: BLE001 - report the variant and continue
            rows.append(dict(base, variant=_variant(config), fused_us=None,
                             note=f"ERROR {type(error).__name__}: {error}"[:300]))
            continue
        moved = hbm_bytes(model, batch, steps, spec.event, config)
        rows.append(dict(base, variant=_variant(config), **fused,
                         speedup_xla=None if xla["xla_us"] is None else xla["xla_us"] / fused["fused_us"],
                         hbm_fraction=moved / (1e-6 * fused["fused_us"] * steps) / bandwidth, compile_s=compile_s[0],
                         note="" if slower is None else f"auto keeps XLA: {slower}"))
    return rows


def _variant(config: dispatch.KernelConfig) -> str:
    parts = [f"block={config.block_batch}" if config.block_batch else "", f"warps={config.num_warps}" if config.num_warps else "",
             "" if config.precision == "highest" else config.precision,
             f"split={config.split_programs}" if config.split_programs else ""]
    return " ".join(p for p in parts if p) or "auto"


def _fmt(value, digits=3):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def markdown(rows: list[dict]) -> str:
    columns = ["model", "batch", "variant", "fused_us", "xla_us", "loop_us", "speedup_xla", "lrnnx_us", "hbm_fraction", "note"]
    split = [c for c in ("fused_step_us", "fused_call_us", "xla_step_us", "xla_call_us") if any(c in row for row in rows)]
    columns[5:5] = split
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def plot(path: pathlib.Path, rows: list[dict]) -> Optional[str]:
    """µs per generated step against the batch size: fused (solid) and XLA (dashed) per model, lrnnx (squares)."""
    points = [row for row in rows if row.get("fused_us") is not None or row.get("xla_us") is not None]
    if not points:
        return None
    plt = pyplot("plot")
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    devices = sorted({row["lrnnx_device"] for row in rows if row.get("lrnnx_us") is not None})
    for model in dict.fromkeys(row["model"] for row in points):
        mine = [row for row in points if row["model"] == model]
        fused = {}  # the fastest variant per batch
        for row in mine:
            if row.get("fused_us") is not None:
                fused[row["batch"]] = min(row["fused_us"], fused.get(row["batch"], math.inf))
        xla = {row["batch"]: row["xla_us"] for row in mine if row.get("xla_us") is not None}
        theirs = {row["batch"]: row["lrnnx_us"] for row in mine if row.get("lrnnx_us") is not None}
        color = None
        if fused:
            color = ax.plot(*zip(*sorted(fused.items())), marker="o", ms=3, label=f"{model} fused")[0].get_color()
        if xla:
            color = ax.plot(*zip(*sorted(xla.items())), ls="--", marker=".", color=color,
                            label=f"{model} XLA program")[0].get_color()
        if theirs:
            ax.plot(*zip(*sorted(theirs.items())), ls="none", marker="s", ms=7, mfc="none", color=color,
                    label=f"{model} PyTorch lrnnx")
    title = f"{points[0]['steps']} steps"
    if devices:
        title += f"; PyTorch lrnnx CUDA graph measured on {', '.join(devices)}"
    batch_axes(ax, {row["batch"] for row in points}, "µs per generated step", title, ncol=3)
    return save(fig, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="comma-separated model names (default: all)")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 1, 256, 4096])
    parser.add_argument("--steps", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-xla", action="store_true")
    parser.add_argument("--no-loop", action="store_true")
    parser.add_argument("--loop-batches", type=int, nargs="+", default=[32], help="batches at which the Python loop is timed")
    parser.add_argument("--block-batch", type=int, nargs="+", default=[0], help="fused variants: rows per program (0: auto)")
    parser.add_argument("--num-warps", type=int, nargs="+", default=[0], help="fused variants: warps per program (0: auto)")
    parser.add_argument("--precision", nargs="+", default=["highest"], choices=dispatch.PRECISIONS,
                        help="fused variants: dot precision of the block path")
    parser.add_argument("--split-programs", type=int, nargs="+", default=[0],
                        help="fused variants of split cells: programs per row (0: auto)")
    parser.add_argument("--fixed-cost", action="store_true",
                        help="also time half the steps: each rollout's cost per step and per call (fused and XLA)")
    parser.add_argument("--quick", action="store_true", help="B=32 and 4096 only, 5 repeats")
    parser.add_argument("--out", default=None, help="write every number as JSON to this file (after each model; "
                        "\"complete\" is true once the run finished)")
    add_plot_and_anchor_arguments(parser, "fused_generation.png")
    args = parser.parse_args(argv)
    if args.fixed_cost and args.steps < 2:
        parser.error(f"--fixed-cost times half the steps as well: it needs --steps of at least 2, got {args.steps}")
    if args.quick:
        args.batches, args.repeats, args.warmup = [32, 4096], 5, 1
    models = MODELS if args.models is None else [m for m in MODELS if m.name in args.models.split(",")]
    device = jax.devices()[0]
    anchors = anchors_lib.anchors(anchors_lib.device_kind(), args.anchors, benchmark="generate")
    bandwidth = copy_bandwidth()
    print(f"device: {getattr(device, 'device_kind', device)}, jax {jax.__version__}, copy bandwidth {bandwidth / 1e9:.0f} GB/s",
          flush=True)
    rows = []
    progress = Progress(len(args.batches) * len(models), unit="model")
    for batch in args.batches:
        for spec in models:
            try:
                new = bench_model(spec, batch, args, bandwidth, anchors)
            except Exception as error:  # noqa: BLE001
                new = [dict(model=spec.name, batch=batch, variant="", note=f"ERROR {type(error).__name__}: {error}"[:300])]
            rows += new
            write_results(args.out, device, bandwidth, rows, anchors, complete=False)
            for row in new:
                progress.write(f"  {row['model']} B={batch} {row.get('variant')}: fused {_fmt(row.get('fused_us'))} us, "
                               f"xla {_fmt(row.get('xla_us'))} us, loop {_fmt(row.get('loop_us'))} us {row.get('note', '')}")
            progress.update(f"{spec.name} B={batch}")
    progress.close()
    print()
    print(markdown(rows))
    print("\nPyTorch lrnnx (lrnnx_us):")
    print("\n".join(f"- {line}" for line in anchors.summary()))
    write_plot(args, "fused_generation.png", plot, rows)
    write_results(args.out, device, bandwidth, rows, anchors, complete=True)
    return 0


def write_results(path, device, bandwidth: float, rows: list, anchors, complete: bool) -> None:
    """``--out`` (None: nothing): every row so far as JSON, rewritten after each model (replacing the file whole),
    so that a run stopped by a time limit keeps what it measured; ``complete`` says whether the run finished."""
    if not path:
        return
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        json.dump({"device": str(getattr(device, "device_kind", device)), "jax": jax.__version__,
                   "copy_bandwidth": bandwidth, "argv": sys.argv, "complete": complete, "rows": rows,
                   "anchors": anchors.to_json()}, f, indent=1)
    os.replace(partial, path)


if __name__ == "__main__":
    sys.exit(main())
