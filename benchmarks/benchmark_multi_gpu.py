"""One GPU against two in one run: data-parallel training, model-parallel decoding, sequence-parallel training.

    python -m benchmarks.benchmark_multi_gpu --out benchmark_results/multi_gpu_h200x2.json      # 2 GPUs, ~5.5 min
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m benchmarks.benchmark_multi_gpu --quick   # CPU check

Every part measures the same program on 1 device and on 2 (the first two of ``jax.devices()``), in this process
(the sequence part: in child processes, below): the program is compiled first (``compile_s``, never timed), then
timed as the median of ``--repeats`` calls after ``--warmup`` calls (:func:`benchmarks.timing.median_seconds`; fewer
repeats when a call is long for the time left).

1. ``data``: data-parallel training throughput. One optax (adam) training step of ``Mamba`` and of ``S5`` (LTI,
   ``zoh``, d_state 64, ``method="scan"``), ``jax.jit`` with the parameters and optimizer state donated, loss
   ``mean((model(x) - target)^2)``; the batch is split over a ``"data"`` mesh axis (``parallel.shard_batch``), the
   parameters replicated (``parallel.replicate``), traced inside ``parallel.data_parallel(mesh)``. d_model 1024,
   L 4096, the same batch per device (8): B=8 on one device, B=16 on two. Reports tokens/s (``B L / step``), the
   speed-up (target >= 1.8x) and the compiled step's collectives that move a batch-shaped array (none expected).
   S5 with ``method="fft"`` is measured last (``data_fft``), with the time left: XLA gathers the batch around the FFT
   convolution (README, a known gap), so its speed-up shows that gap.
2. ``decode``: model-parallel decoding. A 4-layer hybrid language model (Mamba, attention, Mamba-2, attention; gated
   MLPs; d_model 2048, vocabulary 32000, float32), ``generate_tokens`` greedy from a 16-token prompt, on one device
   and split over a ``"model"`` mesh axis of two (``parallel.shard_model``; the same parameters: the same seed). ms
   per token at batch 1 and 32: ``total`` (the whole call / new tokens, prefill included) and ``marginal``
   (``(t(N) - t(N')) / (N - N')`` with N' in N's power-of-two bucket: the same compiled program, prefill excluded).
   The timed calls run at ``--timing-matmul-precision`` (JAX's default: TF32 on the GPU). The two placements are
   compared in one more call each at ``--matmul-precision`` (default ``highest``: TF32 rounds split reductions
   differently enough to flip near-tied argmaxes), with the logits: whether the greedy tokens are identical, the
   fraction that agrees, the first differing position, and the logits' largest difference where both runs have the
   same prefix (absolute, and relative to the position's largest logit), with the top-two gap where the tokens
   first differ (a near tie when it is below that difference). The timed calls' tokens are compared too.
3. ``sequence``: sequence-parallel forward + backward of ``Mamba`` (d_model 1024, B=1;
   ``jax.value_and_grad(mean(y^2))`` of the parameters). Every attempt runs in a child process of its own
   (``python -m benchmarks.benchmark_multi_gpu --sequence-attempt SPEC``: the same environment and ``XLA_FLAGS``,
   its row as JSON on stdout), killed after ``--sp-attempt-timeout`` seconds or the part's time left, so that an
   allocation that fails on one device while the other waits at a collective (a hang) costs one attempt, not the
   run: a child that times out or dies is recorded as ``oom`` when its log shows an out-of-memory error, else as
   ``error``, with how it ended and the log's last lines. The parent keeps the rows and the time budget. Each
   attempt is compiled first, its peak memory read from XLA's memory analysis (``peak = argument + output + temp -
   alias``, :func:`benchmarks.benchmark_scan_memory.memory_stats`), and it is not run (``oom``, ``how``
   ``predicted``) when that peak exceeds ``--memory-fraction`` (one device) or ``--two-device-memory-fraction``
   (two, default 0.85: a failed allocation there hangs the other device) of the device's memory, or when XLA's
   rematerialization pass logged that it could not bring the program under the device's limit; an out-of-memory
   error at compile or run time is ``oom`` too. The longest power-of-two L that fits one device is found by a
   search: after the first length that fits, the next attempt jumps to the longest power of two its peak per token
   predicts, then doubles until one OOMs (halving back when a jump overshoots). Then twice that longest L runs on
   two devices through ``parallel.sequence_parallel`` (a ``"sequence"`` mesh axis); if it does not fit there, 3L/2
   runs on two and, when it does, on one device (to find a length that is OOM on one and runs on two), then L
   itself on two (:func:`two_device_attempts`). Reports µs per token on each (target: two devices within 1.25x of one) and the length
   that is OOM on one device and runs on two.

``--time-budget`` seconds (default 330) bounds the whole run: the parts share it (30%, 30%, 40%, each part's unused
time passed on, ``data_fft`` the rest), an item is started only when the time left covers 1.5 x the mean compile
time seen so far (for a child: its start-up and compilation), and whatever is left out is recorded as skipped with
the reason; the JSON (``--out``) is rewritten after every part and after every attempt of the sequence part, so an
interrupted run keeps what it measured. It also records the meshes (axis names, sizes, devices) and the
environment (device kind, versions, ``NCCL_NVLS_ENABLE``, ``XLA_PYTHON_CLIENT_PREALLOCATE``, ``XLA_FLAGS``, the
matmul precisions), and prints a markdown summary.

Kernels: under a ``"data"`` mesh the Pallas kernels run per shard (``pallas_kernels.dispatch.per_shard``), but
under the ``"model"`` and ``"sequence"`` meshes they refuse and the XLA paths run, where one device would take a
kernel that ``"auto"`` selects. So that each comparison is of one program, ``--kernels never`` (default) sets
``pallas_kernels.set_config(use_kernels="never")`` for the whole run; ``--kernels auto`` measures what users get
(then the decode and sequence parts may compare a kernel on one device with the XLA path on two). ``NCCL_NVLS_ENABLE``
defaults to 0 (NVLink multicast off), ``XLA_PYTHON_CLIENT_PREALLOCATE`` is false and
``XLA_PYTHON_CLIENT_MEM_FRACTION`` defaults to 0.95; all are set before JAX is imported. The parent keeps the memory
pool of parts 1 and 2 while the sequence part's children run on the same devices, so a run that measures the
longest length one device holds runs ``--parts sequence`` alone (the part records the parent's bytes in use, and
each attempt its allocator's limit and the bytes in use when it started).
"""

