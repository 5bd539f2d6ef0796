"""FFT convolution vs chunked scan for the diagonal LTI forward (LRU), forward and forward+backward.

Decides ``lrnnx_jax.core.lti``'s ``method="auto"`` rule. Prints a markdown table (median ms after
warm-up, block_until_ready) and writes JSON with ``--out``.

    python -m benchmarks.benchmark_lti_paths --lengths 64 256 1024 4096 16384 --out results.json
"""

from __future__ import annotations

import argparse
import json
import platform

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.timing import median_seconds
from lrnnx_jax.models.lti import LRU


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256, 1024, 4096, 16384])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--d-state", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    print(f"jax {jax.__version__}, device {jax.devices()[0].device_kind}, B={args.batch} H={args.d_model} N={args.d_state}")
    print("| L | fft fwd ms | scan fwd ms | fft fwd+bwd ms | scan fwd+bwd ms |\n|---|---|---|---|---|")
    for length in args.lengths:
        x = jax.random.normal(jax.random.key(0), (args.batch, length, args.d_model))
        row = {"L": length}
        for method in ("fft", "scan"):
            model = LRU(args.d_model, args.d_state, r_min=0.5, r_max=0.99, method=method, rngs=nnx.Rngs(0))
            graphdef, params = nnx.split(model)
            fwd = jax.jit(lambda p, xx: nnx.merge(graphdef, p)(xx))
            grad = jax.jit(jax.grad(lambda p, xx: jnp.sum(nnx.merge(graphdef, p)(xx) ** 2)))
            row[f"{method}_fwd_ms"] = 1e3 * median_seconds(lambda: fwd(params, x), 2, args.repeats)
            row[f"{method}_fwdbwd_ms"] = 1e3 * median_seconds(lambda: grad(params, x), 2, args.repeats)
        rows.append(row)
        print(f"| {length} | {row['fft_fwd_ms']:.3f} | {row['scan_fwd_ms']:.3f} | {row['fft_fwdbwd_ms']:.3f} | {row['scan_fwdbwd_ms']:.3f} |")
    if args.out:
        meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "python": platform.python_version(),
                "batch": args.batch, "d_model": args.d_model, "d_state": args.d_state}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
