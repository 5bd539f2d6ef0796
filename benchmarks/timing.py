"""Timing helpers shared by the benchmarks: medians after warm-up, with ``block_until_ready``; module constants
overridden for a tuning run."""

from __future__ import annotations

import contextlib
import statistics
import time

import jax
import jax.numpy as jnp


def median_seconds(fn, warmup: int, repeats: int, until_ready: bool = True) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed calls; until its result is ready,
    or (``until_ready=False``) until the call returns, the host's dispatch (each result is then waited for, untimed)."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = jax.block_until_ready(fn()) if until_ready else fn()
        times.append(time.perf_counter() - start)
        jax.block_until_ready(result)
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


@contextlib.contextmanager
def overridden(module, **values):
    """``module``'s attributes set to ``values`` inside the block (e.g. a kernel's tiling constants, read when the
    kernel is traced), and put back on exit."""
    previous = {name: getattr(module, name) for name in values}
    try:
        for name, value in values.items():
            setattr(module, name, value)
        yield
    finally:
        for name, value in previous.items():
            setattr(module, name, value)


def copy_bandwidth(n_bytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read plus bytes written)."""
    a = jnp.ones((n_bytes // 4,), jnp.float32)
    copy = jax.jit(jnp.copy)
    return 2 * n_bytes / median_seconds(lambda: copy(a), 2, repeats)
