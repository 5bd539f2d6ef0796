"""benchmarks/benchmark_training.py: a quick run end to end (every path of a model with kernels and the one path of a
model without, gradients compared, the roofline columns), the time budget and the memory limit, the sweeps'
points, and lrnnx's times and the issue's targets only on their device kind and configuration."""

from __future__ import annotations

import argparse
import csv
import json
import math
import pathlib
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repository root holds benchmarks/

from benchmarks import anchors  # noqa: E402
from benchmarks import benchmark_training as bt  # noqa: E402

#: one point, B=2, H=8, L=16, which is also the large configuration under --quick (so it has the roofline columns)
ONE_POINT = ["--quick", "--sweeps", "seq,large", "--seq-lengths", "16", "--no-plot"]


def read_csv(path: pathlib.Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_quick_run_measures_every_path_and_compares_the_gradients(tmp_path, capsys):
    out = tmp_path / "training.json"
    results = bt.main(ONE_POINT + ["--models", "Mamba,S4", "--out", str(out)])
    printed = capsys.readouterr().out
    rows = {(row["model"], row["path"]): row for row in results["results"]}
    s4_kernels = bt.takes_kernel_config(type(bt.BY_NAME["S4"].build(8, 4, 0)))
    expected_s4 = ["xla", "kernels", "auto"] if s4_kernels else ["xla"]
    assert list(rows) == [("Mamba", p) for p in ("xla", "kernels", "auto")] + [("S4", p) for p in expected_s4]
    for row in rows.values():
        assert row["status"] == "ok" and (row["B"], row["H"], row["L"]) == (2, 8, 16)
        assert row["sweeps"] == "seq|large"
        assert 0 < row["median_ms"] < 1e4 and row["compile_s"] > 0 and row["peak_bytes"] > 0
        assert math.isfinite(row["loss"]) and row["loss"] != 0
        assert row["lrnnx_ms"] is None and row["target_ms"] is None  # a CPU run: no H200 number applies
    assert rows["Mamba", "xla"]["d_state"] == 16 and rows["S4", "xla"]["d_state"] == 4
    # the kernel path runs the Pallas scan (interpret mode) and its gradients equal the XLA path's: float32
    # summation-order differences over 16 steps, far below the 1e-5 the benchmark flags
    kernels, xla, auto = rows["Mamba", "kernels"], rows["Mamba", "xla"], rows["Mamba", "auto"]
    assert kernels["pallas"] and not xla["pallas"]
    assert kernels["max_rel_err_vs_xla"] < 1e-5 and kernels["grads_match"] is True
    assert kernels["loss"] == pytest.approx(xla["loss"], rel=1e-5)
    assert kernels["loss_abs_diff_vs_xla"] == abs(kernels["loss"] - xla["loss"])
    # off-GPU "auto" keeps the XLA path: the same program, the same numbers
    assert not auto["pallas"] and auto["max_rel_err_vs_xla"] == 0.0 and auto["grads_match"] is True
    # the roofline of the scan op: Mamba's scan reads u, delta, z (B, L, D), B, C (B, L, N), A (D, N), D (D,) and
    # h0 (B, D, N) and writes y (B, L, D) and h_last (B, D, N); D = 2 H, N = 16, float32
    B, L, D, N = 2, 16, 16, 16
    inputs = 4 * (3 * B * L * D + 2 * B * L * N + D * N + D + B * D * N)
    outputs = 4 * (B * L * D + B * D * N)
    assert kernels["scan_ops"] == 1 and kernels["scan_min_bytes"] == 3 * inputs + 2 * outputs
    assert kernels["roofline_ms"] == pytest.approx(1e3 * kernels["scan_min_bytes"] / bt.H200_HBM_BYTES_PER_S)
    assert kernels["roofline_fraction"] == pytest.approx(kernels["roofline_ms"] / kernels["scan_ms"])
    assert kernels["step_roofline_fraction"] == pytest.approx(kernels["roofline_ms"] / kernels["median_ms"])
    assert "scan_ms" not in xla and "scan_ms" not in auto  # no Pallas scan op in their programs
    if not s4_kernels:
        note = "S4: no kernel path (S4 takes no kernel_config): xla only, which is also auto"
        assert rows["S4", "xla"]["note"] == note
        assert rows["S4", "xla"]["note"] in printed
    # the files hold the same rows; the printed summary is at the benchmark point
    saved = json.loads(out.read_text())
    assert saved["stopped"] is None and saved["environment"]["device_kind"] == "cpu"
    assert saved["environment"]["config"]["check_precision"] == "highest"  # the compared values' programs: float32 dots
    assert "rtol 1e-05, matmul precision highest" in printed
    assert [(r["model"], r["path"]) for r in saved["results"]] == list(rows)
    assert saved["anchors"]["used"] == [] and saved["targets"]["used"] == []
    table = read_csv(out.with_suffix(".csv"))
    assert list(table[0]) == bt.CSV_COLUMNS
    assert [(r["model"], r["path"]) for r in table] == list(rows)
    assert [float(r["median_ms"]) for r in table] == pytest.approx([r["median_ms"] for r in rows.values()])
    assert "## At lrnnx's benchmark point B=2, H=8, L=16" in printed
    assert "| Mamba | kernels |" in printed and "0 mismatches, all within tolerance" in printed


def test_time_budget_and_memory_limit_stop_cleanly(tmp_path, capsys):
    out = tmp_path / "budget.json"
    results = bt.main(ONE_POINT + ["--models", "S4", "--time-budget", "0", "--out", str(out)])
    assert results["results"] == [] and results["stopped"] == "time budget of 0 s spent after 0 of 1 points"
    assert json.loads(out.read_text())["stopped"] == results["stopped"]
    assert read_csv(out.with_suffix(".csv")) == []
    assert "stopped: time budget of 0 s" in capsys.readouterr().out
    # a program whose estimated peak exceeds the memory allowed is compiled and analysed, not run: OOM
    results = bt.main(ONE_POINT + ["--models", "S4", "--paths", "xla", "--memory-fraction", "1e-12",
                                   "--out", str(tmp_path / "oom.json")])
    (row,) = results["results"]
    assert row["status"].startswith("OOM (not run: needs ") and "median_ms" not in row and row["peak_bytes"] > 0


def test_points_vary_one_axis_around_the_benchmark_point():
    head, rest = bt.sweep_points(bt.parse_args([]))
    assert head == [(bt.Point(B=32, H=128, L=2048), ("seq", "dim", "batch")),
                    (bt.Point(B=8, H=1024, L=4096), ("large",))]
    assert len(rest) == 8 + 4 + 4  # lrnnx's values without the point
    for point, (sweep,) in rest:
        changed = [axis for axis, value in (("B", 32), ("H", 128), ("L", 2048)) if getattr(point, axis) != value]
        assert changed == [bt.SWEEPS[sweep]]
    assert sorted(p.L for p, s in rest if s == ("seq",)) == [8, 16, 32, 64, 128, 256, 512, 1024]
    jobs = bt.schedule([bt.BY_NAME["LRU"], bt.BY_NAME["S7"]], head, rest)
    assert [(j[0], j[2].name) for j in jobs[:4]] == [(head[0][0], "LRU"), (head[0][0], "S7"), (head[1][0], "LRU"),
                                                     (head[1][0], "S7")]
    assert {j[2].name for j in jobs[4:20]} == {"LRU"} and {j[2].name for j in jobs[20:]} == {"S7"}
    with pytest.raises(SystemExit):
        bt.parse_args(["--models", "LRU,Attention"])


def test_kernel_config_is_found_through_keyword_forwarding_constructors():
    class Base:
        def __init__(self, d_model, *, kernel_config=None):
            pass

    class Forwarding(Base):
        def __init__(self, *args, extra=1, **kwargs):
            super().__init__(*args, **kwargs)

    class Closed(Base):
        def __init__(self, d_model):
            super().__init__(d_model)

    assert bt.takes_kernel_config(Forwarding) and bt.takes_kernel_config(Base)
    assert not bt.takes_kernel_config(Closed) and not bt.takes_kernel_config(object)
    assert bt.takes_kernel_config(type(bt.BY_NAME["Mamba"].build(8, 4, 0)))


def test_failures_are_recorded_as_oom_or_errors():
    assert bt.failure(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 3 GiB")) == "OOM"
    assert bt.failure(ValueError("bad shape\nmore")) == "error: ValueError: bad shape"


def test_lrnnx_times_and_targets_fill_rows_on_an_h200_at_their_configuration():
    point = dict(B=32, H=128, L=2048)
    rows = [dict(model="LRU", path="kernels", d_state=64, median_ms=1.0, status="ok", **point),
            dict(model="ltv.S5", path="xla", d_state=64, median_ms=2.0, status="ok", **point),
            dict(model="Mamba", path="xla", d_state=64, median_ms=2.0, status="ok", **point),  # not lrnnx's state
            dict(model="LRU", path="xla", d_state=64, median_ms=1.0, status="ok", B=32, H=128, L=1024)]
    h200 = [anchors.anchors("NVIDIA H200", benchmark="train", key=key) for key in ("anchors", "targets")]
    bt.compare_with_anchors(rows, *h200)
    assert [(r["lrnnx_ms"], r["target_ms"]) for r in rows] == [(2.78, 1.39), (None, 1.49), (None, None), (None, None)]
    table = bt.summary_table(rows, bt.Point(**point))
    assert "| LRU | kernels | 1 | 2.78 | 2.78 | 1.39 | 0.72 | met |" in table
    assert "| ltv.S5 | xla | 2 | - | - | 1.49 | 1.34 | missed |" in table and "L=1024" not in table
    elsewhere = [anchors.anchors(kind, benchmark="train", key=key) for kind in ("cpu", "NVIDIA H100 80GB HBM3")
                 for key in ("anchors", "targets")]
    for lrnnx, targets in zip(elsewhere[::2], elsewhere[1::2]):
        bt.compare_with_anchors(rows, lrnnx, targets)
        assert all(r["lrnnx_ms"] is None and r["target_ms"] is None for r in rows)


def test_set_overrides_a_kernel_constant_for_the_run_only(monkeypatch):
    from pallas_kernels import diagonal_scan
    before = diagonal_scan.CHUNK
    seen = {}

    def fake_run(args, argv):
        args.memory_limit = 1 << 30
        seen.update(chunk=diagonal_scan.CHUNK, recorded=bt.environment(args, argv)["constants"])
        return {}

    monkeypatch.setattr(bt, "run", fake_run)
    bt.main(["--quick", "--set", f"pallas_kernels.diagonal_scan.CHUNK={before // 2}"])
    assert seen == {"chunk": before // 2, "recorded": {"pallas_kernels.diagonal_scan.CHUNK": before // 2}}
    assert diagonal_scan.CHUNK == before  # restored
    for bad, message in (("diagonal_scan.CHUNK=4", "pallas_kernels.MODULE.NAME"),
                         ("pallas_kernels.diagonal_scan.NO_SUCH=4", "does not exist"),
                         ("pallas_kernels.diagonal_scan.OP=4", "not an integer constant"),
                         ("pallas_kernels.diagonal_scan.CHUNK=four", "INTEGER")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            bt.kernel_constant(bad)


def test_compiler_options_reach_the_timed_compile(tmp_path):
    """``--compiler-options``: recorded, and passed to XLA (which rejects an option it does not know)."""
    out = tmp_path / "t.json"
    base = [*ONE_POINT, "--sweeps", "seq", "--models", "LRU", "--paths", "xla", "--out", str(out)]
    result = bt.main([*base, "--compiler-options", '{"xla_gpu_enable_triton_gemm": false}'])
    assert result["environment"]["config"]["compiler_options"] == {"xla_gpu_enable_triton_gemm": False}
    assert [row["status"] for row in result["results"]] == ["ok"]
    result = bt.main([*base, "--compiler-options", '{"no_such_xla_option": 1}'])
    (row,) = result["results"]
    assert row["status"].startswith("error") and "no_such_xla_option" in row["status"]
    for bad in ('[1, 2]', '{"xla_gpu_autotune_level": [0]}', "{not json"):
        with pytest.raises(argparse.ArgumentTypeError, match="JSON"):
            bt.xla_options(bad)


def test_the_gradient_check_compares_the_gradients_not_a_cancelling_loss():
    """S7 at H=64 on the H200: the loss, 7.54 from a sum of 4.2 M outputs, differed by about 1e-3 between the paths,
    a relative 1.3e-4 that the check flagged. The check flags the gradients only; the loss's absolute difference is
    reported beside it."""
    rng = np.random.default_rng(7)
    grads = {"W": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)}
    close = jax.tree.map(lambda g: g * (1 + 1e-7), grads)
    row = bt.compare_with_xla((7.5414, close), (7.5402, grads), rtol=1e-5)
    assert row["grads_match"] is True and row["max_rel_err_vs_xla"] < 2e-7
    assert row["loss_abs_diff_vs_xla"] == pytest.approx(1.2e-3)
    off = {"W": grads["W"], "b": grads["b"] + 1e-3 * np.max(np.abs(grads["b"]))}
    row = bt.compare_with_xla((7.5402, off), (7.5402, grads), rtol=1e-5)
    assert row["grads_match"] is False and row["max_rel_err_vs_xla"] == pytest.approx(1e-3, rel=1e-6)
    assert row["loss_abs_diff_vs_xla"] == 0.0