from __future__ import annotations

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
# XLA's allocator may grow to this share of a GPU's memory (its default, 0.75, would make a quarter of an H200 look
# like an out-of-memory to the sequence part's attempts); the children inherit it
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
# XLA's multi-threaded CPU FFT can deadlock on 2-core machines (README); the --quick CPU run takes S5's FFT path
if "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Callable, Optional  # noqa: E402

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jaxlib  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.benchmark_scan_memory import device_memory_limit, memory_stats  # noqa: E402
from benchmarks.timing import median_seconds  # noqa: E402
from lrnnx_jax import parallel  # noqa: E402
from lrnnx_jax.architectures import LRNNLMHeadModel  # noqa: E402
from lrnnx_jax.decoding import bucket, generate_tokens  # noqa: E402
from lrnnx_jax.models.lti.s5 import S5  # noqa: E402
from lrnnx_jax.models.ltv.mamba import Mamba  # noqa: E402
from pallas_kernels import dispatch  # noqa: E402

GiB = 2**30
#: the parts, in order, with their share of the time budget (``data_fft`` takes what is left)
PARTS = {"data": 0.3, "decode": 0.3, "sequence": 0.4, "data_fft": 0.0}
TARGETS = {"data_speedup_min": 1.8, "sequence_time_per_token_ratio_max": 1.25}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every size of the run (``--quick`` replaces them with tiny ones)."""

    train_d_model: int = 1024
    train_length: int = 4096
    train_batch_per_device: tuple[int, ...] = (8,)
    s5_d_state: int = 64
    lm_d_model: int = 2048
    lm_vocab: int = 32000
    lm_d_intermediate: int = 5632
    lm_heads: int = 16
    lm_headdim: int = 64  # Mamba-2's head width
    decode_batches: tuple[int, ...] = (1, 32)
    prompt_length: int = 16
    new_tokens: int = 128
    sp_d_model: int = 1024
    sp_batch: int = 1
    sp_start_length: int = 32768
    sp_max_length: int = 2**24


#: the values of ``--matmul-precision`` and ``--timing-matmul-precision`` (``jax_default_matmul_precision``'s)
MATMUL_PRECISIONS = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32")
QUICK = Sizes(train_d_model=16, train_length=64, train_batch_per_device=(2,), s5_d_state=8, lm_d_model=32, lm_vocab=256,
              lm_d_intermediate=64, lm_heads=4, lm_headdim=16, decode_batches=(2,), prompt_length=8, new_tokens=16,
              sp_d_model=8, sp_start_length=64, sp_max_length=4096)
LM_MIXERS = ["Mamba", "attn", "Mamba2", "attn"]


# ====================================================================== time


class OutOfTime(Exception):
    """Raised before an item the time left does not cover; the item is recorded as skipped."""


class Clock:
    """The run's time budget, each part's deadline within it, and the compile times seen so far."""

    def __init__(self, seconds: float):
        self.start = time.perf_counter()
        self.end = self.start + seconds
        self.part_end = self.end
        self.compile_times: list[float] = []

    def left(self) -> float:
        return self.part_end - time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def begin_part(self, weight: float, weights_from_here: float):
        """This part's deadline: its share of the time left (all of it when no later part has a share)."""
        left = max(self.end - time.perf_counter(), 0.0)
        self.part_end = time.perf_counter() + (left * weight / weights_from_here if weights_from_here > 0 else left)

    def require(self, what: str):
        """``OutOfTime`` unless the part's time left is more than 1.5 x the mean compile time seen so far (an item's
        compilation and its timed calls; more than 0 before the first compile)."""
        needed = 1.5 * statistics.mean(self.compile_times) if self.compile_times else 0.0
        if self.left() <= needed:
            raise OutOfTime(f"{what}: {self.left():.0f} s left of the part's budget, about {needed:.0f} s needed")

    def compile(self, fn: Callable[[], object]):
        """``(fn(), seconds)``: a compilation (or a first call that compiles), its time kept for the estimate."""
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        self.compile_times.append(seconds)
        return result, seconds

    def time(self, fn, warmup: int, repeats: int) -> dict:
        """The median of ``fn()`` after ``warmup`` calls (at least one); fewer repeats when one call would take more
        than half of the part's time left over them (at least one)."""
        start = time.perf_counter()
        jax.block_until_ready(fn())
        first = time.perf_counter() - start
        for _ in range(max(warmup, 1) - 1):
            jax.block_until_ready(fn())
        affordable = int(max(self.left(), 0.0) / 2 / max(first, 1e-9))
        count = max(1, min(repeats, affordable))
        return {"median_s": median_seconds(fn, 0, count), "first_call_s": first, "repeats": count}


# ====================================================================== shared helpers


def mesh_layout(mesh) -> dict:
    """A mesh's axis names, sizes and devices, as JSON."""
    return {"axis_names": list(mesh.axis_names), "shape": dict(mesh.shape),
            "devices": [f"{d.platform}:{d.id} ({d.device_kind})" for d in mesh.devices.flat]}


def random_normal(seed: int, shape, sharding):
    """Standard normal float32 of ``shape`` made on the devices of ``sharding`` (no host copy of large inputs)."""
    return jax.jit(lambda key: jax.random.normal(key, shape, jnp.float32), out_shardings=sharding)(jax.random.key(seed))


def is_out_of_memory(text: str) -> bool:
    """Whether an error's text (or a log line) reports an out-of-memory error: XLA's ``RESOURCE_EXHAUSTED``, or
    "out of memory" as in the allocator's "ran out of memory trying to allocate"."""
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def failure(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}"


def skipped_row(row: dict, reason: str) -> dict:
    return {**row, "status": "skipped", "reason": reason}


def failed_row(row: dict, error: Exception, **details) -> dict:
    """``row`` as ``oom`` (an out-of-memory error) or ``error``, with the error's first line (the traceback of an
    error other than OOM goes to stderr: the run is made once)."""
    out_of_memory = is_out_of_memory(str(error))
    if not out_of_memory:
        traceback.print_exception(error, file=sys.stderr)
    return {**row, "status": "oom" if out_of_memory else "error", **details, "reason": failure(error)}


def guarded(rows: list, base: dict, measure: Callable[[], dict]) -> Optional[dict]:
    """``measure()``'s row appended to ``rows`` and returned; or, appended in its place, a ``skipped`` row (too few
    devices, or the time budget) or an ``oom`` / ``error`` row (the run goes on), and None."""
    if base["devices"] > len(jax.devices()):
        rows.append(skipped_row(base, f"{len(jax.devices())} device(s) visible"))
        return None
    try:
        row = measure()
    except OutOfTime as why:
        rows.append(skipped_row(base, f"time budget: {why}"))
        return None
    except Exception as error:  # an OOM or a failure of one item: recorded
        rows.append(failed_row(base, error))
        return None
    rows.append(row)
    return row


