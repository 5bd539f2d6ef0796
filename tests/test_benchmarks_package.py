"""The benchmarks package: importable from any directory after the README's set-up, and its published anchors
(benchmarks/anchors.py, benchmarks/results/lrnnx_anchors.json) used only on the device kind they were measured on."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import anchors, benchmark_fused_generation, benchmark_lm_decode

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_benchmarks_import_from_any_working_directory(tmp_path):
    """As lrnnx's guide shows it: the editable install of ``make setup`` exposes the package, no sys.path edits."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("from benchmarks.benchmark_inference import benchmark_sequence_length; import benchmarks; "
            "print(benchmarks.__file__)")
    completed = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert pathlib.Path(completed.stdout.strip()) == REPO / "benchmarks" / "__init__.py"


@pytest.mark.parametrize("kind, device, same", [
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100", True),
    ("NVIDIA H100 PCIe", "NVIDIA H100", True),
    ("NVIDIA H200", "NVIDIA H200", True),
    ("NVIDIA H200", "NVIDIA H100", False),
    ("NVIDIA H100 80GB HBM3", "NVIDIA H200", False),
    ("cpu", "NVIDIA H100", False),
    ("TPU v5 lite", "NVIDIA H100", False),
    ("cpu", "NVIDIA", False),  # a vendor alone names no device
])
def test_same_device_needs_every_word_of_the_anchors_device(kind, device, same):
    assert anchors.same_device(device, kind) is same


def test_published_anchors_carry_what_was_measured_where_and_from_where():
    data = json.loads(anchors.DEFAULT_PATH.read_text())
    loaded = anchors.load(anchors.DEFAULT_PATH)
    assert len(loaded) == len(data["anchors"]) == 15 and len({a.id for a in loaded}) == 15
    for anchor in loaded:
        assert anchor.library == "PyTorch lrnnx" and anchor.source and anchor.measured["method"]
        assert anchor.unit in anchors.UNITS
    generate = {a.measured["model"]: a for a in loaded if a.benchmark == "generate"}
    assert {m: a.value for m, a in generate.items()} == {"S5": 30.0, "LRU": 30.0, "Mamba": 46.0, "RGLRU": 88.0,
                                                        "S7": 56.0}
    for model, anchor in generate.items():
        assert anchor.device == "NVIDIA H100" and "BENCHMARKS.md section 2" in anchor.source
        assert anchor.measured["method"] == "CUDA-graph replay"
        assert (anchor.measured["B"], anchor.measured["H"], anchor.measured["steps"]) == (32, 128, 512)
        assert anchor.measured["d_state"] == {"Mamba": 16, "RGLRU": None}.get(model, 64)
    lm = {(a.measured["method"], a.measured["B"]): a.value for a in loaded if a.benchmark == "lm_decode"}
    assert lm == {("eager step loop", 1): 2240.0, ("eager step loop", 32): 2930.0,
                  ("one CUDA graph of the whole LM step", 1): 157.0, ("one CUDA graph of the whole LM step", 32): 257.0}
    for anchor in loaded:
        if anchor.benchmark == "lm_decode":
            assert anchor.device == "NVIDIA H200"
            assert anchor.measured["stack"] == ["Mamba", "S5", "LRU", "RGLRU"]
            assert (anchor.measured["d_model"], anchor.measured["d_state"], anchor.measured["vocab"],
                    anchor.measured["dtype"]) == (512, 16, 32000, "float32")


def test_training_anchors_and_targets_are_the_issues_table_at_lrnnxs_point_on_the_h200():
    """lrnnx's training times and the targets of the training issue, both at B=32, H=128, L=2048, d_state 64
    (Mamba 16, RG-LRU none), float32, on an H200: benchmarks/benchmark_training.py compares with them."""
    train = [a for a in anchors.load(anchors.DEFAULT_PATH) if a.benchmark == "train"]
    targets = anchors.load(anchors.DEFAULT_PATH, key="targets")
    assert {a.measured["model"]: a.value for a in train} == {"LRU": 2.78, "S5": 2.97, "S4D": 3.41, "Mamba": 5.85,
                                                            "RGLRU": 3.43, "S7": 47.3}
    assert {a.measured["model"]: a.value for a in targets} == {"LRU": 1.39, "S5": 1.49, "S4D": 1.70, "ltv.S5": 1.49,
                                                              "Mamba": 2.9, "RGLRU": 1.7, "S7": 23.0}
    for anchor in train + targets:
        assert anchor.device == "NVIDIA H200" and anchor.unit == "ms" and "issue 14" in anchor.source
        assert anchor.library == ("PyTorch lrnnx" if anchor in train else "lrnnx_jax")
        measured = anchor.measured
        assert (measured["B"], measured["H"], measured["L"], measured["dtype"]) == (32, 128, 2048, "float32")
        assert measured["d_state"] == {"Mamba": 16, "RGLRU": None}.get(measured["model"], 64)
    assert anchors.anchors("NVIDIA H200", benchmark="train", key="targets").find(
        model="S7", B=32, H=128, L=2048, d_state=64).value == 23.0
    assert anchors.load(anchors.DEFAULT_PATH, key="no such list") == []


