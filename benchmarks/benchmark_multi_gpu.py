"""One GPU against two in one run: data-parallel training, model-parallel decoding, sequence-parallel training.

    python -m benchmarks.benchmark_multi_gpu --out benchmark_results/multi_gpu_h200x2.json      # 2 GPUs, ~5.5 min
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m benchmarks.benchmark_multi_gpu --quick   # CPU check

Every part measures the same program on 1 device and on 2 (the first two of ``jax.devices()``) in the same process:
the program is compiled first (``compile_s``, never timed), then timed as the median of ``--repeats`` calls after
``--warmup`` calls (:func:`benchmarks.timing.median_seconds`; fewer repeats when a call is long for the time left).

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
   The greedy tokens of the two runs are compared (identical expected; float32 sums in another order can flip a
   near tie, so the fraction that agrees is reported too).
3. ``sequence``: sequence-parallel forward + backward of ``Mamba`` (d_model 1024, B=1;
   ``jax.value_and_grad(mean(y^2))`` of the parameters). The longest power-of-two L that fits one device is found
   by a search: each attempt is compiled, its peak memory read from XLA's memory analysis (``peak = argument +
   output + temp - alias``, :func:`benchmarks.benchmark_scan_memory.memory_stats`) and, when it fits
   ``--memory-fraction`` of the device, run; an out-of-memory error at compile or run time, or a predicted peak
   above the device, is recorded as ``oom`` (with how it was known). After the first length that fits, the next
   attempt jumps to the longest power of two its peak per token predicts, then doubles until one OOMs (halving back
   when a jump overshoots). Then twice that longest L runs on two devices through ``parallel.sequence_parallel``
   (a ``"sequence"`` mesh axis); if it does not fit there, L itself is run on two. Reports µs per token on each
   (target: two devices within 1.25x of one) and the length that is OOM on one device and runs on two.

``--time-budget`` seconds (default 330) bounds the whole run: the parts share it (30%, 30%, 40%, each part's unused
time passed on, ``data_fft`` the rest), an item is started only when the time left covers 1.5 x the mean compile
time seen so far, and whatever is left out is recorded as skipped with the reason; the JSON (``--out``) is rewritten
after every part, so an interrupted run keeps what it measured. It also records the meshes (axis names, sizes,
devices) and the environment (device kind, versions, ``NCCL_NVLS_ENABLE``, ``XLA_PYTHON_CLIENT_PREALLOCATE``,
``XLA_FLAGS``), and prints a markdown summary.

Kernels: under a ``"data"`` mesh the Pallas kernels run per shard (``pallas_kernels.dispatch.per_shard``), but
under the ``"model"`` and ``"sequence"`` meshes they refuse and the XLA paths run, where one device would take a
kernel that ``"auto"`` selects. So that each comparison is of one program, ``--kernels never`` (default) sets
``pallas_kernels.set_config(use_kernels="never")`` for the whole run; ``--kernels auto`` measures what users get
(then the decode and sequence parts may compare a kernel on one device with the XLA path on two). ``NCCL_NVLS_ENABLE``
defaults to 0 (NVLink multicast off) and ``XLA_PYTHON_CLIENT_PREALLOCATE`` is false (the OOM search needs memory to
be returned); both are set before JAX is imported.
"""

from __future__ import annotations

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
# XLA's multi-threaded CPU FFT can deadlock on 2-core machines (README); the --quick CPU run takes S5's FFT path
if "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
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
    train_batch_per_device: int = 8
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


