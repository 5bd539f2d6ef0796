"""Seconds to ``capture_graph`` in a fresh process: without a compilation cache, then cold and warm with one.

    python -m benchmarks.benchmark_capture [--models Mamba,RGLRU,S7,S4,LRU] [--batches 1 32] [--out results.json]

For every model of :data:`benchmarks.benchmark_fused_generation.MODELS` named and every batch size, three child
processes each build the model and time ``lrnnx_jax.generation.capture_graph(model, B)`` (wall clock: tracing,
lowering and compiling, with the Pallas kernels where ``"auto"`` takes them, as a user's first call):

* ``no_cache_s``: JAX's default (no persistent compilation cache);
* ``cold_s``: ``lrnnx_jax.generation.enable_compilation_cache(dir)`` on an empty directory;
* ``warm_s``: the same directory again, now holding the program.

Each child also reports which program it captured (``fused`` or the XLA program) and the process's start-up (the
import of JAX and the library, not counted). Prints a Markdown table; ``--out`` writes every number as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

CHILD_MARKER = "CAPTURE_RESULT "


def child(spec: dict) -> dict:
    """In a fresh process: build the model and time its capture (``spec``: model, batch, cache directory or None)."""
    start = time.perf_counter()
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
    startup = time.perf_counter() - start
    start = time.perf_counter()
    graph = generation.capture_graph(model, spec["batch"], event_mode=bench.event)
    seconds = time.perf_counter() - start
    return {"capture_s": seconds, "startup_s": startup, "fused": bool(graph.spec.fused),
            "device": jax.devices()[0].device_kind}


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


def measure(model: str, batch: int, timeout: float) -> dict:
    row = {"model": model, "batch": batch}
    plain = run_child({"model": model, "batch": batch, "cache": None}, timeout)
    with tempfile.TemporaryDirectory(prefix="lrnnx_jax_cache_") as cache:
        cold = run_child({"model": model, "batch": batch, "cache": cache}, timeout)
        warm = run_child({"model": model, "batch": batch, "cache": cache}, timeout)
    for name, result in (("no_cache", plain), ("cold", cold), ("warm", warm)):
        row[f"{name}_s"] = result.get("capture_s")
        if "error" in result:
            row[f"{name}_error"] = result["error"]
    row["program"] = "fused" if plain.get("fused") else "xla"
    row["device"] = plain.get("device")
    row["startup_s"] = plain.get("startup_s")
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| model | B | program | no cache s | cache cold s | cache warm s |", "|---|---:|---|---:|---:|---:|"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['program']} | {fmt(r['no_cache_s'])} | {fmt(r['cold_s'])} "
                     f"| {fmt(r['warm_s'])} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="Mamba,RGLRU,S7,S4,LRU", help="comma-separated names of MODELS")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per child process")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
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
    rows = []
    for name in names:
        for batch in args.batches:
            rows.append(measure(name, batch, args.timeout))
            print(json.dumps(rows[-1]), flush=True)
    print(markdown(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
