"""Timing helpers shared by the benchmarks: medians after warm-up, with ``block_until_ready``."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def median_seconds(fn, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(n_bytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read plus bytes written)."""
    a = jnp.ones((n_bytes // 4,), jnp.float32)
    copy = jax.jit(jnp.copy)
    return 2 * n_bytes / median_seconds(lambda: copy(a), 2, repeats)
