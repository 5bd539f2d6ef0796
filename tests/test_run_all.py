"""benchmarks/run_all.py end to end on a tiny configuration: CSV, JSON, report, progress and plotting fallbacks."""

from __future__ import annotations

import csv
import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repository root holds benchmarks/

from benchmarks import run_all  # noqa: E402

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
    assert target["lrnnx_us"] == 30.0 and target["meets_target"] == (target["us_per_step"] <= 10)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["target"][0]["us_per_step"] == pytest.approx(target["us_per_step"])
    assert saved["environment"]["command"].startswith("python -m benchmarks.run_all --models LRU")
    assert "## Target" in (tmp_path / "report.md").read_text()
    assert not list(tmp_path.glob("*.png"))


def test_bad_arguments_name_the_choices(capsys):
    with pytest.raises(SystemExit):
        run_all.parse_args(["--models", "LRU,Nope"])
    assert "unknown models ['Nope']" in capsys.readouterr().err
