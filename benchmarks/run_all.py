"""Run the inference benchmarks for every model: ``python -m benchmarks.run_all [options]``.

Sections (``--sweeps``, all by default):

* ``seq``, ``dim``, ``batch``: lrnnx's three sweeps (time against L, H and B),
  with lrnnx's run_all state size 16, for every model;
* ``target``: B=32, H=128, 512 steps, d_state=64 (16 for Mamba), in µs per
  generated step, for each ``--block-size`` and ``--unroll`` (the
  :class:`~lrnnx_jax.generation.GenerationConfig` knobs), next to the baseline (a Python loop
  over a jitted ``model.step``), the speed-up over it, PyTorch lrnnx's number where a results
  file holds one for the same device kind and configuration (``--anchors``), and the 10 µs/step target.

Comparisons with PyTorch lrnnx use only numbers read from a named results file
(``--anchors PATH``, repeatable; default ``benchmarks/results/lrnnx_anchors.json``, whose CUDA-graph
replay numbers were measured on an H100): a row gets one only when this run's device kind names the
anchor's device and its configuration (model, B, H, steps, d_state) equals the anchor's. A CPU run is
never compared with GPU numbers; the report lists every skipped anchor and why (:mod:`benchmarks.anchors`).

Each ``--command-buffer`` value reruns the target section in a child process
with ``XLA_FLAGS=... --xla_gpu_enable_command_buffer=VALUE`` (XLA reads its flags
once per process), before this process takes the device: ``off`` is the empty
list (no command buffers), any other value is passed as is, e.g.
``FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL``.

Writes to ``--out`` (default ``benchmark_results/``): ``infer_<sweep>.csv`` (lrnnx's
columns plus ``compile_s`` and ``us_per_step``), ``target.csv``, ``results.json``
(everything, with device, versions, command and the anchors used or skipped), PNG plots
(µs per generated step against L, H and B, one line per model, and PyTorch lrnnx's
points where an anchors file holds them for this device; skipped with a message when
matplotlib is missing, or with ``--no-plot``) and ``report.md``. A progress bar
(tqdm, or plain lines without it) and a summary table are printed. tqdm and
matplotlib come with the ``bench`` extra, which ``make setup`` installs.

A quick GPU run (about 5 minutes)::

    python -m benchmarks.run_all --quick --sweeps target --block-size 16,512 --unroll 1,8 \\
        --command-buffer off --command-buffer FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import traceback
from typing import Callable

import flax
import jax
import jaxlib
import numpy as np
from flax import nnx

from benchmarks import anchors as anchors_lib
from benchmarks import benchmark_inference as infer
from benchmarks.reporting import Progress, pyplot, save
from lrnnx_jax.convert import model_class
from lrnnx_jax.generation import GenerationConfig

SWEEP_STATE = 16  # lrnnx's run_all STATE_DIM
TARGET_US = 10.0


@dataclasses.dataclass(frozen=True)
class BenchModel:
    """One benchmarked configuration: ``kwargs(H, d_state)`` are the lrnnx constructor arguments."""

    name: str
    lrnnx_name: str
    kwargs: Callable[[int, int], dict]
    event: bool = False

    def model_fn(self, H: int, d_state: int, seed: int = 0) -> Callable:
        cls = model_class(self.lrnnx_name)
        return lambda: cls(**self.kwargs(H, d_state), rngs=nnx.Rngs(seed))


MODELS: list[BenchModel] = [
    BenchModel("S5", "lti.S5", lambda H, N: dict(d_model=H, d_state=N, discretization="zoh")),
    BenchModel("LRU", "lti.LRU", lambda H, N: dict(d_model=H, d_state=N)),
    BenchModel("Mamba", "ltv.Mamba", lambda H, N: dict(d_model=H, d_state=16)),
    BenchModel("S4", "lti.S4", lambda H, N: dict(d_model=H, d_state=N)),
    BenchModel("S4D", "lti.S4D", lambda H, N: dict(d_model=H, d_state=N)),
    BenchModel("CentaurusNeck", "lti.Centaurus", lambda H, N: dict(d_model=H, d_state=N, sub_state_dim=2, mode="neck")),
    BenchModel("CentaurusPWNeck", "lti.Centaurus", lambda H, N: dict(d_model=H, d_state=N, sub_state_dim=2, mode="pw")),
    BenchModel("CentaurusDWS", "lti.Centaurus", lambda H, N: dict(d_model=H, d_state=H, sub_state_dim=2, mode="dws")),
    BenchModel("ltv.S5", "ltv.S5", lambda H, N: dict(d_model=H, d_state=N)),
    BenchModel("RGLRU", "ltv.RGLRU", lambda H, N: dict(d_model=H)),
    BenchModel("S7", "ltv.S7", lambda H, N: dict(d_model=H, d_state=N)),
    BenchModel("Mamba-event", "ltv.Mamba", lambda H, N: dict(d_model=H, d_state=16), event=True),
    BenchModel("ltv.S5-event", "ltv.S5", lambda H, N: dict(d_model=H, d_state=N), event=True),
]

SWEEPS = {
    # name: (csv column, benchmark function)
    "seq": ("seq_length", infer.benchmark_sequence_length),
    "dim": ("model_dim", infer.benchmark_model_dimension),
    "batch": ("batch_size", infer.benchmark_batch_size),
}
SECTIONS = (*SWEEPS, "target")


# ------------------------------------------------------------------ progress and output
def write_csv(path: pathlib.Path, rows: list[dict]):
    if not rows:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(value):
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def pivot(rows: list[dict], column: str, value: str = "us_per_step") -> tuple[list[dict], list[str]]:
    """Sweep rows -> one row per model, one column (``row[value]``) per swept value."""
    values = sorted({row[column] for row in rows})
    table = {}
    for row in rows:
        table.setdefault(row["model"], {"model": row["model"]})[str(row[column])] = row[value]
    return list(table.values()), ["model"] + [str(v) for v in values]


def environment(args) -> dict:
    device = jax.devices()[0]
    versions = {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__, "numpy": np.__version__,
                "python": platform.python_version()}
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": f"{device.platform}: {getattr(device, 'device_kind', str(device))}",
        "device_kind": anchors_lib.device_kind(),
        "device_count": jax.device_count(),
        "host": platform.node(),
        "versions": versions,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "command": "python -m benchmarks.run_all " + " ".join(args.argv),
    }


def compare_with_anchors(rows: list[dict], anchors: anchors_lib.Anchors):
    """Fill ``lrnnx_us``, ``lrnnx_device`` and ``speedup_vs_lrnnx`` of each row from the anchor of the same
    device kind and configuration (model, B, H, steps, d_state), or leave them empty."""
    for row in rows:
        anchor = anchors.find(model=row["model"], B=row["B"], H=row["H"], steps=row["steps"], d_state=row["d_state"])
        row["lrnnx_us"] = None if anchor is None else anchor.value
        row["lrnnx_device"] = None if anchor is None else anchor.device
        row["speedup_vs_lrnnx"] = None if anchor is None else anchor.value / row["us_per_step"]


SWEEP_LABELS = {"seq_length": "generated steps L", "model_dim": "model width H", "batch_size": "batch size B"}


def plot(out: pathlib.Path, sweeps: dict[str, list[dict]], target: list[dict]) -> list[str]:
    """One PNG per sweep (µs per generated step against the swept value, one line per model, and PyTorch lrnnx's
    anchors of this device kind as dashed lines of the same colour) and one of the target section."""
    if not any(sweeps.values()) and not target:
        return []
    plt = pyplot()
    if plt is None:
        return []
    files = []
    for name, rows in sweeps.items():
        if not rows:
            continue
        column = SWEEPS[name][0]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        devices = sorted({row["lrnnx_device"] for row in rows if row.get("lrnnx_us") is not None})
        for model in dict.fromkeys(row["model"] for row in rows):
            mine = sorted((row[column], row) for row in rows if row["model"] == model)
            xs = np.asarray([x for x, _ in mine])
            per_step = np.asarray([row["us_per_step"] / row["mean_ms"] for _, row in mine])  # µs per step per ms
            mean, low, high = (np.asarray([row[k] for _, row in mine]) * per_step
                               for k in ("mean_ms", "min_ms", "max_ms"))
            line = ax.errorbar(xs, mean, yerr=[mean - low, high - mean], marker="o", ms=3, capsize=2,
                               label=f"{model} (lrnnx_jax)")[0]
            theirs = [(x, row["lrnnx_us"]) for x, row in mine if row.get("lrnnx_us") is not None]
            if theirs:
                ax.plot(*zip(*theirs), ls="--", marker="s", ms=3, color=line.get_color(),
                        label=f"{model} (PyTorch lrnnx)")
        title = f"generation against {SWEEP_LABELS[column]}"
        if devices:
            title += f"; PyTorch lrnnx measured on {', '.join(devices)}"
        ax.set(xscale="log", yscale="log", xlabel=SWEEP_LABELS[column], ylabel="µs per generated step", title=title)
        values = sorted({row[column] for row in rows})
        ax.set_xticks(values, [str(v) for v in values])
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        files.append(save(fig, out / f"infer_{column}.png"))
    best = best_target_rows(target)
    if best:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        names = [row["model"] for row in best]
        positions = np.arange(len(names))
        ax.bar(positions - 0.2, [row["us_per_step"] for row in best], 0.4, label="lrnnx_jax generate (best setting)")
        loop = [row.get("loop_us_per_step") or np.nan for row in best]
        ax.bar(positions + 0.2, loop, 0.4, label="Python loop over jitted step")
        devices = sorted({row["lrnnx_device"] for row in best if row.get("lrnnx_us") is not None})
        if devices:
            reference = [row.get("lrnnx_us") or np.nan for row in best]
            ax.scatter(positions, reference, color="k", marker="_", s=400, zorder=3,
                       label=f"PyTorch lrnnx CUDA graph ({', '.join(devices)})")
        ax.axhline(TARGET_US, color="r", ls="--", lw=1, label=f"target {TARGET_US:g} µs")
        first = best[0]
        ax.set(yscale="log", ylabel="µs per generated step", xticks=positions,
               title=f"B={first['B']}, H={first['H']}, {first['steps']} steps")
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=7)
        files.append(save(fig, out / "target.png"))
    return files


# ------------------------------------------------------------------ sections
def run_sweep(name: str, spec: BenchModel, args, config: GenerationConfig, progress: Progress) -> list[dict]:
    column, function = SWEEPS[name]
    values = {"seq": args.seq_lengths, "dim": args.model_dims, "batch": args.batch_sizes}[name]
    rows = []

    def record(value, times):
        steps = value if name == "seq" else args.seq_len
        B = value if name == "batch" else args.target_batch
        H = value if name == "dim" else args.target_dim
        rows.append(
            dict(
                model=spec.name, **{column: value}, mean_ms=float(np.mean(times)), min_ms=float(np.min(times)),
                max_ms=float(np.max(times)), us_per_step=1e3 * float(np.mean(times)) / steps, compile_s=None,
                B=B, H=H, steps=steps, d_state=spec.kwargs(H, SWEEP_STATE).get("d_state"),
            )
        )
        progress.update(f"{name} {spec.name} {column}={value}")

    timing = dict(repeats=args.repeats, event=spec.event, config=config, warmup=args.warmup, runs=args.runs,
                  on_value=record, progress=False)
    if name == "seq":
        results = function(spec.model_fn(args.target_dim, SWEEP_STATE), values, args.target_batch, **timing)
    elif name == "dim":
        results = function(lambda H: spec.model_fn(H, SWEEP_STATE), values, args.seq_len, args.target_batch, **timing)
    else:
        results = function(spec.model_fn(args.target_dim, SWEEP_STATE), values, args.seq_len, **timing)
    for row in rows:
        row["compile_s"] = results.compile_s[row[column]]
    return rows


def target_configs(args) -> list[GenerationConfig]:
    return [
        GenerationConfig(chunk_size=args.chunk_size, block_size=block, unroll=unroll)
        for block in args.block_size
        for unroll in args.unroll
        if unroll is None or unroll <= block
    ]


def run_target(spec: BenchModel, args, label: str, progress: Progress) -> list[dict]:
    """The target configuration for each generation config (and the baseline loop once)."""
    model_fn = spec.model_fn(args.target_dim, args.target_state)
    steps, rows = args.target_steps, []
    common = dict(repeats=args.repeats, event=spec.event, warmup=args.warmup, runs=args.runs, progress=False)
    loop_us = None
    if not args.no_baseline:
        loop = infer.benchmark_sequence_length(model_fn, [steps], args.target_batch, runner="step_loop", **common)
        loop_us = 1e3 * float(np.mean(loop[steps])) / steps
        progress.update(f"target {spec.name} step loop")
    for config in target_configs(args):
        timings = infer.benchmark_sequence_length(model_fn, [steps], args.target_batch, config=config, **common)
        times = timings[steps]
        us = 1e3 * float(np.mean(times)) / steps
        rows.append(
            dict(
                model=spec.name, command_buffer=label, chunk_size=config.chunk_size, block_size=config.block_size,
                unroll=config.resolved().unroll, B=args.target_batch,
                H=args.target_dim, d_state=spec.kwargs(args.target_dim, args.target_state).get("d_state"), steps=steps,
                mean_ms=float(np.mean(times)), min_ms=float(np.min(times)), max_ms=float(np.max(times)), us_per_step=us,
                compile_s=timings.compile_s[steps], loop_us_per_step=loop_us,
                speedup_vs_loop=None if loop_us is None else loop_us / us, meets_target=us <= TARGET_US,
            )
        )
        progress.update(f"target {spec.name} block={config.block_size} unroll={config.resolved().unroll} [{label}]")
    return rows


def best_target_rows(rows: list[dict]) -> list[dict]:
    """The fastest row of each model over generation configs and command-buffer settings."""
    best = {}
    for row in rows:
        if row["model"] not in best or row["us_per_step"] < best[row["model"]]["us_per_step"]:
            best[row["model"]] = row
    return list(best.values())


def run_command_buffer_child(setting: str, args, index: int) -> tuple[list[dict], list[dict]]:
    """Rerun the target section in a child process with ``--xla_gpu_enable_command_buffer=setting``."""
    out = args.out / f"command_buffer_{index}"
    value = "" if setting == "off" else setting
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_gpu_enable_command_buffer={value}".strip()
    env = dict(os.environ, XLA_FLAGS=flags, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    command = [
        sys.executable, "-m", "benchmarks.run_all", "--sweeps", "target", "--no-plot", "--no-baseline",
        "--out", str(out), "--label", setting, "--models", ",".join(args.models),
        "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--runs", str(args.runs),
        "--unroll", ",".join("auto" if u is None else str(u) for u in args.unroll),
        "--block-size", ",".join(map(str, args.block_size)),
        "--chunk-size", str(args.chunk_size),
        "--target-batch", str(args.target_batch), "--target-dim", str(args.target_dim),
        "--target-state", str(args.target_state), "--target-steps", str(args.target_steps),
    ]
    for path in args.anchors or []:
        command += ["--anchors", str(path)]
    print(f"\n[command buffer {setting!r}] XLA_FLAGS={env['XLA_FLAGS']!r}", flush=True)
    completed = subprocess.run(command, env=env)
    results = out / "results.json"
    if completed.returncode != 0 or not results.exists():
        error = f"child exited with {completed.returncode}"
        return [], [dict(section="target", model="*", command_buffer=setting, error=error)]
    data = json.loads(results.read_text())
    return data["target"], data["failures"]


# ------------------------------------------------------------------ command line
def parse_args(argv=None):
    def ints(text):
        return [int(v) for v in text.split(",") if v]

    def unrolls(text):
        return [None if v == "auto" else int(v) for v in text.split(",") if v]

    names = [m.name for m in MODELS]
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(names), help=f"comma-separated subset of {','.join(names)}")
    parser.add_argument("--sweeps", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--seq-lengths", type=ints, default=list(infer.SEQ_LENGTHS))
    parser.add_argument("--model-dims", type=ints, default=list(infer.MODEL_DIMS))
    parser.add_argument("--batch-sizes", type=ints, default=list(infer.BATCH_SIZES))
    parser.add_argument("--seq-len", type=int, default=512, help="steps in the dim and batch sweeps")
    parser.add_argument("--repeats", type=int, help="repeats per point (default 5; --quick 2)")
    parser.add_argument("--warmup", type=int, help="untimed calls per repeat (default 10; --quick 2)")
    parser.add_argument("--runs", type=int, help="timed calls per repeat (default 90; --quick 10)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, warm-up calls and timed calls")
    default = GenerationConfig()
    parser.add_argument("--chunk-size", type=int, default=default.chunk_size, help="GenerationConfig.chunk_size")
    parser.add_argument("--block-size", type=ints, default=[default.block_size],
                        help="GenerationConfig.block_size values; the sweeps use the first")
    parser.add_argument("--unroll", type=unrolls, default=[None],
                        help="GenerationConfig.unroll values ('auto': 8 on GPUs, 1 on CPU); the sweeps use the first")
    parser.add_argument("--command-buffer", action="append", default=[], metavar="SETTING",
                        help="rerun the target section with --xla_gpu_enable_command_buffer=SETTING ('off': none); "
                        "repeatable")
    parser.add_argument("--target-batch", type=int, default=32)
    parser.add_argument("--target-dim", type=int, default=128)
    parser.add_argument("--target-state", type=int, default=64)
    parser.add_argument("--target-steps", type=int, default=512)
    parser.add_argument("--no-baseline", action="store_true", help="skip the Python-loop baseline")
    parser.add_argument("--no-plot", action="store_true", help="write no PNG plots (they are written by default)")
    parser.add_argument("--anchors", action="append", type=pathlib.Path, metavar="PATH",
                        help="a results file of other libraries' numbers to compare with, used only where measured on "
                        "this device kind (repeatable; default benchmarks/results/lrnnx_anchors.json)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmark_results"))
    parser.add_argument("--label", default=None, help="name of this process's XLA setting (default: from XLA_FLAGS)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(args.models) - set(names))
    sections = [s for s in args.sweeps.split(",") if s]
    unknown_sections = sorted(set(sections) - set(SECTIONS))
    if unknown or unknown_sections:
        parser.error(f"unknown models {unknown} or sweeps {unknown_sections}; "
                     f"models: {names}, sweeps: {list(SECTIONS)}")
    args.sections = [s for s in SECTIONS if s in sections]
    quick = dict(repeats=2, warmup=2, runs=10) if args.quick else dict(repeats=5, warmup=10, runs=90)
    for key, value in quick.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.label is None:
        args.label = os.environ.get("XLA_FLAGS", "").strip() or "default"
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    specs = [m for m in MODELS if m.name in args.models]
    target, failures = [], []
    if "target" in args.sections:
        # the children run first, while this process has not yet taken the device (JAX preallocates its memory)
        for index, setting in enumerate(args.command_buffer):
            rows, child_failures = run_command_buffer_child(setting, args, index)
            target += rows
            failures += child_failures
    env = environment(args)
    anchors = anchors_lib.anchors(env["device_kind"], args.anchors, benchmark="generate")
    print(f"device {env['device']} | jax {env['versions']['jax']} | flax {env['versions']['flax']} | "
          f"XLA_FLAGS={env['XLA_FLAGS']!r}")
    sweep_config = GenerationConfig(chunk_size=args.chunk_size, block_size=args.block_size[0], unroll=args.unroll[0])
    sizes = {"seq": len(args.seq_lengths), "dim": len(args.model_dims), "batch": len(args.batch_sizes),
             "target": len(target_configs(args)) + (0 if args.no_baseline else 1)}
    progress = Progress(sum(sizes[s] for s in args.sections) * len(specs))
    sweeps = {name: [] for name in SWEEPS if name in args.sections}
    for section in args.sections:
        for spec in specs:
            try:
                if section == "target":
                    target += run_target(spec, args, args.label, progress)
                else:
                    sweeps[section] += run_sweep(section, spec, args, sweep_config, progress)
            except Exception as error:  # a model that fails is reported and the run goes on, as in lrnnx
                progress.write(f"  {section} {spec.name} FAILED: {type(error).__name__}: {error}")
                failures.append(dict(section=section, model=spec.name, command_buffer=args.label,
                                     error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc(limit=3)))
    progress.close()
    # the children skip the baseline loop: give their rows this process's
    loops = {row["model"]: row["loop_us_per_step"] for row in target if row["loop_us_per_step"] is not None}
    for row in target:
        if row["loop_us_per_step"] is None and row["model"] in loops:
            row["loop_us_per_step"] = loops[row["model"]]
            row["speedup_vs_loop"] = loops[row["model"]] / row["us_per_step"]

    for rows in (*sweeps.values(), target):
        compare_with_anchors(rows, anchors)

    for name, rows in sweeps.items():
        write_csv(args.out / f"infer_{SWEEPS[name][0]}.csv", rows)
    write_csv(args.out / "target.csv", target)
    results = dict(environment=env, sweeps=sweeps, target=target, failures=failures, anchors=anchors.to_json())
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    plots = [] if args.no_plot else plot(args.out, sweeps, target)
    report = write_report(args.out, env, sweeps, target, failures, plots, anchors)
    print("\n" + report)
    print(f"\nAll benchmarks complete! Results saved to {args.out}/")
    return results


TARGET_COLUMNS = ["model", "command_buffer", "block_size", "unroll", "d_state", "us_per_step", "loop_us_per_step",
                  "speedup_vs_loop", "lrnnx_us", "lrnnx_device", "speedup_vs_lrnnx", "meets_target", "compile_s"]


def write_report(out: pathlib.Path, env: dict, sweeps, target, failures, plots, anchors: anchors_lib.Anchors) -> str:
    """The summary (printed and written to ``report.md``): environment, tables, anchors, plots, failures."""
    parts = [
        "# Inference benchmark results",
        f"- device: {env['device']} (x{env['device_count']}), host {env['host']}, {env['date']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"- XLA_FLAGS: `{env['XLA_FLAGS']}`",
        f"- command: `{env['command']}`",
    ]
    if target:
        best = best_target_rows(target)
        met = sorted(row["model"] for row in best if row["meets_target"])
        missed = sorted(f"{row['model']} ({row['us_per_step']:.1f} µs)" for row in best if not row["meets_target"])
        parts += [
            f"\n## Target: B={target[0]['B']}, H={target[0]['H']}, {target[0]['steps']} steps (µs per generated step)",
            markdown_table(target, TARGET_COLUMNS),
            f"\nBest setting per model; target {TARGET_US:g} µs/step. Met: {', '.join(met) or 'none'}. "
            f"Missed: {', '.join(missed) or 'none'}.",
            markdown_table(best, TARGET_COLUMNS),
        ]
    for name, rows in sweeps.items():
        if rows:
            column = SWEEPS[name][0]
            table, columns = pivot(rows, column, "us_per_step")
            parts += [f"\n## {column} sweep (µs per generated step, lrnnx_jax)", markdown_table(table, columns)]
            theirs = [row for row in rows if row.get("lrnnx_us") is not None]
            if theirs:
                devices = ", ".join(sorted({row["lrnnx_device"] for row in theirs}))
                table, columns = pivot(theirs, column, "lrnnx_us")
                parts += [f"\n{column} sweep, PyTorch lrnnx (µs per generated step, measured on {devices}):",
                          markdown_table(table, columns)]
    if target or any(sweeps.values()):
        parts += ["\n## PyTorch lrnnx anchors", "lrnnx_us is filled only from an anchor measured on this run's device "
                  "kind with the row's configuration (model, B, H, steps, d_state)."]
        parts += [f"- {line}" for line in anchors.summary()]
    if plots:
        parts += ["\n## Plots"] + [f"![{name}]({name})" for name in plots]
    if failures:
        parts += ["\n## Failures"]
        parts += [f"- {f['section']} {f['model']} [{f['command_buffer']}]: {f['error']}" for f in failures]
    report = "\n".join(parts)
    (out / "report.md").write_text(report + "\n")
    return report


if __name__ == "__main__":
    main()