# ====================================================================== part 1: data parallelism


def training_step(model, optimizer):
    """``jit(step)``: ``(params, opt_state, rest, x, target) -> (params, opt_state, loss)``, one adam step of
    ``mean((model(x) - target)^2)``, parameters and optimizer state donated; and ``(params, rest)``."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def step(params, opt_state, rest, x, target):
        def loss_fn(params):
            return jnp.mean((nnx.merge(graphdef, params, rest)(x) - target) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1)), params, rest


def training_models(sizes: Sizes) -> dict[str, Callable[[], nnx.Module]]:
    """The models of the data-parallel parts by name, each built by a call (seed 0)."""
    H = sizes.train_d_model

    def s5(method):
        return lambda: S5(d_model=H, d_state=sizes.s5_d_state, discretization="zoh", method=method, rngs=nnx.Rngs(0))

    return {"Mamba": lambda: Mamba(d_model=H, rngs=nnx.Rngs(0)), "S5-scan": s5("scan"), "S5-fft": s5("fft")}


def data_parallel_row(name: str, build, num_devices: int, per_device: int, sizes: Sizes, args, clock: Clock,
                      layouts: dict) -> dict:
    """One model's training step on ``num_devices`` devices, ``per_device`` rows on each."""
    batch, length = per_device * num_devices, sizes.train_length
    row = {"model": name, "devices": num_devices, "B": batch, "B_per_device": per_device,
           "L": length, "d_model": sizes.train_d_model}
    clock.require(f"data parallel {name} on {num_devices}")
    mesh = parallel.data_mesh(num_devices)
    layouts[f"data/{num_devices}"] = mesh_layout(mesh)
    optimizer = optax.adam(1e-4)
    step, params, rest = training_step(build(), optimizer)
    params, rest = parallel.replicate((params, rest), mesh)
    opt_state = parallel.replicate(optimizer.init(params), mesh)
    sharding = parallel.batch_sharding(mesh)
    shape = (batch, length, sizes.train_d_model)
    x, target = random_normal(1, shape, sharding), random_normal(2, shape, sharding)
    with parallel.data_parallel(mesh):
        compiled, row["compile_s"] = clock.compile(lambda: step.lower(params, opt_state, rest, x, target).compile())
    row["peak_bytes_per_device"] = memory_stats(compiled)["peak_bytes"]
    if num_devices > 1:
        moved = parallel.activation_collectives(compiled.as_text(), batch, num_devices)
        row["activation_collectives"] = len(moved)
    state = [params, opt_state]

    def run():
        state[0], state[1], loss = compiled(state[0], state[1], rest, x, target)
        return loss

    row.update(clock.time(run, args.warmup, args.repeats))
    row["step_ms"] = 1e3 * row["median_s"]
    row["tokens_per_s"] = batch * length / row["median_s"]
    row["loss"] = float(run())
    row["status"] = "ok"
    return row


def run_data_parallel(sizes: Sizes, args, clock: Clock, layouts: dict, names) -> dict:
    rows, comparisons = [], []
    models = training_models(sizes)
    for name, per_device in itertools.product(names, sizes.train_batch_per_device):
        build = models[name]
        by_devices = {}
        for n in (1, 2):
            by_devices[n] = guarded(rows, {"model": name, "devices": n, "B_per_device": per_device},
                                    lambda: data_parallel_row(name, build, n, per_device, sizes, args, clock, layouts))
        if all(by_devices.values()):
            speedup = by_devices[2]["tokens_per_s"] / by_devices[1]["tokens_per_s"]
            comparisons.append({"model": name, "B_per_device": per_device,
                                "tokens_per_s_1": by_devices[1]["tokens_per_s"],
                                "tokens_per_s_2": by_devices[2]["tokens_per_s"], "speedup": speedup,
                                "target": TARGETS["data_speedup_min"],
                                "meets_target": speedup >= TARGETS["data_speedup_min"]})
    return {"rows": rows, "comparisons": comparisons}


# ====================================================================== part 2: model-parallel decoding


def build_lm(sizes: Sizes) -> LRNNLMHeadModel:
    lm = LRNNLMHeadModel(sizes.lm_d_model, 16, len(LM_MIXERS), sizes.lm_vocab, LM_MIXERS,
                         d_intermediate=sizes.lm_d_intermediate,
                         mixer_kwargs={"attn": {"num_heads": sizes.lm_heads, "causal": True},
                                       "Mamba2": {"headdim": sizes.lm_headdim, "d_state": 64}},
                         rngs=nnx.Rngs(0))
    lm.eval()
    return lm


def short_new_tokens(new_tokens: int) -> int:
    """The smallest count in ``new_tokens``' power-of-two bucket (the same compiled program), below it."""
    return bucket(new_tokens) // 2 + 1


def greedy_with_logits(lm, prompt, sizes: Sizes, precision: str) -> tuple[np.ndarray, np.ndarray]:
    """``generate_tokens`` greedy at the matmul ``precision``: ``tokens (B, new_tokens)`` and the logits each was
    chosen from, ``(B, new_tokens, vocab)`` (the padding ids dropped)."""
    with jax.default_matmul_precision(precision):
        tokens, logits = generate_tokens(lm, prompt, sizes.new_tokens, return_logits=True)
    return np.asarray(tokens), np.asarray(logits)[..., :sizes.lm_vocab]


def compare_greedy(tokens_1, tokens_2, logits_1, logits_2) -> dict:
    """Greedy decoding on one placement against another: ``tokens (B, N)`` and their ``logits (B, N, V)``.

    The logits are compared where both runs decoded the same prefix (each row's positions up to and including its
    first differing token; all when none differs): their largest absolute difference, and the largest over
    positions of that position's largest difference relative to its largest logit magnitude. Where the tokens first
    differ (the first position, then the first row), the top-two gap of the first run's logits says whether the
    flip was a near tie (a gap below the logits' difference)."""
    tokens_1, tokens_2 = np.asarray(tokens_1), np.asarray(tokens_2)
    logits_1, logits_2 = np.asarray(logits_1, np.float64), np.asarray(logits_2, np.float64)
    differ = tokens_1 != tokens_2
    length = differ.shape[1]
    last_compared = np.where(differ.any(1), differ.argmax(1), length - 1)
    same_prefix = np.arange(length)[None, :] <= last_compared[:, None]
    difference = np.abs(logits_2 - logits_1).max(-1)  # (B, N)
    relative = difference / np.maximum(np.abs(logits_1).max(-1), np.finfo(np.float64).tiny)
    columns = np.flatnonzero(differ.any(0))
    result = {"tokens_identical": not differ.any(), "tokens_agreeing_fraction": float(1.0 - differ.mean()),
              "first_differing_position": int(columns[0]) if columns.size else None,
              "logits_compared_positions": int(same_prefix.sum()),
              "logits_max_abs_difference": float(difference[same_prefix].max()),
              "logits_max_relative_difference": float(relative[same_prefix].max()),
              "top_two_gap_at_first_difference": None}
    if columns.size:
        position = columns[0]
        row = np.flatnonzero(differ[:, position])[0]
        second, first = np.sort(logits_1[row, position])[-2:]
        result["top_two_gap_at_first_difference"] = float(first - second)
    return result


