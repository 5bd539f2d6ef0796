"""Training speed of every model: lrnnx's training sweeps, the XLA path against the Pallas kernels.

    python -m benchmarks.benchmark_training                                  # every model and sweep (GPU)
    python -m benchmarks.benchmark_training --time-budget 1200 --out benchmark_results/training_h200.json
    python -m benchmarks.benchmark_training --models Mamba,LRU --sweeps large --paths xla,kernels
    python -m benchmarks.benchmark_training --quick                          # a tiny CPU smoke run

**Measurement** (as lrnnx's ``benchmarks/benchmark_training.py``: forward and ``y.sum().backward()``):
``jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))`` with ``loss(params, x) = sum(model(x))``, the gradient of
every ``nnx.Param`` and of ``x`` (float32). The program is compiled first (``compile_s``: tracing, lowering and
compiling, the Triton lowering of the kernels included) and never inside the timing; the time is the median of
``--repeats`` calls after ``--warmup`` calls (:func:`benchmarks.timing.median_seconds`). Peak memory is XLA's memory
analysis of the compiled program (``peak = argument + output + temp - alias``,
:func:`benchmarks.benchmark_scan_memory.memory_stats`); a program whose peak exceeds ``--memory-fraction`` of the
device memory is not run, and an out-of-memory error at compile or run time is recorded as ``OOM``: the sweep goes on.

**Paths** (``--paths``):

* ``xla``: the model built with ``kernel_config=KernelConfig(use_kernels="never")``;
* ``kernels``: with ``KernelConfig(use_kernels="always")``: the model's Pallas training kernels (in Pallas interpret
  mode off-GPU);
* ``auto``: built without ``kernel_config``, as users get it (``use_kernels="auto"`` unless they changed the default).

Each path is traced under the same process default (:func:`pallas_kernels.kernel_config`; ``auto``: the default
unchanged). A model has a kernel path when its constructor takes ``kernel_config`` (Mamba's, and any model that
adds it); a model without one runs the ``xla`` path only (it is also its ``auto`` path), and the output says so. A
``kernels`` row whose program holds no ``pallas_call`` (the model's dispatch kept the XLA path for these shapes) is
flagged. The ``kernels`` and ``auto`` gradients are compared with the ``xla`` path's at every point:
``max_rel_err_vs_xla`` is the largest ``max|ours - xla| / max|xla|`` over the gradients' leaves, flagged above
``--rtol`` (default 1e-5). The loss is not one of them: it is a sum of ``B * L * H`` outputs that can cancel (S7 at
H=64: 7.54 from 4.2 M terms), so its relative difference measures the cancellation, not the paths;
``loss_abs_diff_vs_xla`` reports its absolute difference. The compared values come from programs traced again
under ``--check-precision`` (default ``highest``: float32 dots, so that on a GPU the comparison measures the kernels
and not TF32 rounding; ``same``, or the ``--matmul-precision`` of the timed programs: their own results, no second
compilation).

**Sweeps** (``--sweeps``; lrnnx's values, one axis at a time around lrnnx's benchmark point B=32, H=128, L=2048,
d_state 64, Mamba's 16; lrnnx's ``run_all`` ran its width and batch sweeps at L=512: ``--point-length 512``):

* ``seq``: L in 8 ... 2048; ``dim``: H in 16 ... 256; ``batch``: B in 8 ... 128. The benchmark point, common to the
  three, is measured once, first;
* ``large``: d_model 1024, B=8, L=4096, where the rows of programs with a Pallas scan op also report the fraction
  of the HBM roofline that op reaches. The scan op is each ``custom_vjp`` call of the forward that holds a
  ``pallas_call``; its minimum traffic for forward and backward is ``3 I + 2 O`` bytes: the forward reads its inputs
  (``I`` bytes) and writes its outputs (``O``); the backward reads the inputs again and the outputs' cotangents
  (``O``) and writes the inputs' gradients (``I``, float inputs). ``roofline_ms = (3 I + 2 O) / --hbm-bandwidth``
  (default 4.8e12 B/s, the H200's HBM3e); the op alone (``jit(value_and_grad)`` of the op on random inputs of its
  shapes: its time does not depend on the values) is timed as ``scan_ms``, and ``roofline_fraction = roofline_ms /
  scan_ms``; ``step_roofline_fraction`` divides by the whole training step's time instead.

**Models**: LRU, S4, S4D, S5 (LTI, zoh), ltv.S5, Centaurus (neck, 2 sub-states), Mamba (its default "mamba"
discretization), Mamba2 (headdim gcd(64, 2H); its default scan), Mamba2-ssd (the same with ``scan_method="ssd"``, the
chunked SSD matmul form, at the model's chunk_size 256), RGLRU, S7; S4 and S4D with ``transposed=False`` (the (B, L, H)
layout of the others). ``--matmul-precision`` sets JAX's float32 dot precision (default: JAX's own).

**Output**: ``--out`` (JSON, default ``benchmark_results/training.json``, rewritten after every point so a stopped
run keeps what it measured), a CSV beside it (one row per model, path and point), a plot beside it (time against L,
H and B, one panel per model and sweep, one line per path; :func:`benchmarks.reporting.write_plot`) and a printed
summary at the benchmark point with PyTorch lrnnx's times and the issue's targets, read from
``benchmarks/results/lrnnx_anchors.json`` (``--anchors``) and used only on the device kind they were measured on (an
H200) at their configuration. ``--time-budget`` seconds stops the sweep between measurements and writes what it has.

GPU only for meaningful numbers. ``--quick`` is a smoke run of the whole script on a CPU (about 45 s of CPU time):
tiny shapes, one repeat, LRU and S4 unless ``--models`` names others (kernels in Pallas interpret mode compile for
5-15 s each: ``--quick --models all --sweeps large``, one point per model, took 2 minutes of CPU time).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import gc
import importlib
import inspect
import json
import math
import os
import pathlib
import platform
import sys
import time
from typing import Callable, Optional

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels
from benchmarks import anchors as anchors_lib
from benchmarks.benchmark_scan_memory import device_memory_limit, memory_stats
from benchmarks.benchmark_train_scan import relative_errors
from benchmarks.reporting import Progress, add_plot_and_anchor_arguments, pyplot, save, write_plot
from benchmarks.timing import median_seconds, overridden
from pallas_kernels import KernelConfig

MiB = 2**20
#: each path's kernel configuration (None: the model built without one, the default read at trace time)
PATHS: dict[str, Optional[KernelConfig]] = {
    "xla": KernelConfig(use_kernels="never"),
    "kernels": KernelConfig(use_kernels="always"),
    "auto": None,
}
#: lrnnx's training sweeps (benchmarks/benchmark_training.py) and its benchmark point
SEQ_LENGTHS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
MODEL_DIMS = (16, 32, 64, 128, 256)
BATCH_SIZES = (8, 16, 32, 64, 128)
POINT = dict(B=32, H=128, L=2048)
LARGE = dict(B=8, H=1024, L=4096)
SWEEPS = {"seq": "L", "dim": "H", "batch": "B"}  # sweep -> the axis it varies
SECTIONS = (*SWEEPS, "large")
#: ``--quick``'s defaults (options given explicitly still win): two models (one with a kernel path where the
#: diagonal models have one, S4 without), tiny shapes (the large configuration is the benchmark point), one repeat
QUICK = dict(models=["LRU", "S4"], seq_lengths=[8, 16], model_dims=[4, 8], batch_sizes=[1, 2], point_batch=2,
             point_dim=8, point_length=16, large_batch=2, large_dim=8, large_length=16, d_state=4, warmup=1,
             repeats=1)
H200_HBM_BYTES_PER_S = 4.8e12


@dataclasses.dataclass(frozen=True)
class TrainModel:
    """One benchmarked model: ``kwargs(H, d_state)`` are its constructor arguments, ``state(d_state)`` the state
    size it runs with (Mamba: lrnnx's 16; None: the model has none)."""

    name: str
    target: str  # "module:attribute" of the class or factory
    kwargs: Callable[[int, Optional[int]], dict]
    state: Callable[[int], Optional[int]] = lambda N: N

    def build(self, H: int, d_state: int, seed: int, **extra):
        module, attribute = self.target.split(":")
        factory = getattr(importlib.import_module(module), attribute)
        return factory(**self.kwargs(H, self.state(d_state)), **extra, rngs=nnx.Rngs(seed))


MODELS: list[TrainModel] = [
    TrainModel("LRU", "lrnnx_jax.models.lti.lru:LRU", lambda H, N: dict(d_model=H, d_state=N)),
    TrainModel("S4", "lrnnx_jax.models.lti.s4:S4", lambda H, N: dict(d_model=H, d_state=N, transposed=False)),
    TrainModel("S4D", "lrnnx_jax.models.lti.s4d:S4D", lambda H, N: dict(d_model=H, d_state=N, transposed=False)),
    TrainModel("S5", "lrnnx_jax.models.lti.s5:S5", lambda H, N: dict(d_model=H, d_state=N, discretization="zoh")),
    TrainModel("ltv.S5", "lrnnx_jax.models.ltv.s5:S5", lambda H, N: dict(d_model=H, d_state=N)),
    TrainModel("Centaurus", "lrnnx_jax.models.lti.centaurus:Centaurus",
               lambda H, N: dict(d_model=H, d_state=N, sub_state_dim=2, mode="neck")),
    TrainModel("Mamba", "lrnnx_jax.models.ltv.mamba:Mamba", lambda H, N: dict(d_model=H, d_state=N), lambda N: 16),
    TrainModel("Mamba2", "lrnnx_jax.models.ltv.mamba2:Mamba2",
               lambda H, N: dict(d_model=H, d_state=N, headdim=math.gcd(64, 2 * H))),
    TrainModel("Mamba2-ssd", "lrnnx_jax.models.ltv.mamba2:Mamba2",
               lambda H, N: dict(d_model=H, d_state=N, headdim=math.gcd(64, 2 * H), scan_method="ssd")),
    TrainModel("RGLRU", "lrnnx_jax.models.ltv.rglru:RGLRU", lambda H, N: dict(d_model=H), lambda N: None),
    TrainModel("S7", "lrnnx_jax.models.ltv.s7:S7", lambda H, N: dict(d_model=H, d_state=N)),
]
BY_NAME = {spec.name: spec for spec in MODELS}


def takes_kernel_config(cls) -> bool:
    """Whether ``cls(...)`` accepts ``kernel_config``: the first ``__init__`` along the MRO that names it, or that
    takes no ``**kwargs`` to pass it on, decides."""
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters
        if "kernel_config" in parameters:
            return True
        if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            return False
    return False


# ------------------------------------------------------------------ the points
@dataclasses.dataclass(frozen=True)
class Point:
    B: int
    H: int
    L: int


def sweep_points(args) -> tuple[list, list]:
    """The distinct points of the selected sweeps, each with the sweeps it belongs to, in two lists: the benchmark
    point (common to ``seq``, ``dim`` and ``batch``) and ``large``, then the rest of each sweep in order."""
    values = {"seq": args.seq_lengths, "dim": args.model_dims, "batch": args.batch_sizes}
    member: dict[Point, list[str]] = {}
    point = Point(**args.point)
    for sweep in args.sweeps:
        if sweep == "large":
            continue
        for swept in [point] + [dataclasses.replace(point, **{SWEEPS[sweep]: value}) for value in values[sweep]]:
            if sweep not in member.setdefault(swept, []):
                member[swept].append(sweep)
    order = [point] if point in member else []
    if "large" in args.sweeps:
        large = Point(**args.large)
        member.setdefault(large, []).append("large")  # after the axis sweeps: at most once
        order += [] if large in order else [large]
    rest = [p for p in member if p not in order]
    return [(p, tuple(member[p])) for p in order], [(p, tuple(member[p])) for p in rest]


def schedule(specs, head, rest) -> list:
    """``(point, sweeps, spec)`` jobs: the ``head`` points for every model first (a run stopped by its time budget
    has the summary), then model by model the ``rest`` (consecutive points of one model share its built models)."""
    return ([(point, sweeps, spec) for point, sweeps in head for spec in specs]
            + [(point, sweeps, spec) for spec in specs for point, sweeps in rest])


# ------------------------------------------------------------------ the training step
def training_step(model):
    """``jit(value_and_grad(sum(model(x))))`` w.r.t. the parameters and ``x``, its parameters, and the forward
    ``(params, x) -> y`` (for its jaxpr)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def forward(params, x):
        return nnx.merge(graphdef, params, rest)(x)

    def loss(params, x):
        return jnp.sum(forward(params, x))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params, forward


def equations(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in it (jit, custom_vjp, pallas_call, loops ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jex.core.jaxprs_in_params(eqn.params):
            yield from equations(sub)


def holds_pallas(jaxpr) -> bool:
    return any(eqn.primitive.name == "pallas_call" for eqn in equations(jaxpr))


def pallas_scan_ops(jaxpr) -> list:
    """The scan ops of a forward: each ``custom_vjp`` call whose primal holds a ``pallas_call``."""
    return [eqn for eqn in equations(jaxpr) if eqn.primitive.name == "custom_vjp_call"
            and any(holds_pallas(sub) for sub in jex.core.jaxprs_in_params(eqn.params))]


def aval_bytes(aval) -> int:
    return math.prod(aval.shape) * np.dtype(aval.dtype).itemsize


def is_float(aval) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.inexact)


def minimum_traffic(ops) -> int:
    """``3 I + 2 O`` bytes summed over the ops: inputs read by the forward and by the backward, their gradients
    written (float inputs); outputs written and their cotangents read (see the module docstring)."""
    total = 0
    for eqn in ops:
        avals = [v.aval for v in eqn.invars]
        total += 2 * sum(map(aval_bytes, avals)) + sum(aval_bytes(a) for a in avals if is_float(a))
        total += 2 * sum(aval_bytes(v.aval) for v in eqn.outvars)
    return total


def scan_ops_step(ops, seed: int):
    """``jit(value_and_grad)`` of the ops alone (the sum of their float outputs, the gradients of their float
    inputs) and its argument: random float inputs of their shapes, uniform in [0.01, 0.05] (small positive steps and
    rates, so nothing overflows over the sequence); other inputs zero, literals as they are."""
    rng = np.random.default_rng(seed)
    fixed, floats = [], []  # per op: every input, None where a float input goes; the float inputs
    for eqn in ops:
        fixed.append([v.val if isinstance(v, jex.core.Literal)
                      else None if is_float(v.aval) else jnp.zeros(v.aval.shape, v.aval.dtype) for v in eqn.invars])
        floats.append([jnp.asarray(rng.uniform(0.01, 0.05, v.aval.shape), v.aval.dtype)
                       for v, value in zip(eqn.invars, fixed[-1]) if value is None])

    def loss(floats):
        total = 0.0
        for eqn, values, given in zip(ops, fixed, floats):
            given = iter(given)
            params = eqn.primitive.get_bind_params(eqn.params)  # as jax.core.eval_jaxpr binds it
            outputs = eqn.primitive.bind(*[next(given) if v is None else v for v in values], **params)
            total += sum(jnp.sum(jnp.real(o)) for o in outputs if is_float(o))
        return total

    return jax.jit(jax.value_and_grad(loss)), (floats,)


def failure(error: Exception) -> str:
    """``"OOM"`` for an out-of-memory error, else ``"error: Type: first line"``."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        return "OOM"
    return f"error: {type(error).__name__}: {text.strip().splitlines()[0][:200] if text.strip() else ''}"


def measure_path(model, path: str, x, args, large: bool) -> tuple[dict, Optional[tuple]]:
    """One row (and the ``(loss, grads)`` of the first call, None when it did not run) of ``model`` on ``path``
    (traced under that path's default configuration); ``large``: with the roofline columns."""
    row = dict(path=path, status="ok")
    config = PATHS[path]
    try:
        with contextlib.nullcontext() if config is None else pallas_kernels.kernel_config(config):
            step, params, forward = training_step(model)
            start = time.perf_counter()
            traced = step.trace(params, x)
            compiled = traced.lower().compile(args.compiler_options)
            row["compile_s"] = time.perf_counter() - start
            scan_ops = pallas_scan_ops(jax.make_jaxpr(forward)(params, x).jaxpr) if large else []
    except Exception as error:  # an out-of-memory or failing compile: recorded, the sweep goes on
        row["status"] = failure(error)
        return row, None
    row["pallas"] = holds_pallas(traced.jaxpr.jaxpr)
    stats = memory_stats(compiled)
    row.update(peak_bytes=stats["peak_bytes"], temp_bytes=stats["temp_size_in_bytes"],
               argument_bytes=stats["argument_size_in_bytes"], output_bytes=stats["output_size_in_bytes"])
    budget = args.memory_fraction * args.memory_limit
    if stats["peak_bytes"] > budget:
        row["status"] = f"OOM (not run: needs {stats['peak_bytes'] / MiB:.0f} MiB > {budget / MiB:.0f} MiB)"
        return row, None
    try:
        result = jax.block_until_ready(compiled(params, x))
        row["loss"] = float(result[0])
        row["median_ms"] = 1e3 * median_seconds(lambda: compiled(params, x), args.warmup, args.repeats)
        if args.check_precision not in ("same", args.matmul_precision or "default"):
            # the compared values: the step traced again at that precision (not when the timed one already ran at it)
            with (contextlib.nullcontext() if config is None else pallas_kernels.kernel_config(config),
                  jax.default_matmul_precision(args.check_precision)):
                result = jax.block_until_ready(training_step(model)[0](params, x))
    except Exception as error:
        row["status"] = failure(error)
        return row, None
    if large:
        try:
            row.update(roofline(scan_ops, row["median_ms"], args))
        except Exception as error:  # the step was measured; only the scan op alone failed
            row["note"] = f"scan op alone: {failure(error)}"
    return row, result


def roofline(ops, step_ms: float, args) -> dict:
    """The HBM roofline columns of a program with Pallas scan ops (none without)."""
    if not ops:
        return {}
    min_bytes = minimum_traffic(ops)
    step, arguments = scan_ops_step(ops, args.seed)
    compiled = step.lower(*arguments).compile()
    scan_ms = 1e3 * median_seconds(lambda: compiled(*arguments), args.warmup, args.repeats)
    roofline_ms = 1e3 * min_bytes / args.hbm_bandwidth
    return dict(scan_ops=len(ops), scan_min_bytes=min_bytes, scan_ms=scan_ms, roofline_ms=roofline_ms,
                roofline_fraction=roofline_ms / scan_ms, step_roofline_fraction=roofline_ms / step_ms)


def compare_with_xla(result, xla_result, rtol: float) -> dict:
    """The columns comparing one path's ``(loss, grads)`` with the ``xla`` path's: the gradients' largest relative
    error (:func:`~benchmarks.benchmark_train_scan.relative_errors`), whether it is within ``rtol``, and the losses'
    absolute difference."""
    error = relative_errors(result[1], xla_result[1])
    return dict(max_rel_err_vs_xla=error, grads_match=error <= rtol,
                loss_abs_diff_vs_xla=abs(float(result[0]) - float(xla_result[0])))


def measure_point(models: "Models", point: Point, sweeps: tuple[str, ...], args,
                  out_of_time: Callable[[], bool]) -> list[dict]:
    """Every path of ``models.spec`` at ``point``: rows with the gradients compared with the ``xla`` path's."""
    spec, paths = models.spec, models.paths
    x = jnp.asarray(np.random.default_rng(args.seed).standard_normal((point.B, point.L, point.H)), jnp.float32)
    state = spec.state(args.d_state)
    common = dict(model=spec.name, sweeps="|".join(sweeps), B=point.B, H=point.H, L=point.L, d_state=state)
    rows, results = [], {}
    for path in paths:
        if out_of_time():
            break
        row, result = measure_path(models.get(point.H, path), path, x, args, "large" in sweeps)
        rows.append({**common, **row})
        if result is not None:
            results[path] = result
    for row in rows:
        if row["path"] != "xla" and row["path"] in results and "xla" in results:
            row.update(compare_with_xla(results[row["path"]], results["xla"], args.rtol))
    del results
    gc.collect()  # the point's compiled programs, gradients and inputs were its own: freed here
    return rows


class Models:
    """The models of the spec being measured, built once per width and path (every path from the same seed, so
    with the same parameters; a model serves every B and L). Moving to another spec drops them and clears JAX's
    caches (traces, lowerings and the constants they hold).

    ``paths`` are the spec's paths: all asked for when its class takes ``kernel_config``; otherwise one (``xla``,
    or ``auto`` when only it was asked for: the same program), with ``note`` saying so."""

    def __init__(self, args):
        self.args, self.spec, self.built = args, None, {}

    def use(self, spec: TrainModel):
        if spec is self.spec:
            return
        if self.spec is not None:
            self.built.clear()
            jax.clear_caches()
            gc.collect()
        self.spec = spec
        cls = type(self._build(self.args.point["H"], None))
        self.kernels = takes_kernel_config(cls)
        self.paths = list(self.args.paths) if self.kernels else [p for p in self.args.paths if p != "kernels"][:1]
        self.note = None if self.kernels else (f"{spec.name}: no kernel path ({cls.__name__} takes no kernel_config): "
                                               "xla only, which is also auto")

    def get(self, H: int, path: str):
        """The model of width ``H`` for ``path`` (built without ``kernel_config`` for ``auto`` and for a class that
        takes none)."""
        return self._build(H, PATHS[path] if self.kernels else None)

    def _build(self, H: int, config: Optional[KernelConfig]):
        if (H, config) not in self.built:
            extra = {} if config is None else {"kernel_config": config}
            self.built[H, config] = self.spec.build(H, self.args.d_state, self.args.seed, **extra)
        return self.built[H, config]


# ------------------------------------------------------------------ output
CSV_COLUMNS = ["model", "path", "sweeps", "B", "H", "L", "d_state", "status", "median_ms", "compile_s", "peak_bytes",
               "temp_bytes", "loss", "loss_abs_diff_vs_xla", "max_rel_err_vs_xla", "grads_match", "pallas", "scan_ops",
               "scan_min_bytes", "scan_ms", "roofline_ms", "roofline_fraction", "step_roofline_fraction", "lrnnx_ms",
               "target_ms", "note"]


def write_outputs(out: pathlib.Path, rows: list[dict], meta: dict):
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "results": rows}, indent=1, default=str) + "\n")
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def compare_with_anchors(rows: list[dict], lrnnx: anchors_lib.Anchors, targets: anchors_lib.Anchors):
    """``lrnnx_ms`` and ``target_ms`` of each row from an anchor (target) of this device kind and configuration."""
    for row in rows:
        config = dict(model=row["model"], B=row["B"], H=row["H"], L=row["L"], d_state=row["d_state"])
        theirs, target = lrnnx.find(**config), targets.find(**config)
        row["lrnnx_ms"] = None if theirs is None else theirs.value
        row["target_ms"] = None if target is None else target.value


