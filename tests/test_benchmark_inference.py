"""benchmarks/benchmark_inference.py: the three sweeps on a tiny model, the two runners agree, progress, and the
command line's plots."""

from __future__ import annotations

import pathlib
import sys

import chex
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repository root holds benchmarks/

from benchmarks import benchmark_inference as infer  # noqa: E402
from conftest import relative_error  # noqa: E402
from lrnnx_jax.generation import GenerationConfig  # noqa: E402
from lrnnx_jax.models.lti.lru import LRU  # noqa: E402

CONFIG = GenerationConfig(chunk_size=4, block_size=2)
FAST = dict(repeats=2, warmup=1, runs=1, config=CONFIG)


def lru(H=6):
    return lambda: LRU(d_model=H, d_state=3, rngs=nnx.Rngs(0))


def test_generate_and_step_loop_runners_compute_the_same_rollout():
    model = lru()()
    x0, _ = infer.make_inputs(2, 6, event=False, seed=1)
    outputs = {}
    for runner, prepare in infer.RUNNERS.items():
        run, compile_s = prepare(model, 2, config=CONFIG)
        assert compile_s > 0
        outputs[runner] = run(x0, 7, None)
        chex.assert_shape(outputs[runner], (2, 7, 6))
    assert relative_error(outputs["generate"], outputs["step_loop"]) < 1e-5


def test_sweeps_time_every_value_after_one_capture_per_shape():
    seen = []
    record = lambda value, times: seen.append(value)  # noqa: E731
    by_length = infer.benchmark_sequence_length(lru(), [3, 9], batch_size=2, on_value=record, **FAST)
    assert seen == [3, 9]
    assert all(len(times) == 2 and min(times) > 0 for times in by_length.values())
    assert by_length.compile_s[3] == by_length.compile_s[9] > 0  # one generator serves every length
    by_width = infer.benchmark_model_dimension(lru, [4, 6], seq_len=5, batch_size=2, **FAST)
    by_batch = infer.benchmark_batch_size(lru(), [1, 3], seq_len=5, **FAST)
    for results, values in ((by_width, [4, 6]), (by_batch, [1, 3])):
        assert list(results) == values and list(results.compile_s) == values
        assert all(len(times) == 2 and min(times) > 0 for times in results.values())
    loop = infer.benchmark_sequence_length(lru(), [4], batch_size=2, runner="step_loop", **FAST)
    assert min(loop[4]) > 0
    with pytest.raises(ValueError, match=r"runner must be one of \['generate', 'step_loop'\], got 'eager'"):
        infer.benchmark_sequence_length(lru(), [4], runner="eager")


def test_event_inputs_and_defaults_match_lrnnx():
    x0, tau = infer.make_inputs(3, 5, event=True)
    chex.assert_shape((x0, tau), ((3, 5), (3, 1)))
    assert 0.01 <= tau.min() and tau.max() < 1.01
    assert infer.SEQ_LENGTHS == tuple(2**k for k in range(3, 12))
    assert infer.MODEL_DIMS == (16, 32, 64, 128, 256) and infer.BATCH_SIZES == (8, 16, 32, 64, 128)
    assert np.isfinite(infer.time_call(lambda: x0, warmup=0, runs=2))


def test_sweeps_show_progress_unless_asked_not_to(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # without tqdm: one printed line per value
    infer.benchmark_batch_size(lru(), [1, 2], seq_len=3, **FAST)
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    assert [line.split(":")[0] for line in lines] == ["batch_size [1/2] batch_size=1", "batch_size [2/2] batch_size=2"]
    assert all(line.endswith(" ms") for line in lines)
    infer.benchmark_batch_size(lru(), [1], seq_len=3, progress=False, **FAST)
    assert capsys.readouterr().out == ""


def test_command_line_runs_the_three_sweeps_and_plots_them(tmp_path):
    """``python -m benchmarks.benchmark_inference``: run_all's sweeps, with their plots written without a flag."""
    results = infer.main(["--models", "LRU", "--seq-lengths", "2,3", "--model-dims", "4", "--batch-sizes", "1",
                          "--seq-len", "2", "--target-batch", "2", "--target-dim", "6", "--chunk-size", "4",
                          "--block-size", "2", "--repeats", "1", "--warmup", "0", "--runs", "1", "--out", str(tmp_path)])
    assert results["target"] == [] and [len(results["sweeps"][s]) for s in ("seq", "dim", "batch")] == [2, 1, 1]
    for row in results["sweeps"]["seq"]:
        assert row["us_per_step"] == pytest.approx(1e3 * row["mean_ms"] / row["seq_length"])
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "infer_batch_size.png", "infer_model_dim.png", "infer_seq_length.png"]
