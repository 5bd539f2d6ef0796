"""Peak memory and time of a Mamba training step for the three scan strategies.

    python -m benchmarks.benchmark_scan_memory                        # L = 1k, 2k, ..., 64k
    python -m benchmarks.benchmark_scan_memory --lengths 1k 2k 4k --out cpu.json
    python -m benchmarks.benchmark_scan_memory --scans chunked unchunked --no-time

For each sequence length ``L`` and each strategy of :func:`lrnnx_jax.core.scan.chunked_scan`

* ``chunked``: the chunked associative scan (``chunk_size=--chunk-size``),
* ``unchunked``: one associative scan over the whole sequence (``chunk_size=None``),
* ``sequential``: a ``lax.scan`` over time (``chunk_size=1``),

it compiles ``jax.jit(jax.value_and_grad(loss))`` (forward and backward, gradients of every
parameter) of ``Mamba(d_model=256, d_state=16)`` at batch 1, reads XLA's memory analysis of the
compiled program (``compiled.memory_analysis()``), and times it: the median wall time of
``--repeats`` calls after ``--warmup`` calls, each ended by ``block_until_ready``. Programs whose
estimated peak exceeds ``--memory-fraction`` of the device memory are compiled and analysed but
not run.

Prints a markdown table and, with ``--out``, writes the rows as JSON (rewritten after every row,
so an interrupted run keeps what it measured). Runs on any JAX backend (CPU, GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrnnx_jax.core.scan import DEFAULT_CHUNK_SIZE
from lrnnx_jax.models.ltv.mamba import Mamba

SCANS = ("chunked", "unchunked", "sequential")
MiB = 2**20


def parse_length(text: str) -> int:
    """``"4096"``, ``"4k"`` or ``"4K"`` -> 4096."""
    text = text.strip().lower()
    value = int(text[:-1]) * 1024 if text.endswith("k") else int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"a length must be >= 1, got {text!r}")
    return value


def chunk_size_of(scan: str, chunk_size: int):
    return {"chunked": chunk_size, "unchunked": None, "sequential": 1}[scan]


def device_memory_limit(device) -> int:
    """Bytes available to XLA on ``device`` (physical memory for the CPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_stats(compiled) -> dict:
    """XLA's compiled memory analysis in bytes, with ``peak_bytes = argument + output + temp - alias``
    (the buffers live at once in the worst case). ``peak_memory_in_bytes`` is the backend's own
    figure where it reports one (0 otherwise); on the CPU (jax 0.11.2) it is smaller than the
    temporaries alone, so it is recorded but not used."""
    analysis = compiled.memory_analysis()
    fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "generated_code_size_in_bytes", "peak_memory_in_bytes")
    stats = {name: int(getattr(analysis, name, 0) or 0) for name in fields}
    stats["peak_bytes"] = (stats["argument_size_in_bytes"] + stats["output_size_in_bytes"]
                           + stats["temp_size_in_bytes"] - stats["alias_size_in_bytes"])
    return stats


def build_train_step(model: Mamba):
    """``jit(value_and_grad(mean(model(x)^2)))`` of the parameters, and the parameters."""
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p, x):
        return jnp.mean(nnx.merge(graphdef, p)(x) ** 2)

    return jax.jit(jax.value_and_grad(loss)), params


def time_compiled(compiled, args, warmup: int, repeats: int) -> list[float]:
    """Wall times in ms of ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return times


def measure(model: Mamba, scan: str, length: int, args) -> dict:
    chunk_size = chunk_size_of(scan, args.chunk_size)
    model.chunk_size = chunk_size
    train_step, params = build_train_step(model)
    x = jnp.asarray(np.random.default_rng(args.seed).standard_normal((args.batch, length, args.d_model)), jnp.float32)
    row = {"L": length, "scan": scan, "chunk_size": chunk_size}
    start = time.perf_counter()
    try:
        compiled = train_step.lower(params, x).compile()
    except Exception as error:  # a backend that cannot compile this size: report and go on
        row["error"] = f"compile failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
        return row
    row["compile_s"] = time.perf_counter() - start
    row.update(memory_stats(compiled))
    if args.no_time:
        return row
    budget = args.memory_fraction * args.memory_limit
    if row["peak_bytes"] > budget:
        row["skipped"] = f"not run: needs {row['peak_bytes'] / MiB:.0f} MiB > {budget / MiB:.0f} MiB"
        return row
    try:
        times = time_compiled(compiled, (params, x), args.warmup, args.repeats)
    except Exception as error:  # e.g. RESOURCE_EXHAUSTED at run time
        row["error"] = f"run failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
        return row
    row["times_ms"] = times
    row["median_ms"] = statistics.median(times)
    return row


def markdown_row(row: dict) -> str:
    def mib(key):
        return f"{row[key] / MiB:.1f}" if key in row else "-"

    median = f"{row['median_ms']:.2f}" if "median_ms" in row else "-"
    compile_s = f"{row['compile_s']:.1f}" if "compile_s" in row else "-"
    chunk = "-" if row["chunk_size"] is None else str(row["chunk_size"])
    note = row.get("error") or row.get("skipped") or ""
    return (f"| {row['L']} | {row['scan']} | {chunk} | {mib('temp_size_in_bytes')} | {mib('peak_bytes')} "
            f"| {mib('peak_memory_in_bytes')} | {compile_s} | {median} | {note} |")


def environment(args) -> dict:
    device = jax.devices()[0]
    return {
        "device": f"{device.platform}:{device.device_kind}",
        "num_cpu_cores": os.cpu_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "memory_limit_bytes": args.memory_limit,
        "config": {k: getattr(args, k) for k in ("batch", "d_model", "d_state", "chunk_size", "warmup", "repeats", "seed")},
        "loss": "value_and_grad(mean(Mamba(x)**2)) w.r.t. all parameters, float32",
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", nargs="+", type=parse_length,
                        default=[1024 * 2**i for i in range(7)], help="sequence lengths, e.g. 1k 2k 4096 (default 1k..64k)")
    parser.add_argument("--scans", nargs="+", choices=SCANS, default=list(SCANS), help="strategies to compare")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="chunk of the chunked scan")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-time", action="store_true", help="compile and analyse memory only")
    parser.add_argument("--memory-fraction", type=float, default=0.9,
                        help="run only programs whose estimated peak is below this fraction of device memory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the results as JSON to this path")
    args = parser.parse_args(argv)
    args.memory_limit = device_memory_limit(jax.devices()[0])

    env = environment(args)
    model = Mamba(d_model=args.d_model, d_state=args.d_state, rngs=nnx.Rngs(args.seed))
    print(f"Mamba(d_model={args.d_model}, d_state={args.d_state}, D={model.d_inner}) training step, batch {args.batch}; "
          f"device {env['device']} ({env['num_cpu_cores']} CPU cores), jax {env['jax']}")
    print("memory: XLA compiled memory analysis; temp = temporaries, peak = argument + output + temp - alias, "
          "XLA peak = the backend's peak_memory_in_bytes; time: median of repeats after warm-up\n")
    print("| L | scan | chunk | temp MiB | peak MiB | XLA peak MiB | compile s | median ms | note |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---|")
    rows = []
    for length in args.lengths:
        for scan in args.scans:
            row = measure(model, scan, length, args)
            rows.append(row)
            print(markdown_row(row), flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump({"environment": env, "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
