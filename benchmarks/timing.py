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


def pipelined_seconds(fn, warmup: int, repeats: int, depth: int) -> float:
    """Wall time per call of ``fn()`` dispatched ``depth`` times back to back and blocked on once (the host's per-call
    work overlaps the device's, as in a training loop): the median over ``repeats`` such groups, after ``warmup``."""
    def group():
        start = time.perf_counter()
        jax.block_until_ready([fn() for _ in range(depth)])
        return (time.perf_counter() - start) / depth

    for _ in range(warmup):
        group()
    return statistics.median(group() for _ in range(repeats))


def dispatch_seconds(fn, warmup: int, repeats: int) -> float:
    """Median time for ``fn()`` to return, before its result is ready (the host's dispatch of one call); each call is
    blocked on afterwards, untimed."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        jax.block_until_ready(result)
    return statistics.median(times)


def copy_bandwidth(n_bytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read plus bytes written)."""
    a = jnp.ones((n_bytes // 4,), jnp.float32)
    copy = jax.jit(jnp.copy)
    return 2 * n_bytes / median_seconds(lambda: copy(a), 2, repeats)
