"""benchmarks/benchmark_multi_gpu.py end to end on 2 fake CPU devices (``--quick``), in subprocesses: the device
count is fixed when JAX starts. The numbers say nothing about GPUs; what is checked is that every part runs on one
device and on two, that its JSON holds consistent numbers (each derived figure recomputed here from the measured
ones), that the data-parallel step moves no activation between devices, that model-parallel decoding gives the
same greedy tokens and nearly the same logits as one device, that the sequence part's search (each attempt in a
child process) finds the longest length under a memory limit and runs twice that length on two devices, that a
child that hangs is killed and recorded, and that the time budget skips items cleanly. The pieces that a CPU run
cannot reach (a child that runs out of memory and then hangs or dies, XLA's rematerialization warning, the search's
halving back) are checked in this process on made-up children, logs and peaks."""

from __future__ import annotations

import importlib
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CPU_FLAGS = ("--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0 "
             "--xla_llvm_disable_expensive_passes=true --xla_cpu_multi_thread_eigen=false")
#: per device, for the sequence part: 0.0065 GiB = 6.98e6 bytes, so 6.63e6 on one device (--memory-fraction 0.95)
#: and 5.93e6 on two (--two-device-memory-fraction 0.85). XLA's compiled peaks (Mamba d_model 8, B=1, float32,
#: jax 0.11.2 on the CPU; Mamba's projections by blocks and the step's softplus inside the scan) are 3.51e6 bytes at
#: L=1024, 4.81e6 at 2048 and 7.40e6 at 4096 on one device, 5.36e6 at 4096 over two: so the search from 1024 finds
#: 2048 (4096 OOM), and 4096 runs on two devices (margins of about 10%)
MEMORY_LIMIT_GIB = 0.0065


