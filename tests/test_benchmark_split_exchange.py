"""benchmarks/benchmark_split_exchange.py: the Triton exchange's toy split rollout in interpret mode against the unsplit
driver, the Mosaic GPU cluster kernel lowered for CUDA, its float64 reference, and the ratios."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks import benchmark_split_exchange as bench


def test_triton_rollouts_match_the_unsplit_driver_for_both_exchanges():
    rows = bench.main(["--backends", "triton", "--steps", "6", "--batches", "1", "3", "--sizes", "2", "16"])
    assert [(r["exchange"], r["batch"], r["parts"]) for r in rows] == [
        (exchange, batch, parts) for exchange in ("barrier", "tagged") for batch in (1, 3) for parts in (2, 16)]
    assert all(r["error"] < 1e-5 and r["first_call_s"] > 0 for r in rows)
    assert not any("us_per_step" in r for r in rows)  # on the CPU nothing is timed


def test_mosaic_cluster_kernel_lowers_for_cuda_at_every_cluster_size():
    rows = bench.main(["--backends", "mosaic", "--steps", "4", "--clusters", "3", "--sizes", "2", "8", "16"])
    assert [(r["parts"], r["lowered"]) for r in rows] == [(2, True), (8, True), (16, True)]
    with pytest.raises(ValueError, match="steps must be even for the mosaic kernel, got 5"):
        bench.cluster_exchange(2, 2, 5)


def test_cluster_reference_is_the_recurrence():
    """One block per cluster: ``v <- v / 2 + 1/100``, so ``v_T = v_0 / 2^T + (1 - 2^-T) / 50``; and the blocks of a
    cluster hold the same sum after one step, offset by their ``(c + 1) / 100``."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 1, bench.FEATURES)).astype(np.float32)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(bench.cluster_reference(x, 7), x64 / 2**7 + (1 - 2.0**-7) / 50, rtol=1e-12)
    x = rng.standard_normal((2, 4, bench.FEATURES)).astype(np.float32)
    one = bench.cluster_reference(x, 1)
    np.testing.assert_allclose(one - one[:, :1], np.broadcast_to(0.01 * np.arange(4.0)[None, :, None], one.shape),
                               atol=1e-12)
    np.testing.assert_allclose(one[:, 0], x.astype(np.float64).sum(axis=1) / 8 + 0.01, rtol=1e-12)


def test_ratios_are_to_the_triton_barrier_at_the_same_programs():
    rows = [dict(backend="triton", exchange="barrier", batch=1, parts=4, us_per_step=2.0),
            dict(backend="triton", exchange="tagged", batch=1, parts=4, us_per_step=1.0),
            dict(backend="triton", exchange="barrier", batch=8, parts=4, us_per_step=4.0),
            dict(backend="triton", exchange="tagged", batch=8, parts=4, us_per_step=3.0),
            dict(backend="mosaic", exchange="cluster", batch=16, parts=4, us_per_step=0.5),
            dict(backend="mosaic", exchange="cluster", batch=16, parts=8, us_per_step=0.5),
            dict(backend="triton", exchange="tagged", batch=1, parts=16, note="refused")]
    ratios = [r.get("ratio_to_triton_barrier") for r in bench.with_ratios(rows)]
    assert ratios[:5] == [1.0, 0.5, 1.0, 0.75, 0.25] and ratios[5] is None and ratios[6] is None
    assert all(math.isfinite(r) for r in ratios[:5])


def test_unknown_backend_is_refused():
    with pytest.raises(SystemExit):
        bench.main(["--backends", "cuda"])
