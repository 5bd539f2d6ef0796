"""Where a model's training step spends its device time: the kernels of one ``jit(value_and_grad)`` step, by name.

Runs :func:`benchmarks.benchmark_training.training_step` for each model on one path, warms it up, traces
``--steps`` steps with ``jax.profiler`` (a Perfetto trace) and sums the device events by kernel name, per step::

    python -m benchmarks.profile_training --models Mamba --path kernels --out benchmark_results/profile.json

Prints, for each model, the median step time (synchronous calls, as :mod:`benchmarks.benchmark_training` times
them), the step time with ``--pipeline`` calls in flight (the host's per-call work hidden behind the device's, as in
a training loop) and the time a call takes to return (the host's dispatch), the summed kernel time per step, the time
the device is busy (the union of the kernels' intervals: below the sum where kernels overlap, and the step time less
this is where the device waits), the ``--top`` kernels (ms per step, share of the kernel time, launches per step),
the ``--top`` idle gaps of the device (between which kernels) and the ``--top`` host events (the trace's other
processes: Python frames, the runtime's dispatch, graph launches; nested events each count their whole duration).
On a machine without a GPU there are no device streams, and the kernel table says so.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import sys
import tempfile
from typing import Optional

import jax
import jax.numpy as jnp

from benchmarks import benchmark_training as training
from benchmarks.timing import median_seconds, pipelined_seconds


def trace_events(trace: dict, on_device: bool = True) -> list[dict]:
    """The complete (``"ph": "X"``) events of a Perfetto/Chrome trace whose process is a device (its
    ``process_name`` names ``/device:``; ``on_device=False``: every other process, the host's), each ``{"name",
    "ts", "dur"}`` with ``ts`` and ``dur`` in microseconds."""
    devices = {event["pid"] for event in trace.get("traceEvents", [])
               if event.get("ph") == "M" and event.get("name") == "process_name"
               and "/device:" in str(event.get("args", {}).get("name", ""))}
    return [{"name": event["name"], "ts": float(event.get("ts", 0.0)), "dur": float(event.get("dur", 0.0))}
            for event in trace.get("traceEvents", [])
            if event.get("ph") == "X" and (event.get("pid") in devices) == on_device]


def busy_ms(events: list[dict]) -> float:
    """The time (ms) at least one of ``events`` runs: the union of their intervals."""
    total, end = 0.0, None
    for event in sorted(events, key=lambda e: e["ts"]):
        start, stop = event["ts"], event["ts"] + event["dur"]
        if end is None or start > end:
            total, end = total + stop - start, stop
        elif stop > end:
            total, end = total + stop - end, stop
    return total / 1e3


def kernel_table(events: list[dict], steps: int) -> list[dict]:
    """``events`` summed by name: ``{"name", "ms_per_step", "launches_per_step"}``, the longest first."""
    total, count = collections.defaultdict(float), collections.Counter()
    for event in events:
        total[event["name"]] += event["dur"]
        count[event["name"]] += 1
    return sorted(({"name": name, "ms_per_step": us / 1e3 / steps, "launches_per_step": count[name] / steps}
                   for name, us in total.items()), key=lambda row: -row["ms_per_step"])


def idle_gaps(events: list[dict], steps: int, top: int) -> list[dict]:
    """The device's idle gaps (no event running) inside the traced window, summed by the kernels around them:
    ``{"before", "after", "ms_per_step", "count_per_step"}``, the longest first, at most ``top``."""
    total, count = collections.defaultdict(float), collections.Counter()
    end, last = None, None
    for event in sorted(events, key=lambda e: e["ts"]):
        if end is not None and event["ts"] > end:
            key = (last, event["name"])
            total[key] += event["ts"] - end
            count[key] += 1
        if end is None or event["ts"] + event["dur"] > end:
            end, last = event["ts"] + event["dur"], event["name"]
    rows = [{"before": before, "after": after, "ms_per_step": us / 1e3 / steps, "count_per_step": count[before, after] / steps}
            for (before, after), us in total.items()]
    return sorted(rows, key=lambda row: -row["ms_per_step"])[:top]


def read_trace(log_dir: pathlib.Path) -> dict:
    """The newest ``perfetto_trace.json.gz`` under ``log_dir``."""
    found = sorted(log_dir.rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {log_dir}")
    with gzip.open(found[-1], "rt") as f:
        return json.load(f)


def profile_model(spec: training.TrainModel, path: str, point: dict, args) -> dict:
    config = training.PATHS[path]
    model = spec.build(point["H"], args.d_state, args.seed, **({} if config is None else {"kernel_config": config}))
    step, params, _ = training.training_step(model)
    x = jax.random.normal(jax.random.key(args.seed), (point["B"], point["L"], point["H"]), jnp.float32)
    call = lambda: step(params, x)  # noqa: E731
    median_ms = median_seconds(call, args.warmup, args.repeats) * 1e3
    host = {"pipelined_ms": pipelined_seconds(call, args.warmup, args.repeats, args.pipeline) * 1e3,
            "dispatch_ms": median_seconds(call, args.warmup, args.repeats, until_ready=False) * 1e3}
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            for _ in range(args.steps):
                jax.block_until_ready(call())
        trace = read_trace(pathlib.Path(log_dir))
        events = trace_events(trace)
    if args.hlo_dir is not None:
        args.hlo_dir.mkdir(parents=True, exist_ok=True)
        (args.hlo_dir / f"{spec.name}_{path}.hlo.txt").write_text(step.lower(params, x).compile().as_text())
    table = kernel_table(events, args.steps)
    return {"model": spec.name, "path": path, **point, "median_ms": median_ms, **host,
            "kernel_ms_per_step": sum(row["ms_per_step"] for row in table),
            "busy_ms_per_step": busy_ms(events) / args.steps, "kernels": table,
            "idle_gaps": idle_gaps(events, args.steps, args.top),
            "host_events": kernel_table(trace_events(trace, on_device=False), args.steps)[:args.top]}


def format_profile(result: dict, top: int) -> str:
    head = (f"## {result['model']} ({result['path']}), B={result['B']} H={result['H']} L={result['L']}: step "
            f"{result['median_ms']:.3f} ms (median), kernels {result['kernel_ms_per_step']:.3f} ms per step, the device "
            f"busy {result['busy_ms_per_step']:.3f} ms per step; {result['pipelined_ms']:.3f} ms per step with calls in "
            f"flight, a call returns after {result['dispatch_ms']:.3f} ms")
    host = ["", "| host event | ms / step | calls / step |", "|---|---:|---:|"]
    host += [f"| `{row['name'][:90]}` | {row['ms_per_step']:.4f} | {row['launches_per_step']:g} |"
             for row in result["host_events"]]
    if not result["kernels"]:
        return "\n".join([head + "\n(no device events: no GPU stream in the trace)", *host])
    lines = [head, "", "| kernel | ms / step | share | launches / step |", "|---|---:|---:|---:|"]
    for row in result["kernels"][:top]:
        share = row["ms_per_step"] / result["kernel_ms_per_step"]
        lines.append(f"| `{row['name'][:90]}` | {row['ms_per_step']:.4f} | {share:.1%} | {row['launches_per_step']:g} |")
    lines += ["", "| idle gap after the kernel | and before the kernel | ms / step | gaps / step |", "|---|---|---:|---:|"]
    lines += [f"| `{row['before'][:60]}` | `{row['after'][:60]}` | {row['ms_per_step']:.4f} | {row['count_per_step']:g} |"
              for row in result["idle_gaps"]]
    return "\n".join(lines + host)


def parse_args(argv: Optional[list[str]]):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_training", description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=lambda t: t.split(","), default=["Mamba"],
                        help=f"comma-separated subset of {','.join(training.BY_NAME)}")
    parser.add_argument("--path", choices=tuple(training.PATHS), default="auto")
    for key, value in training.POINT.items():
        parser.add_argument(f"--{dict(B='batch', H='dim', L='length')[key]}", type=int, default=value)
    parser.add_argument("--d-state", type=int, default=64, help="state size (Mamba keeps 16)")
    parser.add_argument("--steps", type=int, default=5, help="traced steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--pipeline", type=int, default=10, help="calls in flight for the pipelined step time")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=None, help="JSON of every kernel, per model")
    parser.add_argument("--hlo-dir", type=pathlib.Path, default=None,
                        help="write each step's compiled HLO (MODEL_PATH.hlo.txt) here, to find the fusions by name")
    parser.add_argument("--set", type=training.kernel_constant, action="append", default=[],
                        metavar="MODULE.NAME=VALUE", help="a kernel module's tiling constant for this run (repeatable), "
                        "as benchmark_training's --set")
    args = parser.parse_args(argv)
    unknown = [name for name in args.models if name not in training.BY_NAME]
    if unknown:
        parser.error(f"--models: unknown {unknown}; expected names from {list(training.BY_NAME)}")
    for name in ("steps", "warmup", "repeats", "pipeline", "top", "batch", "dim", "length"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            parser.error(f"--{name}: expected a positive count, got {getattr(args, name)}")
    return args


def main(argv: Optional[list[str]] = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    point = dict(B=args.batch, H=args.dim, L=args.length)
    results = []
    with training.kernel_constants(args.set):
        for name in args.models:
            result = profile_model(training.BY_NAME[name], args.path, point, args)
            print(format_profile(result, args.top), flush=True)
            results.append(result)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        device = jax.devices()[0]
        environment = {"device": f"{device.platform}: {getattr(device, 'device_kind', str(device))}",
                       "jax": jax.__version__, "command": "python -m benchmarks.profile_training " + " ".join(argv),
                       "config": {**point, "path": args.path, "d_state": args.d_state, "steps": args.steps,
                                  "constants": training.constants_record(args.set)}}
        args.out.write_text(json.dumps({"environment": environment, "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