def test_anchors_split_by_device_kind():
    on_cpu = anchors.anchors("cpu")
    assert on_cpu.usable == [] and len(on_cpu.skipped) == 15
    assert all(why == "this run is on cpu, another device kind" for _, why in on_cpu.skipped)
    on_h100 = anchors.anchors("NVIDIA H100 80GB HBM3", benchmark="generate")
    assert len(on_h100.usable) == 5 and on_h100.skipped == []
    on_h200 = anchors.anchors("NVIDIA H200", benchmark="generate")  # an H100 number is not an H200 number
    assert on_h200.usable == [] and len(on_h200.skipped) == 5
    lm_on_h200 = anchors.anchors("NVIDIA H200", benchmark="lm_decode")
    assert len(lm_on_h200.usable) == 4 and lm_on_h200.skipped == []


def test_find_needs_the_same_configuration_and_the_summary_says_what_was_skipped():
    found = anchors.anchors("NVIDIA H100 80GB HBM3", benchmark="generate")
    assert found.find(model="LRU", B=32, H=128, steps=512, d_state=16) is None  # lrnnx's sweep state size
    assert found.find(model="LRU", B=2, H=128, steps=512, d_state=64) is None
    assert found.find(model="LRU", B=32, H=128, steps=512, d_state=64).value == 30.0
    assert found.find(model="RGLRU", B=32, H=128, steps=512, d_state=None).value == 88.0
    summary = found.summary()
    assert summary[0] == "anchor files: benchmarks/results/lrnnx_anchors.json; this run's device: NVIDIA H100 80GB HBM3"
    assert sum(line.startswith("compared with ") for line in summary) == 2
    assert sum(line.endswith("; no row of this run has its configuration") for line in summary) == 3
    assert [s["id"] for s in found.to_json()["skipped"]] == ["generate/S5/B32", "generate/Mamba/B32", "generate/S7/B32"]


def test_fused_benchmark_fills_lrnnx_only_at_the_anchors_batch_on_its_device():
    by_name = {spec.name: spec for spec in benchmark_fused_generation.MODELS}
    h100 = anchors.anchors("NVIDIA H100 80GB HBM3", benchmark="generate")
    columns = benchmark_fused_generation.lrnnx_columns
    assert columns(by_name["Mamba"], 32, 512, h100) == {"lrnnx_us": 46.0, "lrnnx_device": "NVIDIA H100"}
    assert columns(by_name["RGLRU"], 32, 512, h100) == {"lrnnx_us": 88.0, "lrnnx_device": "NVIDIA H100"}
    empty = {"lrnnx_us": None, "lrnnx_device": None}
    assert columns(by_name["Mamba"], 4096, 512, h100) == empty
    assert columns(by_name["S5-event"], 32, 512, h100) == empty
    assert columns(by_name["S7-small"], 32, 512, h100) == empty  # H=32: not the anchor's configuration
    assert columns(by_name["Mamba"], 32, 512, anchors.anchors("cpu", benchmark="generate")) == empty


def test_lm_decode_fills_lrnnx_for_stack_a_on_the_h200_only():
    h200 = anchors.anchors("NVIDIA H200", benchmark="lm_decode")
    row = benchmark_lm_decode.lrnnx_columns("a", 32, 100.0, h200)
    assert row == {"lrnnx_eager_us": 2930.0, "lrnnx_cuda_graph_us": 257.0, "lrnnx_device": "NVIDIA H200",
                   "speedup_vs_lrnnx_eager": 29.3, "speedup_vs_lrnnx_cuda_graph": 2.57}
    assert benchmark_lm_decode.lrnnx_columns("a", 1, None, h200) == {
        "lrnnx_eager_us": 2240.0, "lrnnx_cuda_graph_us": 157.0, "lrnnx_device": "NVIDIA H200"}
    assert benchmark_lm_decode.lrnnx_columns("b", 32, 100.0, h200) == {}  # attention in the stack
    assert benchmark_lm_decode.lrnnx_columns("a", 256, 100.0, h200) == {}
    for kind in ("cpu", "NVIDIA H100 80GB HBM3"):
        assert benchmark_lm_decode.lrnnx_columns("a", 32, 100.0, anchors.anchors(kind, benchmark="lm_decode")) == {}


