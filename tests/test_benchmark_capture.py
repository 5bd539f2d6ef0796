"""benchmarks/benchmark_capture.py and lrnnx_jax.generation.enable_compilation_cache: capture_graph timed in fresh
processes, without a cache, then cold and warm with one (each child enables the cache itself, so this process's
JAX configuration is untouched)."""

from __future__ import annotations

import math

import pytest

from benchmarks import benchmark_capture
from lrnnx_jax import generation


def test_capture_in_fresh_processes():
    row = benchmark_capture.measure("LRU", 2, timeout=180)
    assert {k: v for k, v in row.items() if k.endswith("_error")} == {}
    assert (row["model"], row["batch"], row["program"], row["device"]) == ("LRU", 2, "xla", "cpu")
    for key in ("no_cache_s", "cold_s", "warm_s", "startup_s"):
        assert math.isfinite(row[key]) and row[key] > 0
    # the warm child loads the program the cold one wrote instead of compiling it (0.09 s against 0.42 s for LRU
    # on the 2-core CI machine): a wrong or absent cache directory would leave the two equal
    assert row["warm_s"] < 0.7 * row["cold_s"]
    # where the capture's seconds went: tracing, lowering and XLA's compilation, within the capture's own time
    events = row["compile_events_s"]
    assert {"jaxpr_trace", "jaxpr_to_mlir_module", "backend_compile"} <= set(events)
    assert all(v > 0 for v in events.values()) and sum(events.values()) < row["no_cache_s"]
    assert "| LRU | 2 | xla |" in benchmark_capture.markdown([row])


def test_enable_compilation_cache_refuses_a_non_path():
    with pytest.raises(TypeError, match="directory must be a str or os.PathLike, got int"):
        generation.enable_compilation_cache(3)


def test_unknown_model_is_refused():
    with pytest.raises(SystemExit):
        benchmark_capture.main(["--models", "NoSuchModel"])


def test_non_positive_repeats_are_refused(capsys):
    with pytest.raises(SystemExit):
        benchmark_capture.main(["--models", "LRU", "--steps", "4", "--repeats", "0"])
    assert "--repeats >= 1" in capsys.readouterr().err


def test_capture_with_options_also_times_the_steps():
    options = {"unroll": 2, "compiler_options": {"xla_backend_optimization_level": 0}, "steps": 4, "repeats": 3}
    row = benchmark_capture.measure("LRU", 2, timeout=180, options=options, cache_runs=False)
    assert {k: v for k, v in row.items() if k.endswith("_error")} == {}
    assert "cold_s" not in row and "warm_s" not in row
    assert all(math.isfinite(row[key]) and row[key] > 0 for key in ("us_per_step", "us_per_step_captured"))
    assert "unroll=2" in row["config"] and "('xla_backend_optimization_level', 0)" in row["config"]
