"""benchmarks/profile_training.py: the device events it reads from a trace, their per-step sums, and a CPU run."""

from __future__ import annotations

import gzip
import json

import pytest

from benchmarks import profile_training as profile


def _trace():
    meta = lambda pid, name: {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}}  # noqa: E731
    kernel = lambda pid, name, ts, dur: {"ph": "X", "pid": pid, "name": name, "ts": ts, "dur": dur}  # noqa: E731
    return {"traceEvents": [
        meta(1, "/host:CPU"), meta(2, "/device:GPU:0"), meta(3, "/device:GPU:0 Compute"),
        kernel(1, "host_op", 0.0, 500.0), kernel(2, "fwd_kernel", 0.0, 120.0), kernel(2, "fwd_kernel", 200.0, 100.0),
        kernel(3, "loop_fusion", 110.0, 30.0), {"ph": "i", "pid": 2, "name": "instant"},
    ]}


def test_trace_events_sum_per_step_by_name(tmp_path):
    events = profile.trace_events(_trace())
    assert sorted(e["name"] for e in events) == ["fwd_kernel", "fwd_kernel", "loop_fusion"]
    # [0, 120] and [110, 140] overlap, [200, 300] does not: busy 140 + 100 us
    assert profile.busy_ms(events) == pytest.approx(0.24)
    # one idle gap, [140, 200], after loop_fusion (the event that ended last) and before the second fwd_kernel
    assert profile.idle_gaps(events, steps=2, top=5) == [
        {"before": "loop_fusion", "after": "fwd_kernel", "ms_per_step": pytest.approx(0.03), "count_per_step": 0.5}]
    assert profile.trace_events(_trace(), on_device=False) == [{"name": "host_op", "ts": 0.0, "dur": 500.0}]
    table = profile.kernel_table(events, steps=2)
    assert table == [{"name": "fwd_kernel", "ms_per_step": pytest.approx(0.11), "launches_per_step": 1.0},
                     {"name": "loop_fusion", "ms_per_step": pytest.approx(0.015), "launches_per_step": 0.5}]
    run = tmp_path / "plugins" / "profile" / "run"
    run.mkdir(parents=True)
    with gzip.open(run / "perfetto_trace.json.gz", "wt") as f:
        json.dump(_trace(), f)
    assert profile.read_trace(tmp_path) == _trace()
    with pytest.raises(FileNotFoundError, match="perfetto_trace"):
        profile.read_trace(tmp_path / "plugins" / "profile" / "empty_dir_that_does_not_exist")


def test_cpu_run_times_the_step_and_reports_no_device_stream(tmp_path, capsys):
    out = tmp_path / "profile.json"
    (result,) = profile.main(["--models", "LRU", "--batch", "2", "--dim", "4", "--length", "8", "--d-state", "2",
                              "--steps", "1", "--warmup", "1", "--repeats", "1", "--out", str(out),
                              "--hlo-dir", str(tmp_path / "hlo")])
    assert result["median_ms"] > 0 and result["kernels"] == [] and result["kernel_ms_per_step"] == 0
    assert result["pipelined_ms"] > 0 and 0 < result["dispatch_ms"]
    # the host's events: the traced calls' Python frames and the runtime's execution, each traced step once at least
    assert result["host_events"] and all(row["ms_per_step"] >= 0 for row in result["host_events"])
    assert max(row["launches_per_step"] for row in result["host_events"]) >= 1
    assert "ENTRY" in (tmp_path / "hlo" / "LRU_auto.hlo.txt").read_text()
    assert "no device events" in capsys.readouterr().out
    assert json.loads(out.read_text())["results"][0]["model"] == "LRU"


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        profile.parse_args(["--models", "NotAModel"])
    with pytest.raises(SystemExit):
        profile.parse_args(["--steps", "0"])
    with pytest.raises(SystemExit):
        profile.parse_args(["--pipeline", "0"])
