"""benchmarks/run_all.py end to end on a tiny configuration: CSV, JSON, report, progress and plotting fallbacks, and
the comparison with PyTorch lrnnx's numbers only where an anchors file holds them for this device kind."""

from __future__ import annotations

import csv
import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repository root holds benchmarks/

from benchmarks import anchors, run_all  # noqa: E402

TINY = ["--models", "LRU", "--seq-lengths", "2,4", "--target-batch", "2", "--target-dim", "6", "--target-state", "3",
        "--target-steps", "4", "--chunk-size", "4", "--block-size", "2", "--unroll", "1", "--repeats", "1",
        "--warmup", "0", "--runs", "1"]


def test_run_all_writes_every_output(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # no tqdm: plain progress lines
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # no matplotlib: a message, no plots
    results = run_all.main(TINY + ["--sweeps", "seq,target", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "[1/4] seq LRU seq_length=2" in out and "[4/4] target LRU block=2 unroll=1" in out
    assert "matplotlib is not installed: no plots" in out
    with open(tmp_path / "infer_seq_length.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["seq_length"] for row in rows] == ["2", "4"]
    assert list(rows[0])[:5] == ["model", "seq_length", "mean_ms", "min_ms", "max_ms"]  # lrnnx's columns first
    (target,) = results["target"]
    assert target["model"] == "LRU" and target["steps"] == 4 and target["d_state"] == 3
    assert target["us_per_step"] == pytest.approx(1e3 * target["mean_ms"] / 4)
    assert target["speedup_vs_loop"] == pytest.approx(target["loop_us_per_step"] / target["us_per_step"])
    assert target["meets_target"] == (target["us_per_step"] <= 10)
    # a CPU run is compared with no GPU number, and the report says which anchors it skipped and why
    assert target["lrnnx_us"] is None and target["lrnnx_device"] is None and target["speedup_vs_lrnnx"] is None
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["target"][0]["us_per_step"] == pytest.approx(target["us_per_step"])
    assert saved["environment"]["command"].startswith("python -m benchmarks.run_all --models LRU")
    assert saved["environment"]["device_kind"] == "cpu"
    assert saved["anchors"]["used"] == [] and len(saved["anchors"]["skipped"]) == 5
    assert {s["device"] for s in saved["anchors"]["skipped"]} == {"NVIDIA H100"}
    report = (tmp_path / "report.md").read_text()
    assert "## Target" in report and "compared with no anchor" in report
    assert ("skipped LRU (B=32, H=128, d_state=64, steps=512): 30 µs/step, PyTorch lrnnx CUDA-graph replay on "
            "NVIDIA H100; this run is on cpu, another device kind") in report
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.filterwarnings("ignore:generate produced non-finite values")  # an untrained LRU fed its outputs
def test_anchors_of_the_same_device_kind_fill_the_lrnnx_columns_and_plots(tmp_path, monkeypatch):
    """On a (pretended) H100 the published H100 anchor of LRU at its configuration fills the target row, with its
    device named; a named results file of lrnnx sweep numbers fills the sweep rows and is drawn in the plots."""
    monkeypatch.setattr(anchors, "device_kind", lambda: "NVIDIA H100 80GB HBM3")
    lrnnx_out = tmp_path / "lrnnx"
    lrnnx_out.mkdir()
    (lrnnx_out / "infer_seq_length.csv").write_text("model,seq_length,mean_ms,min_ms,max_ms\nLRU,2,0.5,0.4,0.6\n"
                                                     "LRU,4,0.8,0.7,0.9\nMamba,2,1.0,0.9,1.1\n")
    sweep_file = tmp_path / "lrnnx_sweeps.json"
    anchors.main(["--lrnnx-csv", str(lrnnx_out), "--device", "NVIDIA H100", "--out", str(sweep_file)])
    results = run_all.main([
        "--models", "LRU", "--sweeps", "seq,target", "--seq-lengths", "2,4", "--target-batch", "32", "--target-dim",
        "128", "--target-state", "64", "--target-steps", "512", "--block-size", "64", "--unroll", "1", "--repeats", "1",
        "--warmup", "0", "--runs", "1", "--no-baseline", "--anchors", str(anchors.DEFAULT_PATH),
        "--anchors", str(sweep_file), "--out", str(tmp_path / "out")])
    (target,) = results["target"]
    assert (target["lrnnx_us"], target["lrnnx_device"]) == (30.0, "NVIDIA H100")
    assert target["speedup_vs_lrnnx"] == pytest.approx(30.0 / target["us_per_step"])
    seq = results["sweeps"]["seq"]
    assert [(row["seq_length"], row["lrnnx_us"]) for row in seq] == [(2, 250.0), (4, 200.0)]  # 1e3 * ms / steps
    assert {row["lrnnx_device"] for row in seq} == {"NVIDIA H100"}
    used = {a["id"] for a in results["anchors"]["used"]}
    assert used == {"generate/LRU/B32", "generate/LRU/seq_length=2", "generate/LRU/seq_length=4"}
    report = (tmp_path / "out" / "report.md").read_text()
    assert "compared with LRU (B=32, H=128, d_state=64, steps=512): 30 µs/step, PyTorch lrnnx CUDA-graph replay " \
           "on NVIDIA H100 (source: BENCHMARKS.md section 2" in report
    assert "seq_length sweep, PyTorch lrnnx (µs per generated step, measured on NVIDIA H100)" in report
    assert "skipped Mamba (B=32, H=128, d_state=16, steps=2, sweep=seq_length): 500 µs/step" in report
    assert "no row of this run has its configuration" in report
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["infer_seq_length.png", "target.png"]


def test_bad_arguments_name_the_choices(capsys):
    with pytest.raises(SystemExit):
        run_all.parse_args(["--models", "LRU,Nope"])
    assert "unknown models ['Nope']" in capsys.readouterr().err