def decode_row(lm, num_devices: int, batch: int, sizes: Sizes, args, clock: Clock, outputs: dict) -> dict:
    """``generate_tokens`` at ``batch`` on ``num_devices``, timed; ``outputs[num_devices]`` receives the timed
    call's tokens (``timed_tokens``) and, from one more call at ``args.matmul_precision``, the tokens and logits
    the placements are compared by (:func:`greedy_with_logits`)."""
    row = {"devices": num_devices, "B": batch, "new_tokens": sizes.new_tokens}
    clock.require(f"decode B={batch} on {num_devices}")
    prompt = np.random.default_rng(batch).integers(0, sizes.lm_vocab, (batch, sizes.prompt_length)).astype(np.int32)
    n_short = short_new_tokens(sizes.new_tokens)
    timed_tokens, row["compile_and_first_call_s"] = clock.compile(
        lambda: np.asarray(generate_tokens(lm, prompt, sizes.new_tokens)))
    full = clock.time(lambda: generate_tokens(lm, prompt, sizes.new_tokens), args.warmup, args.repeats)
    short = clock.time(lambda: generate_tokens(lm, prompt, n_short), args.warmup, args.repeats)
    (tokens, logits), row["check_compile_and_call_s"] = clock.compile(
        lambda: greedy_with_logits(lm, prompt, sizes, args.matmul_precision))
    outputs[num_devices] = {"timed_tokens": timed_tokens, "tokens": tokens, "logits": logits}
    row.update({"total_s": full["median_s"], "short_new_tokens": n_short, "short_total_s": short["median_s"],
                "repeats": full["repeats"],
                "ms_per_token_total": 1e3 * full["median_s"] / sizes.new_tokens,
                "ms_per_token_marginal": 1e3 * (full["median_s"] - short["median_s"]) / (sizes.new_tokens - n_short),
                "status": "ok"})
    return row


def placed_lm(models: dict, num_devices: int, sizes: Sizes, clock: Clock, layouts: dict) -> LRNNLMHeadModel:
    """The language model for ``num_devices`` (built once, seed 0: the same parameters on every mesh), split over a
    ``"model"`` axis of that many devices when more than one."""
    if num_devices not in models:
        clock.require(f"building the language model for {num_devices} device(s)")
        lm = build_lm(sizes)
        if num_devices > 1:
            mesh = parallel.model_mesh(num_devices)
            parallel.shard_model(lm, mesh)
            layouts[f"model/{num_devices}"] = mesh_layout(mesh)
        models[num_devices] = lm
    return models[num_devices]


def run_model_parallel_decode(sizes: Sizes, args, clock: Clock, layouts: dict) -> dict:
    rows, comparisons, models = [], [], {}
    for batch in sizes.decode_batches:
        outputs, by_devices = {}, {}
        for n in (1, 2):
            by_devices[n] = guarded(rows, {"devices": n, "B": batch}, lambda: decode_row(
                placed_lm(models, n, sizes, clock, layouts), n, batch, sizes, args, clock, outputs))
        if all(by_devices.values()):
            one, two = outputs[1], outputs[2]
            comparisons.append({
                "B": batch, "matmul_precision": args.matmul_precision,
                **compare_greedy(one["tokens"], two["tokens"], one["logits"], two["logits"]),
                "timed_matmul_precision": args.timing_matmul_precision,
                "timed_tokens_agreeing_fraction": float(np.mean(one["timed_tokens"] == two["timed_tokens"])),
                "ms_per_token_total_1": by_devices[1]["ms_per_token_total"],
                "ms_per_token_total_2": by_devices[2]["ms_per_token_total"],
                "speedup_total": by_devices[1]["ms_per_token_total"] / by_devices[2]["ms_per_token_total"],
                "ms_per_token_marginal_1": by_devices[1]["ms_per_token_marginal"],
                "ms_per_token_marginal_2": by_devices[2]["ms_per_token_marginal"],
                "speedup_marginal": by_devices[1]["ms_per_token_marginal"] / by_devices[2]["ms_per_token_marginal"]})
    config = {"mixers": LM_MIXERS, "d_model": sizes.lm_d_model, "vocab": sizes.lm_vocab,
              "d_intermediate": sizes.lm_d_intermediate, "attn_heads": sizes.lm_heads,
              "mamba2_headdim": sizes.lm_headdim, "prompt_length": sizes.prompt_length, "dtype": "float32",
              "sampling": "greedy", "matmul_precision": args.matmul_precision,
              "timed_matmul_precision": args.timing_matmul_precision}
    if models:
        params = nnx.state(next(iter(models.values())), nnx.Param)
        config["parameters"] = int(sum(p.size for p in jax.tree.leaves(params)))
    return {"config": config, "rows": rows, "comparisons": comparisons}


# ====================================================================== part 3: sequence parallelism

#: a child prints its result on one stdout line after this marker, as JSON
CHILD_RESULT_MARKER = "SEQUENCE_ATTEMPT_RESULT "
#: a child ends its timed calls this many seconds before its parent would kill it
CHILD_MARGIN_S = 2.0
#: how much of a child's log a failed row keeps
LOG_TAIL_LINES, LOG_TAIL_CHARS = 20, 2000
#: XLA's warning (hlo_rematerialization.cc) that a program does not fit the device's memory limit, e.g. "Can't
#: reduce memory use below 95.79GiB (...) by rematerialization; only reduced to 105.66GiB (...), down from ..."
REMATERIALIZATION_FAILURE = re.compile(
    r"Can't reduce memory use below .*? by rematerialization; only reduced to [^,\n]*")


@dataclasses.dataclass(frozen=True)
class AttemptSpec:
    """One attempt of the sequence part, as its child process receives it (JSON on its command line)."""

    devices: int
    length: int
    batch: int
    d_model: int
    limit_bytes: float  # a compiled peak per device above this is an OOM without running
    warmup: int
    repeats: int
    kernels: str  # pallas_kernels' use_kernels
    matmul_precision: str
    timeout_s: float  # the parent kills the child this long after ``launched_at``
    launched_at: float  # the parent's time.time() at the launch
    parent_pid: int


