"""Seconds to ``capture_graph`` in a fresh process: without a compilation cache, then cold and warm with one.

    python -m benchmarks.benchmark_capture [--models Mamba,RGLRU,S7,S4,LRU] [--batches 1 32] [--out results.json]
        [--unroll U] [--compiler-options '{"xla_gpu_autotune_level": 0}'] [--steps 512 [--repeats 10]] [--no-cache-runs]

For every model of :data:`benchmarks.benchmark_fused_generation.MODELS` named and every batch size, three child
processes each build the model and time ``lrnnx_jax.generation.capture_graph(model, B)`` (wall clock: tracing,
lowering and compiling, with the Pallas kernels where ``"auto"`` takes them, as a user's first call):

* ``no_cache_s``: JAX's default (no persistent compilation cache);
* ``cold_s``: ``lrnnx_jax.generation.enable_compilation_cache(dir)`` on an empty directory;
* ``warm_s``: the same directory again, now holding the program.

Each child also reports which program it captured (``fused`` or the XLA program), the process's start-up (the
import of JAX and the library, not counted), and where the capture's seconds went: JAX's compile events during it
(``compile_events_s``: ``jaxpr_trace``, ``jaxpr_to_mlir_module`` and ``backend_compile`` seconds, the last XLA's and
Triton's compilation). With ``--steps`` the first child also times the captured program:
``generate`` of that many steps from a random input, the median of ``--repeats`` (10) after 2 warm-ups, as µs per step (the cost
side of a faster-compiling configuration), and the same through a ``CapturedModel`` of the model (``us_per_step_captured``,
where the library has one: its module tree is not walked at each call). ``--unroll`` and ``--compiler-options`` set the
``GenerationConfig`` captured (its ``unroll`` and XLA ``compiler_options``; the library's defaults when absent);
``--no-cache-runs`` skips the cold and warm children. Prints a Markdown table; ``--out`` writes every number as
JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from typing import Optional

CHILD_MARKER = "CAPTURE_RESULT "
#: the prefix of JAX's compile-duration events (``jax._src.dispatch``'s ``.../jaxpr_trace_duration`` and the others)
COMPILE_EVENT_PREFIX = "/jax/core/compile/"


def child(spec: dict) -> dict:
    """In a fresh process: build the model and time its capture (``spec``: model, batch, cache directory or None)."""
    start = time.perf_counter()
    import collections

    import jax
    from flax import nnx

    from benchmarks.benchmark_fused_generation import MODELS
    from lrnnx_jax import generation
    from lrnnx_jax.convert import model_class

    if spec["cache"] is not None:
        generation.enable_compilation_cache(spec["cache"])
    bench = next(m for m in MODELS if m.name == spec["model"])
    model = model_class(bench.lrnnx_name)(**bench.kwargs, rngs=nnx.Rngs(0))
    model.eval()
    jax.block_until_ready(jax.tree.leaves(model))
    config = generation.GenerationConfig(unroll=spec.get("unroll"), compiler_options=spec.get("compiler_options"))
    startup = time.perf_counter() - start
    events = collections.defaultdict(float)

    def record(event: str, seconds: float, **_):
        if event.startswith(COMPILE_EVENT_PREFIX) and event.endswith("_duration"):
            events[event[len(COMPILE_EVENT_PREFIX):-len("_duration")]] += seconds

    jax.monitoring.register_event_duration_secs_listener(record)
    start = time.perf_counter()
    graph = generation.capture_graph(model, spec["batch"], event_mode=bench.event, config=config)
    seconds = time.perf_counter() - start
    result = {"capture_s": seconds, "startup_s": startup, "fused": bool(graph.spec.fused),
              "device": jax.devices()[0].device_kind, "config": repr(graph.spec.config),
              "compile_events_s": dict(events)}
    if spec.get("steps"):
        from benchmarks.benchmark_inference import make_inputs
        from benchmarks.timing import median_seconds

        x0, tau = make_inputs(spec["batch"], model.d_model, bench.event, seed=0)
        from benchmarks.benchmark_host_overhead import captured_or_none

        def us_per_step(model):
            run = lambda: generation.generate(model, x0, spec["steps"], graph_cache=graph, integration_timesteps=tau)  # noqa: E731
            return 1e6 * median_seconds(run, 2, spec.get("repeats", 10)) / spec["steps"]

        result["us_per_step"] = us_per_step(model)
        captured = captured_or_none(model)
        if captured is not None:
            result["us_per_step_captured"] = us_per_step(captured)
    return result


def run_child(spec: dict, timeout: float) -> dict:
    command = [sys.executable, "-m", "benchmarks.benchmark_capture", "--child", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith(CHILD_MARKER):
            return json.loads(line[len(CHILD_MARKER):])
    return {"error": f"exit {done.returncode}: {done.stderr.strip()[-400:]}"}


def measure(model: str, batch: int, timeout: float, options: Optional[dict] = None, cache_runs: bool = True) -> dict:
    """One row: the capture times of ``model`` at ``batch`` (``options``: the child's ``unroll``,
    ``compiler_options`` and ``steps``)."""
    spec = {"model": model, "batch": batch, **(options or {})}
    row = {"model": model, "batch": batch, **{k: v for k, v in spec.items() if k not in ("model", "batch")}}
    children = [("no_cache", spec | {"cache": None})]
    timed_once = {k: v for k, v in spec.items() if k not in ("steps", "repeats")}
    with tempfile.TemporaryDirectory(prefix="lrnnx_jax_cache_") as cache:
        if cache_runs:
            children += [("cold", timed_once | {"cache": cache}), ("warm", timed_once | {"cache": cache})]
        results = {name: run_child(child_spec, timeout) for name, child_spec in children}
    for name, result in results.items():
        row[f"{name}_s"] = result.get("capture_s")
        if "error" in result:
            row[f"{name}_error"] = result["error"]
    plain = results["no_cache"]
    row["program"] = "fused" if plain.get("fused") else "xla"
    for key in ("device", "startup_s", "config", "compile_events_s", "us_per_step", "us_per_step_captured"):
        row[key] = plain.get(key)
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| model | B | program | no cache s | cache cold s | cache warm s | µs/step | µs/step, captured | config |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['program']} | {fmt(r.get('no_cache_s'))} | "
                     f"{fmt(r.get('cold_s'))} | {fmt(r.get('warm_s'))} | {fmt(r.get('us_per_step'))} | "
                     f"{fmt(r.get('us_per_step_captured'))} | "
                     f"{r.get('config') or '-'} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="Mamba,RGLRU,S7,S4,LRU", help="comma-separated names of MODELS")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per child process")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--unroll", type=int, default=None, help="GenerationConfig.unroll (default: the library's)")
    parser.add_argument("--compiler-options", type=json.loads, default=None,
                        help="GenerationConfig.compiler_options as JSON (default: the library's)")
    parser.add_argument("--steps", type=int, default=0, help="also time generate of this many steps (µs per step)")
    parser.add_argument("--repeats", type=int, default=10, help="calls of generate timed with --steps (the median)")
    parser.add_argument("--no-cache-runs", action="store_true", help="only the child without a compilation cache")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(CHILD_MARKER + json.dumps(child(json.loads(args.child))), flush=True)
        return None
    from benchmarks.benchmark_fused_generation import MODELS

    names = args.models.split(",")
    unknown = sorted(set(names) - {m.name for m in MODELS})
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {[m.name for m in MODELS]}")
    if min(args.batches) < 1:
        parser.error(f"--batches must be positive, got {args.batches}")
    if args.compiler_options is not None and not isinstance(args.compiler_options, dict):
        parser.error(f"--compiler-options must be a JSON object, got {args.compiler_options!r}")
    if args.steps < 0 or args.repeats < 1 or (args.unroll is not None and args.unroll < 1):
        parser.error(f"--steps must be >= 0, --repeats >= 1 and --unroll >= 1, got {args.steps}, {args.repeats} and "
                     f"{args.unroll}")
    options = {"unroll": args.unroll, "compiler_options": args.compiler_options, "steps": args.steps,
               "repeats": args.repeats}
    rows = []
    for name in names:
        for batch in args.batches:
            rows.append(measure(name, batch, args.timeout, options, not args.no_cache_runs))
            print(json.dumps(rows[-1]), flush=True)
    print(markdown(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