def test_fused_benchmark_writes_its_json_after_every_model(tmp_path, monkeypatch):
    """``--out`` is rewritten after each model, so that a run stopped by the device's time limit keeps what it
    measured (``complete`` false until the end)."""
    out = tmp_path / "fused.json"
    seen = []
    measure = benchmark_fused_generation.bench_model

    def bench_model(spec, batch, *args):
        if seen:  # the first model's rows are on disk before the second runs
            saved = json.loads(out.read_text())
            assert saved["complete"] is False and [row["model"] for row in saved["rows"]] == seen
        seen.append(spec.name)
        return measure(spec, batch, *args)

    monkeypatch.setattr(benchmark_fused_generation, "bench_model", bench_model)
    monkeypatch.setattr(benchmark_fused_generation, "copy_bandwidth", lambda: 1e12)
    assert benchmark_fused_generation.main(["--models", "LRU,ltv.S5", "--batches", "2", "--steps", "3", "--repeats", "1",
                                            "--warmup", "0", "--no-loop", "--no-xla", "--no-plot", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert seen == ["LRU", "ltv.S5"] and saved["complete"] is True
    assert [(row["model"], row["batch"]) for row in saved["rows"]] == [("LRU", 2), ("ltv.S5", 2)]
    assert all(row["fused_us"] > 0 for row in saved["rows"])
    assert not (tmp_path / "fused.json.partial").exists()


def test_step_and_call_us_is_the_line_through_the_two_rollouts():
    rng = np.random.default_rng(11)
    per_step, per_call = rng.uniform(1e-6, 1e-5), rng.uniform(1e-5, 1e-3)
    step_us, call_us = benchmark_fused_generation.step_and_call_us(per_call + 512 * per_step, per_call + 256 * per_step,
                                                                   512)
    assert step_us == pytest.approx(1e6 * per_step, rel=1e-9) and call_us == pytest.approx(1e6 * per_call, rel=1e-9)
    step_us, call_us = benchmark_fused_generation.step_and_call_us(per_call + 7 * per_step, per_call + 3 * per_step, 7)
    assert step_us == pytest.approx(1e6 * per_step, rel=1e-9) and call_us == pytest.approx(1e6 * per_call, rel=1e-9)


def test_fused_benchmark_fixed_cost_times_half_the_steps_for_both_paths(monkeypatch, capsys):
    """``--fixed-cost``: every fused variant and the XLA program are also timed over ``steps // 2`` steps, and the
    two medians give the cost per step and per call."""
    built, seconds = [], iter([0.009, 0.005, 0.006, 0.004])  # XLA over 8 then 4 steps, then the fused rollout

    def runner(kind):
        def make(model, x0, tau, steps, *config):
            built.append((kind, steps))
            return (lambda: None), 0.1
        return make

    monkeypatch.setattr(benchmark_fused_generation, "xla_runner", runner("xla"))
    monkeypatch.setattr(benchmark_fused_generation, "fused_runner", runner("fused"))
    monkeypatch.setattr(benchmark_fused_generation, "median_seconds", lambda run, warmup, repeats: next(seconds))
    monkeypatch.setattr(benchmark_fused_generation, "copy_bandwidth", lambda: 1e12)
    rows = []
    monkeypatch.setattr(benchmark_fused_generation, "write_results",
                        lambda path, device, bandwidth, new, anchors, complete: rows.extend(new) if complete else None)
    assert benchmark_fused_generation.main(["--models", "LRU", "--batches", "2", "--steps", "8", "--no-loop",
                                            "--no-plot", "--fixed-cost"]) == 0
    assert built == [("xla", 8), ("xla", 4), ("fused", 8), ("fused", 4)]
    [row] = rows
    assert row["xla_us"] == pytest.approx(1e6 * 0.009 / 8) and row["fused_us"] == pytest.approx(1e6 * 0.006 / 8)
    assert row["xla_step_us"] == pytest.approx(1e3) and row["xla_call_us"] == pytest.approx(1e3)
    assert row["fused_step_us"] == pytest.approx(5e2) and row["fused_call_us"] == pytest.approx(2e3)
    assert row["compile_s"] == 0.1
    assert "fused_step_us | fused_call_us | xla_step_us | xla_call_us" in capsys.readouterr().out


def test_fused_benchmark_fixed_cost_needs_two_steps(capsys):
    with pytest.raises(SystemExit):
        benchmark_fused_generation.main(["--models", "LRU", "--steps", "1", "--fixed-cost", "--no-plot"])
    assert "--fixed-cost times half the steps as well: it needs --steps of at least 2, got 1" in capsys.readouterr().err