def run_benchmark(tmp_path, name: str, *options: str) -> tuple[dict, str]:
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "XLA_FLAGS": CPU_FLAGS, "JAX_PLATFORMS": "cpu"}
    for name in ("NCCL_NVLS_ENABLE", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
        env.pop(name, None)  # the script's own defaults are checked
    completed = subprocess.run([sys.executable, "-m", "benchmarks.benchmark_multi_gpu", "--quick", "--out", str(out),
                                *options], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-6000:]
    return json.loads(out.read_text()), completed.stdout


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return run_benchmark(tmp_path_factory.mktemp("multi_gpu"), "quick", "--parts", "data,decode,sequence",
                         "--memory-limit-gib", str(MEMORY_LIMIT_GIB), "--sp-start-length", "1024",
                         "--train-batch-per-device", "3")


@pytest.fixture(scope="module")
def bench():
    """The benchmark module, imported here (it sets NCCL_NVLS_ENABLE, XLA_PYTHON_CLIENT_PREALLOCATE and XLA_FLAGS
    when imported: the environment is put back for the other tests' subprocesses)."""
    saved = dict(os.environ)
    try:
        return importlib.import_module("benchmarks.benchmark_multi_gpu")
    finally:
        os.environ.clear()
        os.environ.update(saved)


def by_devices(rows, **match) -> dict[int, dict]:
    return {r["devices"]: r for r in rows if all(r.get(k) == v for k, v in match.items())}


def test_environment_and_meshes(quick):
    result, stdout = quick
    env = result["environment"]
    assert (env["NCCL_NVLS_ENABLE"], env["XLA_PYTHON_CLIENT_PREALLOCATE"]) == ("0", "false")
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.95"
    assert (env["platform"], env["num_devices"], env["kernel_config"]["use_kernels"]) == ("cpu", 2, "never")
    assert (env["timed_matmul_precision"], env["default_matmul_precision"], env["compared_matmul_precision"]) == (
        "default", "default", "highest")
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
        assert {r["B_per_device"] for r in rows.values()} == {3}  # --train-batch-per-device
        comparison = next(c for c in data["comparisons"] if c["model"] == model)
        assert comparison["B_per_device"] == 3
        assert comparison["speedup"] == pytest.approx(rows[2]["tokens_per_s"] / rows[1]["tokens_per_s"], rel=1e-12)
        assert comparison["meets_target"] == (comparison["speedup"] >= 1.8)


def test_model_parallel_decode_rows(quick):
    decode = quick[0]["parts"]["decode"]
    rows = by_devices(decode["rows"], B=2)
    assert {n: r["status"] for n, r in rows.items()} == {1: "ok", 2: "ok"}, rows
    for r in rows.values():
        assert (r["new_tokens"], r["short_new_tokens"]) == (16, 9)  # 9..16: the same power-of-two bucket
        assert r["check_compile_and_call_s"] > 0
        assert r["ms_per_token_total"] == pytest.approx(1e3 * r["total_s"] / 16, rel=1e-12)
        assert r["ms_per_token_marginal"] == pytest.approx(1e3 * (r["total_s"] - r["short_total_s"]) / 7, rel=1e-12)
    (comparison,) = decode["comparisons"]
    assert (comparison["matmul_precision"], comparison["timed_matmul_precision"]) == ("highest", "default")
    assert (decode["config"]["matmul_precision"], decode["config"]["timed_matmul_precision"]) == ("highest", "default")
    assert comparison["tokens_identical"] and comparison["tokens_agreeing_fraction"] == 1.0
    assert comparison["first_differing_position"] is None and comparison["top_two_gap_at_first_difference"] is None
    assert comparison["timed_tokens_agreeing_fraction"] == 1.0
    # every position compared (no token differs); float32 sums split over two devices round differently: logits
    # of magnitude ~0.3 (d_model 32, 4 layers) differ by a few ulps (measured 3.7e-7, 1.2e-6 relative), far below
    # 1e-5 relative (~80 float32 ulps), which a wrong split (a missing all-reduce: O(1) differences) would exceed
    assert comparison["logits_compared_positions"] == 2 * 16
    assert comparison["logits_max_abs_difference"] >= 0 and 0 <= comparison["logits_max_relative_difference"] < 1e-5
    assert comparison["speedup_total"] == pytest.approx(
        rows[1]["ms_per_token_total"] / rows[2]["ms_per_token_total"], rel=1e-12)
    assert decode["config"]["mixers"] == ["Mamba", "attn", "Mamba2", "attn"] and decode["config"]["parameters"] > 0


def test_sequence_search_and_two_devices(quick):
    sequence = quick[0]["parts"]["sequence"]
    memory = sequence["memory_bytes_per_device"]
    assert memory == int(MEMORY_LIMIT_GIB * 2**30) and "unfinished" not in sequence
    assert (sequence["memory_fraction"], sequence["two_device_memory_fraction"]) == (0.95, 0.85)
    limits = {1: 0.95 * memory, 2: 0.85 * memory}
    search = sequence["search"]
    assert [r["devices"] for r in search] == [1] * len(search) and search[0]["L"] == 1024
    fits = [r["L"] for r in search if r["status"] == "ok"]
    ooms = [r for r in search if r["status"] == "oom"]
    for r in [*search, *sequence["two_devices"]]:  # the status follows from the compiled peak and the limit
        assert (r["peak_bytes_per_device"] <= limits[r["devices"]]) == (r["status"] == "ok"), r
        assert math.log2(r["L"]).is_integer()
        assert 0 < r["child_startup_s"] < r["child_s"] and r["compile_s"] < r["child_s"]  # each ran in a child
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


@pytest.mark.parametrize("fits_two, expected", [
    (lambda n: True, [(2, 2048)]),                                        # 2L fits two devices: nothing more
    (lambda n: n <= 1536, [(2, 2048), (2, 1536), (1, 1536), (2, 1024)]),  # 3L/2 fits two, not one: checked on one
    (lambda n: n <= 1024, [(2, 2048), (2, 1536), (2, 1024)]),             # 3L/2 fits neither: L on two only
])
def test_two_device_attempts(bench, fits_two, expected):
    """The lengths tried after the search (longest fitting one device: 1024) and the OOMs found on one device."""
    tried, ooms = [], {2048}

    def attempt(devices, fits):
        def run(length):
            tried.append((devices, length))
            return {"status": "ok" if fits(length) else "oom"}
        return run

    bench.two_device_attempts(attempt(2, fits_two), attempt(1, lambda n: n <= 1024), 1024, ooms)
    assert tried == expected
    assert ooms == ({2048, 1536} if (1, 1536) in expected else {2048})


def test_time_budget_skips_the_rest_and_still_writes(tmp_path):
    """Half a second: the first item starts (no compile time is known yet), every later one is skipped."""
    result, stdout = run_benchmark(tmp_path, "budget", "--parts", "data", "--time-budget", "0.5")
    rows = result["parts"]["data"]["rows"]
    assert [(r["model"], r["devices"], r["status"]) for r in rows] == [
        ("Mamba", 1, "ok"), ("Mamba", 2, "skipped"), ("S5-scan", 1, "skipped"), ("S5-scan", 2, "skipped")]
    assert all(r["reason"].startswith("time budget: ") for r in rows[1:])
    assert result["parts"]["data"]["comparisons"] == [] and "### 1. Data-parallel" in stdout


def test_sequence_child_that_hangs_is_killed_and_recorded(tmp_path):
    """A child given half a second (it needs ~3 s to start JAX) stands for one that hangs: it is killed, recorded
    as an error with how it ended, the search stops there, and the run finishes and writes its JSON."""
    result, stdout = run_benchmark(tmp_path, "hang", "--parts", "sequence", "--sp-attempt-timeout", "0.5",
                                   "--sp-start-length", "64")
    sequence = result["parts"]["sequence"]
    (row,) = sequence["search"]
    assert (row["devices"], row["L"], row["status"]) == (1, 64, "error"), row
    assert row["how"] == "child timed out after 0.5 s (killed)" and 0.5 <= row["child_s"] < 10
    assert sequence["reason"] == "the search ended before a length fitted" and sequence["two_devices"] == []
    assert "unfinished" not in sequence and "error (child timed out after 0.5 s (killed))" in stdout


def python_child(bench, code: str, timeout: float):
    return bench.run_child([sys.executable, "-c", textwrap.dedent(code)], timeout, dict(os.environ))


def test_run_child_reports_and_failures(bench):
    """Plain Python children (no JAX): a report, an allocation failure followed by a hang (as on the H200: one
    device's allocation failed, the other waited at NCCL's rendezvous), a crash, and a kill by a signal."""
    marker = bench.CHILD_RESULT_MARKER
    ok = python_child(bench, f"""
        print("noise"); print({marker!r} + '{{"row": {{"L": 8}}, "layouts": {{}}}}', flush=True)""", 30)
    assert (ok.report, ok.returncode, ok.timed_out) == ({"row": {"L": 8}, "layouts": {}}, 0, False)

    allocation = ("W external/xla/xla/tsl/framework/bfc_allocator.cc:291] Allocator (GPU_0_bfc) ran out of memory "
                  "trying to allocate 79.01GiB with freed_by_count=0.")
    hang = python_child(bench, f"""
        import sys, time
        sys.stderr.write({allocation!r} + "\\n"); sys.stderr.flush()
        sys.stderr.write("Expected 2 threads to join the rendezvous, but not all of them arrived on time.\\n")
        sys.stderr.flush(); time.sleep(60)""", 1.0)
    assert hang.report is None and hang.timed_out and hang.returncode == -signal.SIGKILL and hang.seconds < 10
    failure = bench.child_failure(hang, 1.0)
    assert (failure["status"], failure["how"], failure["reason"]) == (
        "oom", "child timed out after 1 s (killed)", allocation)
    assert failure["log_tail"].endswith("arrived on time.")

    crash = python_child(bench, "import sys; sys.stderr.write('Traceback ...\\nValueError: bad\\n'); sys.exit(3)", 30)
    failure = bench.child_failure(crash, 30)
    assert (crash.report, crash.timed_out) == (None, False)
    assert (failure["status"], failure["how"], failure["reason"]) == (
        "error", "child exited with code 3 without a result", "ValueError: bad")

    killed = python_child(bench, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)", 30)
    failure = bench.child_failure(killed, 30)
    assert (failure["status"], failure["how"], failure["reason"]) == ("error", "child killed by SIGKILL", "no output")


def test_rematerialization_warning_is_found_in_captured_stderr(bench):
    """XLA's warning, written to file descriptor 2 as its C++ logging does (two forms: with and without the byte
    counts), is captured and matched, and predicts an OOM as a peak above the limit does; an unrelated log does
    not."""
    with_bytes = ("W external/xla/xla/service/hlo_rematerialization.cc:3005] Can't reduce memory use below 95.79GiB "
                  "(102853420236 bytes) by rematerialization; only reduced to 105.66GiB (113451020288 bytes), down "
                  "from 105.66GiB (113451020288 bytes) originally")
    without_bytes = "Can't reduce memory use below 95.79GiB by rematerialization; only reduced to 105.66GiB"
    for line, expected in ((with_bytes, with_bytes[with_bytes.index("Can't"):with_bytes.index(", down")]),
                           (without_bytes, without_bytes), ("I compile.cc:12] compiled in 3.1 s", None)):
        with bench.captured_stderr() as log:
            os.write(2, (line + "\n").encode())
        assert log.text == line + "\n"
        match = bench.REMATERIALIZATION_FAILURE.search(log.text)
        assert (match.group(0) if match else None) == expected
        # the attempt is not run: a peak within the limit with the warning, or the peak above it, predicts OOM
        assert bench.predicted_out_of_memory(90 * 2**30, 95 * 2**30, log.text) == (expected and f"XLA: {expected}")
    assert bench.predicted_out_of_memory(96 * 2**30, 95 * 2**30, with_bytes) == (
        "compiled peak 96 GiB > 95 GiB; XLA: " + with_bytes[with_bytes.index("Can't"):with_bytes.index(", down")])
    assert bench.predicted_out_of_memory(95 * 2**30, 95 * 2**30, "") is None


def test_next_length(bench):
    """The search's steps, from made-up peaks (bytes) under a limit of 1000: the jump its peak per token predicts,
    at least a doubling, capped at the maximum; halving back after an overshoot; the end once twice the longest
    fit is OOM."""
    assert bench.next_length({64: 100}, set(), 1000.0, 2**20) == 512  # 64 * 1000 / 100 = 640 -> 512
    assert bench.next_length({64: 600}, set(), 1000.0, 2**20) == 128  # predicts 106 -> 64: at least double
    assert bench.next_length({64: 100}, set(), 1000.0, 256) == 256  # the cap
    assert bench.next_length({256: 100}, set(), 1000.0, 256) is None  # the cap reached
    assert bench.next_length({64: 100}, {512}, 1000.0, 2**20) == 256  # the jump overshot: halve back
    assert bench.next_length({64: 100, 128: 190}, {512}, 1000.0, 2**20) == 256
    assert bench.next_length({64: 100, 256: 370}, {512}, 1000.0, 2**20) is None  # 256 fits, 512 does not


def test_compare_greedy(bench):
    """Against a loop over rows and positions (float64): the logits of two placements differ by small noise, and
    in row 1 a near tie at position 2 flips; the later positions of that row (other prefixes) are not compared."""
    rng = np.random.default_rng(7)
    batch, length, vocab = 3, 5, 11
    logits_1 = rng.normal(size=(batch, length, vocab)).astype(np.float32)
    logits_1[1, 2, :2] = [4.0, 4.0 - 1e-4]  # a near tie, top of the row
    logits_2 = logits_1 + rng.normal(scale=1e-3, size=logits_1.shape).astype(np.float32)
    logits_2[1, 2, :2] = [4.0, 4.0 + 1e-4]
    logits_2[1, 3:] += 50.0  # after the flip: another prefix, so anything (not compared)
    tokens_1, tokens_2 = logits_1.argmax(-1), logits_2.argmax(-1)
    tokens_2[1, 3:] = (tokens_1[1, 3:] + 1) % vocab
    result = bench.compare_greedy(tokens_1, tokens_2, logits_1, logits_2)

    differences, relatives = [], []
    for b in range(batch):
        for t in range(length):
            if b == 1 and t > 2:
                continue
            a, c = logits_1[b, t].astype(np.float64), logits_2[b, t].astype(np.float64)
            differences.append(np.max(np.abs(c - a)))
            relatives.append(differences[-1] / np.max(np.abs(a)))
    assert result["tokens_identical"] is False and result["first_differing_position"] == 2
    assert result["tokens_agreeing_fraction"] == pytest.approx(1 - 3 / 15, rel=1e-15)
    assert result["logits_compared_positions"] == len(differences) == 13
    assert result["logits_max_abs_difference"] == pytest.approx(max(differences), rel=1e-12)
    assert result["logits_max_relative_difference"] == pytest.approx(max(relatives), rel=1e-12)
    assert result["top_two_gap_at_first_difference"] == pytest.approx(1e-4, rel=1e-2)  # float32 4.0 - 1e-4
    same = bench.compare_greedy(tokens_1, tokens_1, logits_1, logits_1)
    assert same["tokens_identical"] and same["first_differing_position"] is None
    assert (same["logits_compared_positions"], same["logits_max_abs_difference"]) == (15, 0.0)
    assert same["top_two_gap_at_first_difference"] is None