@dataclasses.dataclass(frozen=True)
class ChildOutcome:
    """How a child process ended: the JSON it printed after :data:`CHILD_RESULT_MARKER` (None when none), its exit
    code (negative: killed by that signal), whether it ran past its timeout (then killed), its stderr, seconds."""

    report: Optional[dict]
    returncode: int
    timed_out: bool
    log: str
    seconds: float


def run_child(command: list[str], timeout: float, env: dict) -> ChildOutcome:
    """Runs ``command`` and kills it (SIGKILL) after ``timeout`` seconds, or when this process is interrupted. Its
    stdout and stderr go through temporary files, so no grandchild can block the wait by holding a pipe open."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
        timed_out = False
        try:
            process.wait(timeout=max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
        out.seek(0)
        err.seek(0)
        stdout, log = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    reports = [line[len(CHILD_RESULT_MARKER):] for line in stdout.splitlines() if line.startswith(CHILD_RESULT_MARKER)]
    return ChildOutcome(json.loads(reports[-1]) if reports else None, process.returncode, timed_out, log,
                        time.perf_counter() - start)


def child_failure(outcome: ChildOutcome, timeout: float) -> dict:
    """A child that gave no result: ``status`` ``oom`` when its log shows an out-of-memory error (on two devices,
    the device whose allocation failed leaves the other waiting at a collective, so such a child ends by the
    timeout), else ``error``; ``how`` it ended, the ``reason`` (the out-of-memory line, else the log's last line)
    and the log's last lines."""
    if outcome.timed_out:
        how = f"child timed out after {timeout:.3g} s (killed)"
    elif outcome.returncode < 0:
        number = -outcome.returncode
        name = signal.Signals(number).name if number in signal.valid_signals() else f"signal {number}"
        how = f"child killed by {name}"
    else:
        how = f"child exited with code {outcome.returncode} without a result"
    lines = [line.strip() for line in outcome.log.splitlines() if line.strip()]
    out_of_memory = next((line for line in lines if is_out_of_memory(line)), None)
    reason = out_of_memory or (lines[-1] if lines else "no output")
    return {"status": "oom" if out_of_memory else "error", "how": how, "reason": reason[:300],
            "log_tail": "\n".join(lines[-LOG_TAIL_LINES:])[-LOG_TAIL_CHARS:]}


class CapturedStderr:
    """What :func:`captured_stderr` caught, in ``text`` once its block has ended."""

    text: str = ""


@contextlib.contextmanager
def captured_stderr():
    """Catches what is written to file descriptor 2 in its block (XLA's C++ log included, which ``sys.stderr``
    does not see) into a :class:`CapturedStderr`, then passes it on to the real stderr."""
    captured = CapturedStderr()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as file:
        os.dup2(file.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            file.seek(0)
            captured.text = file.read().decode(errors="replace")
            sys.stderr.write(captured.text)
            sys.stderr.flush()


def predicted_out_of_memory(peak_bytes: int, limit_bytes: float, compile_log: str) -> Optional[str]:
    """Why a compiled program is not run, or None: its peak per device (bytes) above ``limit_bytes``, and/or XLA's
    rematerialization warning in the log of its compilation."""
    reasons = []
    if peak_bytes > limit_bytes:
        reasons.append(f"compiled peak {peak_bytes / GiB:.3g} GiB > {limit_bytes / GiB:.3g} GiB")
    rematerialization = REMATERIALIZATION_FAILURE.search(compile_log)
    if rematerialization:
        reasons.append(f"XLA: {rematerialization.group(0)}")
    return "; ".join(reasons) or None


def sequence_step(model, mesh):
    """``jit(value_and_grad(mean(y^2)))`` of the parameters, ``y`` the model's forward (``mesh`` None) or
    ``parallel.sequence_parallel`` over ``mesh``'s sequence axis; and ``(params, rest)``."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, rest, x):
        m = nnx.merge(graphdef, params, rest)
        y = m(x) if mesh is None else parallel.sequence_parallel(m, x, mesh=mesh, axis=parallel.SEQUENCE)
        return jnp.mean(y**2)

    return jax.jit(jax.value_and_grad(loss)), params, rest


def device_memory_now(device) -> dict:
    """The allocator's limit and the bytes in use on ``device`` now (absent where the backend reports none)."""
    stats = device.memory_stats() or {}
    return {f"device_{key}": stats[key] for key in ("bytes_limit", "bytes_in_use") if key in stats}


def sequence_attempt(spec: AttemptSpec, clock: Clock, layouts: dict) -> dict:
    """One forward + backward at ``spec.length`` on ``spec.devices`` (one: the plain forward; more: sequence
    parallel), in this process (a child's): ``status`` ``ok`` (timed), ``oom`` (``how``: ``predicted`` when the
    compiled peak exceeds ``spec.limit_bytes`` per device or XLA's rematerialization pass logged that the program
    does not fit, ``compile`` or ``run``) or ``error``."""
    row = {"devices": spec.devices, "L": spec.length, "B": spec.batch, "d_model": spec.d_model}
    if spec.devices == 1:
        mesh, sharding = None, jax.sharding.SingleDeviceSharding(jax.devices()[0])
    else:
        mesh = parallel.data_mesh(spec.devices, axis=parallel.SEQUENCE)
        layouts[f"sequence/{spec.devices}"] = mesh_layout(mesh)
        sharding = parallel.sequence_sharding(mesh)
    step, params, rest = sequence_step(Mamba(d_model=spec.d_model, rngs=nnx.Rngs(0)), mesh)
    if mesh is not None:
        params, rest = parallel.replicate((params, rest), mesh)
    shape = (spec.batch, spec.length, spec.d_model)
    row["child_startup_s"] = time.time() - spec.launched_at
    row.update(device_memory_now(jax.devices()[0]))
    try:
        x_spec = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
        with captured_stderr() as log:
            compiled, row["compile_s"] = clock.compile(lambda: step.lower(params, rest, x_spec).compile())
    except Exception as error:
        return failed_row(row, error, how="compile")
    row["peak_bytes_per_device"] = memory_stats(compiled)["peak_bytes"]
    why = predicted_out_of_memory(row["peak_bytes_per_device"], spec.limit_bytes, log.text)
    if why:
        return {**row, "status": "oom", "how": "predicted", "reason": why}
    try:
        x = random_normal(3, shape, sharding)
        row.update(clock.time(lambda: compiled(params, rest, x), spec.warmup, spec.repeats))
    except Exception as error:
        return failed_row(row, error, how="run")
    row["us_per_token"] = 1e6 * row["median_s"] / (spec.batch * spec.length)
    row["status"] = "ok"
    return row


def exit_with_parent(parent_pid: int):
    """Ends this process when its parent is gone (then this process is re-parented): an orphaned attempt would
    hold the devices."""

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def run_attempt_here(spec: AttemptSpec):
    """A child's whole work: :func:`sequence_attempt` under the run's kernel setting and matmul precision, its timed
    calls ending :data:`CHILD_MARGIN_S` before the parent's timeout; the row and the mesh layouts printed after
    :data:`CHILD_RESULT_MARKER`."""
    exit_with_parent(spec.parent_pid)
    dispatch.set_config(use_kernels=spec.kernels)
    jax.config.update("jax_default_matmul_precision", spec.matmul_precision)
    clock = Clock(spec.launched_at + spec.timeout_s - CHILD_MARGIN_S - time.time())
    layouts: dict = {}
    row = sequence_attempt(spec, clock, layouts)
    print(CHILD_RESULT_MARKER + json.dumps({"row": row, "layouts": layouts}, default=str), flush=True)


def attempt_in_child(num_devices: int, length: int, sizes: Sizes, args, clock: Clock, memory: int,
                     layouts: dict) -> dict:
    """:func:`sequence_attempt` in a child process, killed after ``--sp-attempt-timeout`` seconds or the part's
    time left; the memory limit is ``memory`` bytes times ``--memory-fraction`` (one device) or
    ``--two-device-memory-fraction``. Its row (``child_s``: the child's wall time), or a :func:`child_failure` row;
    ``OutOfTime`` when the time left does not cover an attempt."""
    clock.require(f"sequence L={length} on {num_devices}")
    fraction = args.memory_fraction if num_devices == 1 else args.two_device_memory_fraction
    timeout = min(clock.left(), args.sp_attempt_timeout)
    spec = AttemptSpec(devices=num_devices, length=length, batch=sizes.sp_batch, d_model=sizes.sp_d_model,
                       limit_bytes=fraction * memory, warmup=args.warmup, repeats=args.repeats, kernels=args.kernels,
                       matmul_precision=args.timing_matmul_precision, timeout_s=timeout, launched_at=time.time(),
                       parent_pid=os.getpid())
    repo = str(pathlib.Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    print(f"  sequence L={length} on {num_devices}: child, timeout {timeout:.0f} s", flush=True)
    outcome = run_child([sys.executable, "-m", "benchmarks.benchmark_multi_gpu", "--sequence-attempt",
                         json.dumps(dataclasses.asdict(spec))], timeout, env)
    if outcome.log.strip():  # the child's log, for the run's own log
        sys.stderr.write(f"--- child L={length} on {num_devices} ({outcome.seconds:.0f} s), its stderr's end:\n"
                         f"{outcome.log[-10000:]}\n")
    if outcome.report is None:
        clock.compile_times.append(outcome.seconds)
        return {"devices": num_devices, "L": length, "B": sizes.sp_batch, "d_model": sizes.sp_d_model,
                **child_failure(outcome, timeout), "child_s": outcome.seconds}
    row = outcome.report["row"]
    layouts.update(outcome.report["layouts"])
    clock.compile_times.append(row["child_startup_s"] + row.get("compile_s", 0.0))
    return {**row, "child_s": outcome.seconds}


def next_length(peaks: dict[int, int], ooms: set[int], limit: float, max_length: int) -> Optional[int]:
    """The next power of two to try on one device, from the compiled peaks (bytes) of the lengths that fit and the
    lengths that did not; None when the longest that fits is known (its double is OOM) or ``max_length`` is reached.

    Without an OOM above the longest fit, jump to the longest power of two its peak per token predicts (an
    overestimate per token, the parameters included, so the jump stays below the true limit), at least its double;
    after an OOM more than one doubling above it, halve back towards it."""
    longest = max(peaks)
    smallest_oom = min((n for n in ooms if n > longest), default=None)
    if smallest_oom is not None:
        return None if smallest_oom <= 2 * longest else smallest_oom // 2
    predicted = 2 ** int(math.floor(math.log2(max(limit * longest / peaks[longest], 1))))
    candidate = min(max(2 * longest, predicted), max_length)
    return candidate if candidate > longest else None


def search_one_device(attempt: Callable[[int], dict], start_length: int, max_length: int,
                      limit: float) -> tuple[dict, set]:
    """The search for the longest power-of-two length that fits one device under ``limit`` bytes, each length run
    and recorded by ``attempt(length) -> row``: ``({length: ok row}, OOM lengths)``; it ends early on an error or
    a skipped row (the time budget)."""
    fits, ooms = {}, set()
    length = start_length
    while length is not None:
        row = attempt(length)
        if row["status"] in ("error", "skipped"):
            break
        if row["status"] == "ok":
            fits[length] = row
        else:
            ooms.add(length)
        if fits:
            length = next_length({n: r["peak_bytes_per_device"] for n, r in fits.items()}, ooms, limit, max_length)
        else:  # the start does not fit: halve
            length = length // 2 if length > 8 else None
    return fits, ooms


def two_device_attempts(on_two: Callable[[int], dict], on_one: Callable[[int], dict], longest: int, ooms: set):
    """After the search (``longest`` fits one device, ``ooms`` did not): ``2 * longest`` on two devices; when that
    does not fit them either, ``3 * longest / 2`` on two and, if it runs there, on one device (added to ``ooms`` when
    it does not fit), then ``longest`` on two, for the time per token at one length."""
    if on_two(2 * longest)["status"] != "oom":
        return
    between = 3 * longest // 2
    if on_two(between)["status"] == "ok" and on_one(between)["status"] == "oom":
        ooms.add(between)
    on_two(longest)


def run_sequence_parallel(sizes: Sizes, args, clock: Clock, layouts: dict, save: Callable[[dict], None]) -> dict:
    """The search on one device, then two devices; ``save(result so far)`` after every attempt."""
    memory = int(args.memory_limit_gib * GiB) if args.memory_limit_gib else device_memory_limit(jax.devices()[0])
    result = {"memory_bytes_per_device": memory, "parent": device_memory_now(jax.devices()[0]),
              "memory_fraction": args.memory_fraction,
              "two_device_memory_fraction": args.two_device_memory_fraction,
              "attempt_timeout_s": args.sp_attempt_timeout, "search": [], "two_devices": []}

    def attempt(rows: list, num_devices: int, length: int) -> dict:
        """:func:`attempt_in_child`'s row, or a skipped or failed one, appended to ``rows`` and saved."""
        guarded(rows, {"devices": num_devices, "L": length},
                lambda: attempt_in_child(num_devices, length, sizes, args, clock, memory, layouts))
        save(result)
        return rows[-1]

    fits, ooms = search_one_device(lambda length: attempt(result["search"], 1, length), sizes.sp_start_length,
                                   sizes.sp_max_length, args.memory_fraction * memory)
    if not fits:
        result["reason"] = "no length fits one device" if ooms else "the search ended before a length fitted"
        return result
    longest = max(fits)
    result["longest_fitting_one_device"] = longest
    result["search_complete"] = 2 * longest in ooms
    if not result["search_complete"]:
        result["search_note"] = (f"{2 * longest} was not seen OOM on one device (the search stopped at the "
                                 f"--sp-max-length cap {sizes.sp_max_length}, an error or the time budget)")
    two = result["two_devices"]
    two_device_attempts(lambda length: attempt(two, 2, length), lambda length: attempt(result["search"], 1, length),
                        longest, ooms)
    one = fits[longest]
    result["comparisons"] = []
    for row in two:
        if row["status"] != "ok":
            continue
        ratio = row["us_per_token"] / one["us_per_token"]
        result["comparisons"].append({
            "L_one_device": longest, "L_two_devices": row["L"], "us_per_token_1": one["us_per_token"],
            "us_per_token_2": row["us_per_token"], "ratio": ratio,
            "target_max": TARGETS["sequence_time_per_token_ratio_max"],
            "meets_target": ratio <= TARGETS["sequence_time_per_token_ratio_max"]})
        if row["L"] in ooms:
            result["oom_on_one_runs_on_two"] = row["L"]
    return result


# ====================================================================== report


def environment(args, argv, sizes: Sizes) -> dict:
    devices = jax.devices()
    return {
        "device_kind": devices[0].device_kind, "platform": devices[0].platform, "num_devices": len(devices),
        "devices": [f"{d.platform}:{d.id} ({d.device_kind})" for d in devices],
        "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__, "optax": optax.__version__,
        "python": platform.python_version(), "num_cpu_cores": os.cpu_count(),
        "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE"),
        "XLA_PYTHON_CLIENT_PREALLOCATE": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
        "XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "default_matmul_precision": str(jax.config.jax_default_matmul_precision),
        "timed_matmul_precision": args.timing_matmul_precision, "compared_matmul_precision": args.matmul_precision,
        "kernel_config": dataclasses.asdict(dispatch.resolve(None)),
        "date": datetime.date.today().isoformat(),
        "command": "python -m benchmarks.benchmark_multi_gpu " + " ".join(sys.argv[1:] if argv is None else argv),
        "sizes": dataclasses.asdict(sizes), "warmup": args.warmup, "repeats": args.repeats,
        "time_budget_s": args.time_budget, "quick": args.quick,
    }


def fmt(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"## Multi-device benchmark: {env['num_devices']} x {env['device_kind']} ({env['platform']}), "
             f"jax {env['jax']}, NCCL_NVLS_ENABLE={env['NCCL_NVLS_ENABLE']}",
             f"time used {result['elapsed_s']:.0f} s of {env['time_budget_s']:.0f} s"]
    parts = result["parts"]
    data = [*parts.get("data", {}).get("rows", []), *parts.get("data_fft", {}).get("rows", [])]
    if data:
        lines += ["", "### 1. Data-parallel training step (adam; same batch per device)", "",
                  "| model | devices | B | step ms | tokens/s | peak GiB/device | activation collectives | status |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in data:
            peak = r.get("peak_bytes_per_device")
            lines.append(f"| {r['model']} | {r['devices']} | {r.get('B', '-')} | {fmt(r.get('step_ms'))} "
                         f"| {fmt(r.get('tokens_per_s'), '.4g')} | {fmt(None if peak is None else peak / GiB)} "
                         f"| {r.get('activation_collectives', '-')} | {r['status']} {r.get('reason', '')} |")
        for c in [*parts.get("data", {}).get("comparisons", []), *parts.get("data_fft", {}).get("comparisons", [])]:
            lines.append(f"\n{c['model']} ({c['B_per_device']} rows per device): {c['speedup']:.2f}x tokens/s on 2 devices "
                         f"(target >= {c['target']}x: {'met' if c['meets_target'] else 'NOT met'})")
    decode = parts.get("decode", {})
    if decode.get("rows"):
        lines += ["", f"### 2. Model-parallel decode ({'/'.join(LM_MIXERS)}, d_model {decode['config']['d_model']}, "
                      f"greedy, {decode['rows'][0].get('new_tokens', '-')} new tokens)", "",
                  "| devices | B | ms/token total | ms/token marginal | status |", "|---:|---:|---:|---:|---|"]
        for r in decode["rows"]:
            lines.append(f"| {r['devices']} | {r['B']} | {fmt(r.get('ms_per_token_total'))} "
                         f"| {fmt(r.get('ms_per_token_marginal'))} | {r['status']} {r.get('reason', '')} |")
        for c in decode["comparisons"]:
            gap = c["top_two_gap_at_first_difference"]
            lines.append(f"\nB={c['B']}: speed-up {c['speedup_total']:.2f}x total, {c['speedup_marginal']:.2f}x "
                         f"marginal; at {c['matmul_precision']} precision tokens identical: {c['tokens_identical']} "
                         f"({c['tokens_agreeing_fraction']:.3f} agree), logits' max difference "
                         f"{c['logits_max_abs_difference']:.3g} ({c['logits_max_relative_difference']:.3g} relative)"
                         + ("" if gap is None else f", top-two gap {gap:.3g} where they first differ")
                         + f"; the timed calls' tokens ({c['timed_matmul_precision']}): "
                           f"{c['timed_tokens_agreeing_fraction']:.3f} agree")
    sequence = parts.get("sequence", {})
    if sequence.get("search"):
        lines += ["", "### 3. Sequence-parallel Mamba forward + backward", "",
                  "| devices | L | µs/token | peak GiB/device | status |", "|---:|---:|---:|---:|---|"]
        for r in [*sequence["search"], *sequence.get("two_devices", [])]:
            peak = r.get("peak_bytes_per_device")
            note = (r["status"] + (f" ({r['how']})" if "how" in r else "")
                    + (f": {r['reason']}" if "reason" in r else ""))
            lines.append(f"| {r['devices']} | {r.get('L', '-')} | {fmt(r.get('us_per_token'))} "
                         f"| {fmt(None if peak is None else peak / GiB)} | {note} |")
        for c in sequence.get("comparisons", []):
            lines.append(f"\nL={c['L_two_devices']} on 2 devices vs L={c['L_one_device']} on 1: {c['ratio']:.2f}x the "
                         f"time per token (target <= {c['target_max']}x: {'met' if c['meets_target'] else 'NOT met'})")
        if "oom_on_one_runs_on_two" in sequence:
            lines.append(f"\nL={sequence['oom_on_one_runs_on_two']}: OOM on one device, runs on two")
    for name, part in parts.items():
        if "skipped" in part or "error" in part:
            lines.append(f"\n{name}: {part.get('skipped') or part.get('error')}")
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.benchmark_multi_gpu",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--time-budget", type=float, default=330.0,
                        help="seconds for the whole run; items that do not fit are skipped and recorded")
    parser.add_argument("--train-batch-per-device", type=int, nargs="+", default=None,
                        help="rows per device of the data-parallel part, one comparison each (default 8)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kernels", choices=("never", "auto"), default="never",
                        help="pallas_kernels' use_kernels for every part (never: the XLA paths on 1 and 2 devices)")
    parser.add_argument("--matmul-precision", choices=MATMUL_PRECISIONS, default="highest",
                        help="float32 matmul precision of the decode part's comparison of 1 and 2 devices (tokens, "
                             "logits)")
    parser.add_argument("--timing-matmul-precision", choices=MATMUL_PRECISIONS, default="default",
                        help="float32 matmul precision of every timed program (default: JAX's, TF32 on the GPU)")
    parser.add_argument("--memory-limit-gib", type=float, default=None,
                        help="memory per device for the sequence part's search (default: the device's own limit)")
    parser.add_argument("--memory-fraction", type=float, default=0.95,
                        help="one device: a compiled peak above this fraction of the memory per device is an OOM "
                             "without running")
    parser.add_argument("--two-device-memory-fraction", type=float, default=0.85,
                        help="the same for the sequence part's two-device attempts (a failed allocation on one "
                             "device leaves the other waiting)")
    parser.add_argument("--sp-attempt-timeout", type=float, default=120.0,
                        help="seconds after which a sequence attempt's child process is killed (at most the part's "
                             "time left)")
    parser.add_argument("--sp-start-length", type=int, default=None,
                        help=f"the sequence part's first length on one device (default {Sizes.sp_start_length}, "
                             f"--quick {QUICK.sp_start_length})")
    parser.add_argument("--sp-max-length", type=int, default=None,
                        help=f"the longest length the search tries on one device (default {Sizes.sp_max_length}, "
                             f"--quick {QUICK.sp_max_length})")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, one decode batch, one repeat: a smoke run (CPU, fake devices)")
    parser.add_argument("--out", default=None, help="write the results as JSON here (rewritten after every part)")
    parser.add_argument("--sequence-attempt", default=None, metavar="SPEC",
                        help="(the run's own children) run one sequence attempt, an AttemptSpec as JSON, and print "
                             "its row")
    args = parser.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"--parts: unknown {sorted(unknown)}; choose from {list(PARTS)}")
    for name in ("sp_start_length", "sp_max_length"):
        value = getattr(args, name)
        if value is not None and (value < 8 or value & (value - 1)):
            parser.error(f"--{name.replace('_', '-')} must be a power of two >= 8, got {value}")
    for name in ("memory_fraction", "two_device_memory_fraction"):
        if not 0.0 < getattr(args, name) <= 1.0:
            parser.error(f"--{name.replace('_', '-')} must lie in (0, 1], got {getattr(args, name)}")
    if args.train_batch_per_device is not None and min(args.train_batch_per_device) < 1:
        parser.error(f"--train-batch-per-device must be positive integers, got {args.train_batch_per_device}")
    if not args.sp_attempt_timeout > 0:
        parser.error(f"--sp-attempt-timeout must be > 0 seconds, got {args.sp_attempt_timeout}")
    if args.quick:
        args.warmup, args.repeats = 1, 1
    return args


def main(argv=None) -> Optional[dict]:
    args = parse_args(argv)
    if args.sequence_attempt is not None:  # a child of a run
        run_attempt_here(AttemptSpec(**json.loads(args.sequence_attempt)))
        return None
    sizes = QUICK if args.quick else Sizes()
    if args.train_batch_per_device is not None:
        sizes = dataclasses.replace(sizes, train_batch_per_device=tuple(args.train_batch_per_device))
    for name in ("sp_start_length", "sp_max_length"):
        if getattr(args, name) is not None:
            sizes = dataclasses.replace(sizes, **{name: getattr(args, name)})
    dispatch.set_config(use_kernels=args.kernels)
    jax.config.update("jax_default_matmul_precision", args.timing_matmul_precision)
    clock = Clock(args.time_budget)
    layouts: dict = {}
    result = {"environment": environment(args, argv, sizes), "targets": TARGETS, "meshes": layouts, "parts": {}}

    def save():
        result["elapsed_s"] = clock.elapsed()
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1, default=str)

    def save_unfinished(name: str, part: dict):
        result["parts"][name] = {**part, "unfinished": True}
        save()

    runners = {"data": lambda: run_data_parallel(sizes, args, clock, layouts, ("Mamba", "S5-scan")),
               "decode": lambda: run_model_parallel_decode(sizes, args, clock, layouts),
               "sequence": lambda: run_sequence_parallel(sizes, args, clock, layouts,
                                                         lambda part: save_unfinished("sequence", part)),
               "data_fft": lambda: run_data_parallel(sizes, args, clock, layouts, ("S5-fft",))}
    chosen = [name for name in PARTS if name in args.parts.split(",")]
    print(f"{len(jax.devices())} x {jax.devices()[0].device_kind}; parts {', '.join(chosen)}; "
          f"time budget {args.time_budget:.0f} s", flush=True)
    for i, name in enumerate(chosen):
        clock.begin_part(PARTS[name], sum(PARTS[n] for n in chosen[i:]))
        if clock.left() <= 0:
            result["parts"][name] = {"skipped": "time budget: nothing left"}
        else:
            start = time.perf_counter()
            try:
                result["parts"][name] = runners[name]()
            except Exception as error:  # a part that fails is recorded (with what it saved); the others still run
                traceback.print_exception(error, file=sys.stderr)
                result["parts"][name] = {**result["parts"].get(name, {}), "error": failure(error)}
            result["parts"][name]["seconds"] = time.perf_counter() - start
        part = result["parts"][name]
        done = part.get("skipped") or part.get("error") or f"{part['seconds']:.0f} s"
        print(f"[{clock.elapsed():.0f} s] {name}: {done}", flush=True)
        save()
    save()
    print(markdown(result))
    return result


if __name__ == "__main__":
    result = main()
    if result is None:  # a child: skip the interpreter's teardown (a device runtime's can hang); its row is printed
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
