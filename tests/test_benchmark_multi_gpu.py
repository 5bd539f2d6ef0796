"""benchmarks/benchmark_multi_gpu.py end to end on 2 fake CPU devices (``--quick``), in subprocesses: the device
count is fixed when JAX starts. The numbers say nothing about GPUs; what is checked is that every part runs on one
device and on two, that its JSON holds consistent numbers (each derived figure recomputed here from the measured
ones), that the data-parallel step moves no activation between devices, that model-parallel decoding gives the
same greedy tokens as one device, that the sequence part's search finds the longest length under a memory limit
and runs twice that length on two devices, and that the time budget skips items cleanly."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CPU_FLAGS = ("--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0 "
             "--xla_llvm_disable_expensive_passes=true --xla_cpu_multi_thread_eigen=false")
#: per device, for the sequence part's search: 0.95 x 0.0047 GiB = 4.79e6 bytes. XLA's compiled peaks (Mamba
#: d_model 8, B=1, float32, jax 0.11.2 on the CPU) are 3.77e6 bytes at L=1024 and 5.35e6 at 2048 on one device,
#: 4.25e6 at 2048 over two: so the search from 512 finds 1024, and 2048 runs on two devices (margins of 11%)
MEMORY_LIMIT_GIB = 0.0047


def run_benchmark(tmp_path, name: str, *options: str) -> tuple[dict, str]:
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "XLA_FLAGS": CPU_FLAGS, "JAX_PLATFORMS": "cpu"}
    env.pop("NCCL_NVLS_ENABLE", None)  # the script's own default is checked
    completed = subprocess.run([sys.executable, "-m", "benchmarks.benchmark_multi_gpu", "--quick", "--out", str(out),
                                *options], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-6000:]
    return json.loads(out.read_text()), completed.stdout


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return run_benchmark(tmp_path_factory.mktemp("multi_gpu"), "quick", "--parts", "data,decode,sequence",
                         "--memory-limit-gib", str(MEMORY_LIMIT_GIB), "--sp-start-length", "512")


def by_devices(rows, **match) -> dict[int, dict]:
    return {r["devices"]: r for r in rows if all(r.get(k) == v for k, v in match.items())}


def test_environment_and_meshes(quick):
    result, stdout = quick
    env = result["environment"]
    assert (env["NCCL_NVLS_ENABLE"], env["XLA_PYTHON_CLIENT_PREALLOCATE"]) == ("0", "false")
    assert (env["platform"], env["num_devices"], env["kernel_config"]["use_kernels"]) == ("cpu", 2, "never")
    assert result["elapsed_s"] < env["time_budget_s"]
    meshes = result["meshes"]
    for name, axis in (("data/1", "data"), ("data/2", "data"), ("model/2", "model"), ("sequence/2", "sequence")):
        size = int(name[-1])
        assert meshes[name]["axis_names"] == [axis] and meshes[name]["shape"] == {axis: size}, meshes[name]
        assert len(set(meshes[name]["devices"])) == size
    for heading in ("### 1. Data-parallel", "### 2. Model-parallel decode", "### 3. Sequence-parallel"):
        assert heading in stdout


def test_data_parallel_rows(quick):
    data = quick[0]["parts"]["data"]
    for model in ("Mamba", "S5-scan"):
        rows = by_devices(data["rows"], model=model)
        assert {n: r["status"] for n, r in rows.items()} == {1: "ok", 2: "ok"}, rows
        for n, r in rows.items():
            assert r["B"] == n * r["B_per_device"] and r["L"] == 64
            assert r["tokens_per_s"] == pytest.approx(r["B"] * r["L"] / r["median_s"], rel=1e-12)
            assert r["step_ms"] == pytest.approx(1e3 * r["median_s"], rel=1e-12)
            assert math.isfinite(r["loss"]) and r["loss"] > 0 and r["peak_bytes_per_device"] > 0
        assert rows[2]["activation_collectives"] == 0  # only the gradient's all-reduce crosses devices
        comparison = next(c for c in data["comparisons"] if c["model"] == model)
        assert comparison["speedup"] == pytest.approx(rows[2]["tokens_per_s"] / rows[1]["tokens_per_s"], rel=1e-12)
        assert comparison["meets_target"] == (comparison["speedup"] >= 1.8)


def test_model_parallel_decode_rows(quick):
    decode = quick[0]["parts"]["decode"]
    rows = by_devices(decode["rows"], B=2)
    assert {n: r["status"] for n, r in rows.items()} == {1: "ok", 2: "ok"}, rows
    for r in rows.values():
        assert (r["new_tokens"], r["short_new_tokens"]) == (16, 9)  # 9..16: the same power-of-two bucket
        assert r["ms_per_token_total"] == pytest.approx(1e3 * r["total_s"] / 16, rel=1e-12)
        assert r["ms_per_token_marginal"] == pytest.approx(1e3 * (r["total_s"] - r["short_total_s"]) / 7, rel=1e-12)
    (comparison,) = decode["comparisons"]
    assert comparison["tokens_identical"] and comparison["tokens_agreeing_fraction"] == 1.0
    assert comparison["first_differing_position"] is None
    assert comparison["speedup_total"] == pytest.approx(
        rows[1]["ms_per_token_total"] / rows[2]["ms_per_token_total"], rel=1e-12)
    assert decode["config"]["mixers"] == ["Mamba", "attn", "Mamba2", "attn"] and decode["config"]["parameters"] > 0


def test_sequence_search_and_two_devices(quick):
    sequence = quick[0]["parts"]["sequence"]
    limit = sequence["memory_fraction"] * sequence["memory_bytes_per_device"]
    assert sequence["memory_bytes_per_device"] == int(MEMORY_LIMIT_GIB * 2**30)
    search = sequence["search"]
    assert [r["devices"] for r in search] == [1] * len(search) and search[0]["L"] == 512
    fits = [r["L"] for r in search if r["status"] == "ok"]
    ooms = [r for r in search if r["status"] == "oom"]
    for r in search:  # the status follows from the compiled peak and the limit
        assert (r["peak_bytes_per_device"] <= limit) == (r["status"] == "ok"), r
        assert all(math.log2(r["L"]).is_integer() for r in search)
    assert ooms and all(r["how"] == "predicted" for r in ooms)
    longest = sequence["longest_fitting_one_device"]
    assert longest == max(fits) and sequence["search_complete"] and 2 * longest in [r["L"] for r in ooms]
    assert all(r["us_per_token"] == pytest.approx(1e6 * r["median_s"] / r["L"], rel=1e-12)
               for r in search if r["status"] == "ok")
    two = sequence["two_devices"][0]
    assert (two["devices"], two["L"]) == (2, 2 * longest)
    assert two["status"] == "ok", two  # the length split over two devices fits each of them
    assert sequence["oom_on_one_runs_on_two"] == 2 * longest
    (comparison,) = sequence["comparisons"]
    one = next(r for r in search if r["L"] == longest)
    assert comparison["ratio"] == pytest.approx(two["us_per_token"] / one["us_per_token"], rel=1e-12)


def test_time_budget_skips_the_rest_and_still_writes(tmp_path):
    """Half a second: the first item starts (no compile time is known yet), every later one is skipped."""
    result, stdout = run_benchmark(tmp_path, "budget", "--parts", "data", "--time-budget", "0.5")
    rows = result["parts"]["data"]["rows"]
    assert [(r["model"], r["devices"], r["status"]) for r in rows] == [
        ("Mamba", 1, "ok"), ("Mamba", 2, "skipped"), ("S5-scan", 1, "skipped"), ("S5-scan", 2, "skipped")]
    assert all(r["reason"].startswith("time budget: ") for r in rows[1:])
    assert result["parts"]["data"]["comparisons"] == [] and "### 1. Data-parallel" in stdout
