"""benchmarks/benchmark_host_overhead.py: every call of every model runs and is timed (``generate`` also through a
CapturedModel), the table marks the APIs a model has not, the JSON names the library that was timed, and unknown models
are refused."""

from __future__ import annotations

import json

import pytest

from benchmarks import benchmark_host_overhead as bench


def test_every_call_is_timed_and_written(tmp_path, capsys):
    out = tmp_path / "host.json"
    rows = bench.main(["--models", "LRU,LM", "--lm-layers", "2", "--warmup", "1", "--repeats", "2", "--out", str(out)])
    assert [(r["model"], r["call"]) for r in rows] == [("LRU", c) for c in bench.CALLS] + [
        ("LM", "step"), ("LM", "forward"), ("LM", "generate"), ("LM", "captured"), ("LM", "captured_step"),
        ("LM", "dispatch")]
    assert all(r["us"] > 0 for r in rows)
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and saved["library"].endswith("lrnnx_jax/__init__.py")
    printed = capsys.readouterr().out
    assert "| LM | " in printed and printed.count(" - ") == 1  # no multi_step for the language model


def test_unknown_models_are_refused(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--models", "LRU,GPT"])
    assert "--models: unknown ['GPT']; expected names of ['LRU', 'Mamba', 'S4', 'LM']" in capsys.readouterr().err