QUICK = Sizes(train_d_model=16, train_length=64, train_batch_per_device=2, s5_d_state=8, lm_d_model=32, lm_vocab=256,
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


def is_out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def failure(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}"


def skipped_row(row: dict, reason: str) -> dict:
    return {**row, "status": "skipped", "reason": reason}


def failed_row(row: dict, error: Exception, **details) -> dict:
    """``row`` as ``oom`` (an out-of-memory error) or ``error``, with the error's first line (the traceback of an
    error other than OOM goes to stderr: the run is made once)."""
    if not is_out_of_memory(error):
        traceback.print_exception(error, file=sys.stderr)
    return {**row, "status": "oom" if is_out_of_memory(error) else "error", **details, "reason": failure(error)}


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


def data_parallel_row(name: str, build, num_devices: int, sizes: Sizes, args, clock: Clock, layouts: dict) -> dict:
    """One model's training step on ``num_devices`` devices (the batch per device fixed)."""
    batch, length = sizes.train_batch_per_device * num_devices, sizes.train_length
    row = {"model": name, "devices": num_devices, "B": batch, "B_per_device": sizes.train_batch_per_device,
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
    for name in names:
        build = models[name]
        by_devices = {}
        for n in (1, 2):
            by_devices[n] = guarded(rows, {"model": name, "devices": n},
                                    lambda: data_parallel_row(name, build, n, sizes, args, clock, layouts))
        if all(by_devices.values()):
            speedup = by_devices[2]["tokens_per_s"] / by_devices[1]["tokens_per_s"]
            comparisons.append({"model": name, "tokens_per_s_1": by_devices[1]["tokens_per_s"],
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


def decode_row(lm, num_devices: int, batch: int, sizes: Sizes, args, clock: Clock, tokens: dict) -> dict:
    """``generate_tokens`` at ``batch`` on ``num_devices``; its tokens go to ``tokens[num_devices]``."""
    row = {"devices": num_devices, "B": batch, "new_tokens": sizes.new_tokens}
    clock.require(f"decode B={batch} on {num_devices}")
    prompt = np.random.default_rng(batch).integers(0, sizes.lm_vocab, (batch, sizes.prompt_length)).astype(np.int32)
    n_short = short_new_tokens(sizes.new_tokens)
    tokens[num_devices], row["compile_and_first_call_s"] = clock.compile(
        lambda: np.asarray(generate_tokens(lm, prompt, sizes.new_tokens)))
    full = clock.time(lambda: generate_tokens(lm, prompt, sizes.new_tokens), args.warmup, args.repeats)
    short = clock.time(lambda: generate_tokens(lm, prompt, n_short), args.warmup, args.repeats)
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
        tokens, by_devices = {}, {}
        for n in (1, 2):
            by_devices[n] = guarded(rows, {"devices": n, "B": batch}, lambda: decode_row(
                placed_lm(models, n, sizes, clock, layouts), n, batch, sizes, args, clock, tokens))
        if all(by_devices.values()):
            agree = float(np.mean(tokens[1] == tokens[2]))
            first_difference = np.argwhere(np.any(tokens[1] != tokens[2], axis=0))
            comparisons.append({
                "B": batch, "tokens_identical": bool(agree == 1.0), "tokens_agreeing_fraction": agree,
                "first_differing_position": int(first_difference[0, 0]) if first_difference.size else None,
                "ms_per_token_total_1": by_devices[1]["ms_per_token_total"],
                "ms_per_token_total_2": by_devices[2]["ms_per_token_total"],
                "speedup_total": by_devices[1]["ms_per_token_total"] / by_devices[2]["ms_per_token_total"],
                "ms_per_token_marginal_1": by_devices[1]["ms_per_token_marginal"],
                "ms_per_token_marginal_2": by_devices[2]["ms_per_token_marginal"],
                "speedup_marginal": by_devices[1]["ms_per_token_marginal"] / by_devices[2]["ms_per_token_marginal"]})
    config = {"mixers": LM_MIXERS, "d_model": sizes.lm_d_model, "vocab": sizes.lm_vocab,
              "d_intermediate": sizes.lm_d_intermediate, "attn_heads": sizes.lm_heads,
              "mamba2_headdim": sizes.lm_headdim, "prompt_length": sizes.prompt_length, "dtype": "float32",
              "sampling": "greedy"}
    if models:
        params = nnx.state(next(iter(models.values())), nnx.Param)
        config["parameters"] = int(sum(p.size for p in jax.tree.leaves(params)))
    return {"config": config, "rows": rows, "comparisons": comparisons}


# ====================================================================== part 3: sequence parallelism


def sequence_step(model, mesh):
    """``jit(value_and_grad(mean(y^2)))`` of the parameters, ``y`` the model's forward (``mesh`` None) or
    ``parallel.sequence_parallel`` over ``mesh``'s sequence axis; and ``(params, rest)``."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, rest, x):
        m = nnx.merge(graphdef, params, rest)
        y = m(x) if mesh is None else parallel.sequence_parallel(m, x, mesh=mesh, axis=parallel.SEQUENCE)
        return jnp.mean(y**2)

    return jax.jit(jax.value_and_grad(loss)), params, rest


def sequence_attempt(num_devices: int, length: int, sizes: Sizes, args, clock: Clock, limit: float,
                     layouts: dict) -> dict:
    """One forward + backward at ``length`` on ``num_devices`` (one: the plain forward; more: sequence parallel):
    ``status`` ``ok`` (timed), ``oom`` (``how``: ``predicted`` when the compiled peak exceeds ``limit`` bytes per
    device, ``compile`` or ``run``) or ``error``."""
    row = {"devices": num_devices, "L": length, "B": sizes.sp_batch, "d_model": sizes.sp_d_model}
    clock.require(f"sequence L={length} on {num_devices}")
    if num_devices == 1:
        mesh, sharding = None, jax.sharding.SingleDeviceSharding(jax.devices()[0])
    else:
        mesh = parallel.data_mesh(num_devices, axis=parallel.SEQUENCE)
        layouts[f"sequence/{num_devices}"] = mesh_layout(mesh)
        sharding = parallel.sequence_sharding(mesh)
    step, params, rest = sequence_step(Mamba(d_model=sizes.sp_d_model, rngs=nnx.Rngs(0)), mesh)
    if mesh is not None:
        params, rest = parallel.replicate((params, rest), mesh)
    shape = (sizes.sp_batch, length, sizes.sp_d_model)
    try:
        x_spec = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
        compiled, row["compile_s"] = clock.compile(lambda: step.lower(params, rest, x_spec).compile())
    except Exception as error:
        return failed_row(row, error, how="compile")
    row["peak_bytes_per_device"] = memory_stats(compiled)["peak_bytes"]
    if row["peak_bytes_per_device"] > limit:
        return {**row, "status": "oom", "how": "predicted",
                "reason": f"compiled peak {row['peak_bytes_per_device'] / GiB:.3g} GiB > {limit / GiB:.3g} GiB"}
    try:
        x = random_normal(3, shape, sharding)
        row.update(clock.time(lambda: compiled(params, rest, x), args.warmup, args.repeats))
    except Exception as error:
        return failed_row(row, error, how="run")
    row["us_per_token"] = 1e6 * row["median_s"] / (sizes.sp_batch * length)
    row["status"] = "ok"
    return row


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


def search_one_device(sizes: Sizes, args, clock: Clock, limit: float, layouts: dict) -> tuple[list, dict, set]:
    """The search for the longest power-of-two length that fits one device: ``(rows, {length: ok row}, OOM
    lengths)``; it ends early on an error or the time budget (the row says so)."""
    rows, fits, ooms = [], {}, set()
    length = sizes.sp_start_length
    while length is not None:
        try:
            row = sequence_attempt(1, length, sizes, args, clock, limit, layouts)
        except OutOfTime as why:
            rows.append(skipped_row({"devices": 1, "L": length}, f"time budget: {why}"))
            break
        rows.append(row)
        if row["status"] == "error":
            break
        if row["status"] == "ok":
            fits[length] = row
        else:
            ooms.add(length)
        if fits:
            length = next_length({n: r["peak_bytes_per_device"] for n, r in fits.items()}, ooms, limit,
                                 sizes.sp_max_length)
        else:  # the start does not fit: halve
            length = length // 2 if length > 8 else None
    return rows, fits, ooms


def run_sequence_parallel(sizes: Sizes, args, clock: Clock, layouts: dict) -> dict:
    memory = int(args.memory_limit_gib * GiB) if args.memory_limit_gib else device_memory_limit(jax.devices()[0])
    limit = args.memory_fraction * memory
    search, fits, ooms = search_one_device(sizes, args, clock, limit, layouts)
    result = {"memory_bytes_per_device": memory, "memory_fraction": args.memory_fraction, "search": search,
              "two_devices": []}
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
    row = guarded(two, {"devices": 2, "L": 2 * longest},
                  lambda: sequence_attempt(2, 2 * longest, sizes, args, clock, limit, layouts))
    if row is not None and row["status"] not in ("ok", "error"):  # 2L does not fit two devices either: L on two
        guarded(two, {"devices": 2, "L": longest},
                lambda: sequence_attempt(2, longest, sizes, args, clock, limit, layouts))
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
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "default_matmul_precision": str(jax.config.jax_default_matmul_precision),
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
            lines.append(f"\n{c['model']}: {c['speedup']:.2f}x tokens/s on 2 devices "
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
            lines.append(f"\nB={c['B']}: speed-up {c['speedup_total']:.2f}x total, {c['speedup_marginal']:.2f}x "
                         f"marginal; tokens identical: {c['tokens_identical']} "
                         f"({c['tokens_agreeing_fraction']:.3f} agree)")
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
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kernels", choices=("never", "auto"), default="never",
                        help="pallas_kernels' use_kernels for every part (never: the XLA paths on 1 and 2 devices)")
    parser.add_argument("--memory-limit-gib", type=float, default=None,
                        help="memory per device for the sequence part's search (default: the device's own limit)")
    parser.add_argument("--memory-fraction", type=float, default=0.95,
                        help="a compiled peak above this fraction of the memory per device is an OOM without running")
    parser.add_argument("--sp-start-length", type=int, default=None,
                        help=f"the sequence part's first length on one device (default {Sizes.sp_start_length}, "
                             f"--quick {QUICK.sp_start_length})")
    parser.add_argument("--sp-max-length", type=int, default=None,
                        help=f"the longest length the search tries on one device (default {Sizes.sp_max_length}, "
                             f"--quick {QUICK.sp_max_length})")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, one decode batch, one repeat: a smoke run (CPU, fake devices)")
    parser.add_argument("--out", default=None, help="write the results as JSON here (rewritten after every part)")
    args = parser.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"--parts: unknown {sorted(unknown)}; choose from {list(PARTS)}")
    for name in ("sp_start_length", "sp_max_length"):
        value = getattr(args, name)
        if value is not None and (value < 8 or value & (value - 1)):
            parser.error(f"--{name.replace('_', '-')} must be a power of two >= 8, got {value}")
    if args.quick:
        args.warmup, args.repeats = 1, 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    for name in ("sp_start_length", "sp_max_length"):
        if getattr(args, name) is not None:
            sizes = dataclasses.replace(sizes, **{name: getattr(args, name)})
    dispatch.set_config(use_kernels=args.kernels)
    clock = Clock(args.time_budget)
    layouts: dict = {}
    result = {"environment": environment(args, argv, sizes), "targets": TARGETS, "meshes": layouts, "parts": {}}
    runners = {"data": lambda: run_data_parallel(sizes, args, clock, layouts, ("Mamba", "S5-scan")),
               "decode": lambda: run_model_parallel_decode(sizes, args, clock, layouts),
               "sequence": lambda: run_sequence_parallel(sizes, args, clock, layouts),
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
            except Exception as error:  # a part that fails is recorded; the others still run
                traceback.print_exception(error, file=sys.stderr)
                result["parts"][name] = {"error": failure(error)}
            result["parts"][name]["seconds"] = time.perf_counter() - start
        part = result["parts"][name]
        done = part.get("skipped") or part.get("error") or f"{part['seconds']:.0f} s"
        print(f"[{clock.elapsed():.0f} s] {name}: {done}", flush=True)
        result["elapsed_s"] = clock.elapsed()
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1, default=str)
    result["elapsed_s"] = clock.elapsed()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