def fmt(value, spec=".3g") -> str:
    return "-" if value is None else format(value, spec)


def summary_table(rows: list[dict], point: Point) -> str:
    """The benchmark point: each model and path, with lrnnx's time and the target where the anchors give them."""
    lines = [f"## At lrnnx's benchmark point B={point.B}, H={point.H}, L={point.L} (ms, forward + backward)", "",
             "| model | path | median ms | lrnnx ms | lrnnx / ours | target ms | ours / target | met? | "
             "max rel err vs xla | peak MiB | compile s | status |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for row in rows:
        if (row["B"], row["H"], row["L"]) != (point.B, point.H, point.L):
            continue
        ms, theirs, target = row.get("median_ms"), row.get("lrnnx_ms"), row.get("target_ms")
        met = "-" if ms is None or target is None else ("met" if ms <= target else "missed")
        error = row.get("max_rel_err_vs_xla")
        flag = "" if error is None or row.get("grads_match") else " MISMATCH"
        lines.append(
            f"| {row['model']} | {row['path']} | {fmt(ms)} | {fmt(theirs)} "
            f"| {fmt(None if ms is None or theirs is None else theirs / ms, '.2f')} | {fmt(target)} "
            f"| {fmt(None if ms is None or target is None else ms / target, '.2f')} | {met} "
            f"| {fmt(error, '.1e')}{flag} | {fmt(row.get('peak_bytes') and row['peak_bytes'] / MiB, '.1f')} "
            f"| {fmt(row.get('compile_s'), '.1f')} | {row['status']} |")
    return "\n".join(lines)


def roofline_table(rows: list[dict]) -> str:
    lines = ["| model | path | B | H | L | step ms | scan ms | scan min MiB | roofline ms | of roofline (scan) "
             "| of roofline (step) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "roofline_fraction" in row:
            lines.append(f"| {row['model']} | {row['path']} | {row['B']} | {row['H']} | {row['L']} "
                         f"| {fmt(row['median_ms'])} | {fmt(row['scan_ms'])} | {row['scan_min_bytes'] / MiB:.1f} "
                         f"| {fmt(row['roofline_ms'])} | {row['roofline_fraction']:.1%} "
                         f"| {row['step_roofline_fraction']:.1%} |")
    return "\n".join(lines) if len(lines) > 2 else "no program with a Pallas scan op in the large configuration"


def plot(path: pathlib.Path, rows: list[dict]):
    """One panel per model and sweep: median ms against the swept size, one line per path."""
    sweeps = [s for s in SWEEPS if any(s in row["sweeps"].split("|") and row.get("median_ms") for row in rows)]
    models = list(dict.fromkeys(row["model"] for row in rows if any(s in row["sweeps"].split("|") for s in sweeps)))
    if not sweeps or not models:
        return None
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(len(models), len(sweeps), figsize=(4 * len(sweeps), 2.6 * len(models)), squeeze=False)
    labels = {"L": "sequence length L", "H": "model dimension H", "B": "batch size B"}
    for i, model in enumerate(models):
        for j, sweep in enumerate(sweeps):
            ax, axis = axes[i][j], SWEEPS[sweep]
            mine = [r for r in rows if r["model"] == model and sweep in r["sweeps"].split("|") and r.get("median_ms")]
            for name in dict.fromkeys(r["path"] for r in mine):
                points = sorted((r[axis], r["median_ms"]) for r in mine if r["path"] == name)
                ax.plot(*zip(*points), marker="o", ms=3, label=name)
            ax.set(xscale="log", yscale="log", xlabel=labels[axis], ylabel="ms", title=f"{model}: time vs {axis}")
            values = sorted({r[axis] for r in mine})
            ax.set_xticks(values, [str(v) for v in values])
            ax.xaxis.set_minor_formatter(plt.NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
            if mine:
                ax.legend(fontsize=6)
    return save(fig, path)


def environment(args, argv) -> dict:
    device = jax.devices()[0]
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": f"{device.platform}: {getattr(device, 'device_kind', str(device))}",
        "device_kind": anchors_lib.device_kind(),
        "num_cpu_cores": os.cpu_count(),
        "memory_limit_bytes": args.memory_limit,
        "versions": {"jax": jax.__version__, "numpy": np.__version__, "python": platform.python_version()},
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "command": "python -m benchmarks.benchmark_training " + " ".join(argv),
        "config": {k: getattr(args, k) for k in ("models", "paths", "sweeps", "point", "large", "seq_lengths",
                                                 "model_dims", "batch_sizes", "d_state", "warmup", "repeats",
                                                 "matmul_precision", "compiler_options", "check_precision", "rtol",
                                                 "hbm_bandwidth", "memory_fraction", "time_budget", "seed")},
        "constants": constants_record(args.set),
        "loss": "jit(value_and_grad(sum(model(x)))) w.r.t. every nnx.Param and x, float32",
    }


# ------------------------------------------------------------------ command line
def xla_options(text: str) -> dict:
    """``--compiler-options``: a JSON object of XLA option names to scalar values; an ``argparse`` error otherwise."""
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON: {error}") from None
    if not isinstance(options, dict) or not all(isinstance(v, (bool, int, float, str)) for v in options.values()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a JSON object of XLA option names to scalar values")
    return options


def kernel_constant(text: str) -> tuple[str, str, int]:
    """``"pallas_kernels.MODULE.NAME=VALUE"`` (a tiling constant of a kernel module, e.g.
    ``pallas_kernels.diagonal_scan.CHUNK=8``) -> ``(module, name, value)``; an ``argparse`` error names the text and
    what was expected: a module of ``pallas_kernels``, an integer constant it has, an integer value."""
    target, _, value = text.partition("=")
    module, _, name = target.rpartition(".")
    if not module.startswith("pallas_kernels.") or not name or not value.lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected pallas_kernels.MODULE.NAME=INTEGER")
    try:
        current = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {module}.{name} does not exist ({error})") from None
    if isinstance(current, bool) or not isinstance(current, int):
        raise argparse.ArgumentTypeError(f"{text!r}: {module}.{name} is {current!r}, not an integer constant")
    return module, name, int(value)


def parse_args(argv):
    def ints(text):
        return [int(v) for v in text.split(",") if v]

    def names(text):
        return [v for v in text.split(",") if v]

    parser = argparse.ArgumentParser(prog="python -m benchmarks.benchmark_training",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=names, default=[m.name for m in MODELS],
                        help=f"comma-separated subset of {','.join(m.name for m in MODELS)}, or all (the default)")
    parser.add_argument("--paths", type=names, default=list(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    parser.add_argument("--sweeps", type=names, default=list(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--seq-lengths", type=ints, default=list(SEQ_LENGTHS))
    parser.add_argument("--model-dims", type=ints, default=list(MODEL_DIMS))
    parser.add_argument("--batch-sizes", type=ints, default=list(BATCH_SIZES))
    for key, value in POINT.items():
        parser.add_argument(f"--point-{dict(B='batch', H='dim', L='length')[key]}", type=int, default=value,
                            help=f"{key} of the benchmark point, held while another axis is swept (default {value})")
    for key, value in LARGE.items():
        parser.add_argument(f"--large-{dict(B='batch', H='dim', L='length')[key]}", type=int, default=value,
                            help=f"{key} of the large configuration (default {value})")
    parser.add_argument("--d-state", type=int, default=64, help="state size (Mamba keeps 16, RG-LRU has none)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--matmul-precision", choices=("default", "high", "highest"), default=None,
                        help="jax_default_matmul_precision of the programs (default: JAX's own; on GPUs float32 dots "
                        "may then use TF32, where PyTorch lrnnx's float32 does not by default)")
    parser.add_argument("--compiler-options", type=xla_options, default=None, metavar="JSON",
                        help='XLA options the timed programs are compiled with, a JSON object, e.g. '
                             '\'{"xla_gpu_enable_triton_gemm": false}\' (as jax.stages.Lowered.compile takes them)')
    parser.add_argument("--rtol", type=float, default=1e-5, help="largest relative gradient error vs the xla path")
    parser.add_argument("--check-precision", choices=("same", "default", "high", "highest"), default="highest",
                        help="matmul precision of the programs whose gradients are compared (default highest; same: "
                        "the timed programs' results, no second compilation)")
    parser.add_argument("--hbm-bandwidth", type=float, default=H200_HBM_BYTES_PER_S, help="bytes/s (default: H200)")
    parser.add_argument("--memory-fraction", type=float, default=0.9,
                        help="run only programs whose estimated peak is below this fraction of device memory")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: stop between measurements once spent, writing what was measured")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", type=kernel_constant, action="append", default=[], metavar="MODULE.NAME=VALUE",
                        help="override an integer tiling constant of a kernel module before tracing, e.g. "
                             "pallas_kernels.diagonal_scan.CHUNK=8 (repeatable; for tuning runs)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run (CPU): tiny shapes, one repeat, models {','.join(QUICK['models'])} unless "
                        "--models names others (interpret-mode kernels compile for 5-15 s each)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmark_results/training.json"),
                        help="the JSON file; the CSV (and plot) go beside it")
    add_plot_and_anchor_arguments(parser, "training.png")
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    if args.models == ["all"]:
        args.models = list(BY_NAME)
    for option, chosen, known in (("--models", args.models, BY_NAME), ("--paths", args.paths, PATHS),
                                  ("--sweeps", args.sweeps, SECTIONS)):
        unknown = [v for v in chosen if v not in known]
        if unknown or not chosen:
            parser.error(f"{option}: unknown or no values {unknown}; expected a subset of {list(known)}")
    args.point = dict(B=args.point_batch, H=args.point_dim, L=args.point_length)
    args.large = dict(B=args.large_batch, H=args.large_dim, L=args.large_length)
    return args


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    with kernel_constants(args.set):
        return run(args, argv)


def constants_record(settings: list) -> dict:
    """``--set``'s overrides as the results file records them: ``{"MODULE.NAME": value}``."""
    return {f"{module}.{name}": value for module, name, value in settings}


@contextlib.contextmanager
def kernel_constants(settings: list):
    """``--set``'s ``(module, name, value)`` overrides, undone on exit."""
    with contextlib.ExitStack() as stack:
        for module, name, value in settings:
            stack.enter_context(overridden(importlib.import_module(module), **{name: value}))
        yield


def run(args, argv) -> dict:
    """:func:`main` after parsing (and under ``--set``'s constants)."""
    args.memory_limit = device_memory_limit(jax.devices()[0])
    env = environment(args, argv)
    lrnnx = anchors_lib.anchors(env["device_kind"], args.anchors, benchmark="train")
    targets = anchors_lib.anchors(env["device_kind"], args.anchors, benchmark="train", key="targets")
    print(f"training step (forward + backward of sum(model(x))), float32; {env['device']}, jax {jax.__version__}")
    if jax.devices()[0].platform != "gpu":
        print("not on a GPU: the kernels run in Pallas interpret mode; the times say nothing about the kernels")

    jobs = schedule([BY_NAME[name] for name in args.models], *sweep_points(args))
    models, notes = Models(args), []
    start = time.perf_counter()

    def out_of_time():
        return args.time_budget is not None and time.perf_counter() - start > args.time_budget

    rows, stopped = [], None
    meta = dict(environment=env, notes=notes)
    precision = (contextlib.nullcontext() if args.matmul_precision is None
                 else jax.default_matmul_precision(args.matmul_precision))
    with precision, Progress(len(jobs), desc="training", unit="point") as progress:
        for done, (point, sweeps, spec) in enumerate(jobs):
            if out_of_time():
                stopped = f"time budget of {args.time_budget:g} s spent after {done} of {len(jobs)} points"
                break
            models.use(spec)
            if models.note and models.note not in notes:
                notes.append(models.note)
                progress.write(models.note)
            new = measure_point(models, point, sweeps, args, out_of_time)
            for row in new:
                row["note"] = "; ".join(filter(None, (row.get("note"), kernel_note(row), models.note))) or None
            compare_with_anchors(new, lrnnx, targets)
            rows += new
            for row in new:
                if row.get("grads_match") is False:
                    progress.write(f"  MISMATCH {spec.name} {row['path']} at B={point.B} H={point.H} L={point.L}: "
                                   f"max rel err {row['max_rel_err_vs_xla']:.1e} > {args.rtol:g}")
                if row["status"] != "ok":
                    progress.write(f"  {spec.name} {row['path']} at B={point.B} H={point.H} L={point.L}: "
                                   f"{row['status']}")
            if len(new) < len(models.paths):  # the budget ran out between this point's paths
                stopped = (f"time budget of {args.time_budget:g} s spent at {spec.name} B={point.B} H={point.H} "
                           f"L={point.L} after {len(new)} of its {len(models.paths)} paths ({done} of {len(jobs)} "
                           "points done)")
            write_outputs(args.out, rows, {**meta, "stopped": stopped})
            if stopped:
                break
            progress.update(f"{spec.name} B={point.B} H={point.H} L={point.L}")
    if stopped:
        print(f"stopped: {stopped}")
    meta.update(stopped=stopped, anchors=lrnnx.to_json(), targets=targets.to_json())
    write_outputs(args.out, rows, meta)
    print("\n" + summary_table(rows, Point(**args.point)))
    if "large" in args.sweeps:
        print(f"\n## Large configuration: the Pallas scan ops against the HBM roofline "
              f"(3 I + 2 O bytes at {args.hbm_bandwidth:.3g} B/s)\n" + roofline_table(rows))
    print("\nPyTorch lrnnx and the issue's targets (only on their device kind and configuration):")
    for line in anchor_lines(lrnnx, "PyTorch lrnnx times") + anchor_lines(targets, "targets")[1:]:
        print(f"- {line}")
    mismatches = [r for r in rows if r.get("grads_match") is False]
    print(f"gradient check (kernels and auto vs xla, rtol {args.rtol:g}, matmul precision {args.check_precision}): "
          f"{len(mismatches)} mismatches" + ("" if mismatches else ", all within tolerance"))
    print(f"results: {args.out} and {args.out.with_suffix('.csv')}")
    write_plot(args, "training.png", plot, rows)
    return dict(meta, results=rows)


def anchor_lines(found: anchors_lib.Anchors, what: str) -> list[str]:
    """:meth:`~benchmarks.anchors.Anchors.summary` with the skipped anchors counted (the JSON lists each, and why)."""
    lines = [line for line in found.summary() if not line.startswith("skipped ")]
    skipped = len(found.summary()) - len(lines)
    return lines + ([f"{what}: {skipped} skipped (another device kind or configuration; listed in the JSON)"]
                    if skipped else [])


def kernel_note(row: dict) -> Optional[str]:
    if row["path"] == "kernels" and row.get("pallas") is False:
        return "the kernel path runs no pallas_call at these shapes (the model's dispatch kept the XLA path)"
    return None


if __name__ == "__main__":
    main()
