"""Fused generation against the unfused ``generate``, on the GPU: ``python -m pallas_kernels.gpu_fused_selftest``.

For each case of :data:`CASES` it builds the model, makes its closed loop bounded
(:func:`bounded_model`), runs ``lrnnx_jax.generation.generate`` under
``jax.default_matmul_precision("highest")`` with ``use_kernels="never"`` (the reference) and
:func:`~pallas_kernels.fused_generation.fused_generate`, and prints one table row:
``err = max|fused - ref| / max|ref|`` over all steps, the same over the last eighth
of the steps (normalised by that part's own maximum), the growth ``max|ref| /
max|ref[:, 0]|``, the tolerance and the result. It then checks the documented
fallbacks (models and sizes the kernels do not take) and the generation-program
program (:func:`~pallas_kernels.fused_generation.fused_program`, chosen by
``capture_graph`` under ``use_kernels="always"``) across several program calls. Off-GPU the kernels run in interpret mode (slow: use ``--quick``
and ``--steps``). Exits non-zero when a check fails.

Needs only jax, flax and numpy. ``--out FILE`` writes every number as JSON. The
case builders are shared with the CPU tests (tests/test_pallas_fused_generation.py).
On an H100 the whole run (every case at 512 steps) should take a few minutes, most
of it compiling.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrnnx_jax import generation
from lrnnx_jax.convert import model_class
from pallas_kernels import dispatch
from pallas_kernels import fused_generation as fg


@dataclasses.dataclass(frozen=True)
class Case:
    """One comparison: an lrnnx model name and its constructor arguments, batch, steps, event mode, config."""

    name: str
    model: str
    kwargs: dict
    batch: int = 32
    steps: int = 512
    #: None, "row" (timesteps (B, 1) reused every step) or "step" (a (B, steps) schedule)
    event: Optional[str] = None
    config: dispatch.KernelConfig = dispatch.KernelConfig(use_kernels="always")
    tol: float = 1e-5


H, N = 128, 64

#: realistic sizes for the GPU run (B=32, H=128, d_state=64, 16 for Mamba, 512 steps), then odd shapes
CASES = [
    Case("LRU", "lti.LRU", dict(d_model=H, d_state=N)),
    Case("S5 zoh", "lti.S5", dict(d_model=H, d_state=N, discretization="zoh")),
    Case("S5 bilinear conj_sym event/step", "lti.S5", dict(d_model=H, d_state=N, discretization="bilinear", conj_sym=True), event="step"),
    Case("S5 async event/row", "lti.S5", dict(d_model=H, d_state=N, discretization="async"), event="row"),
    Case("ltv.S5 zoh", "ltv.S5", dict(d_model=H, d_state=N)),
    Case("ltv.S5 dirac event/step", "ltv.S5", dict(d_model=H, d_state=N, discretization="dirac"), event="step"),
    Case("Centaurus neck", "lti.Centaurus", dict(d_model=H, d_state=N, sub_state_dim=2, mode="neck")),
    Case("Centaurus pw zoh", "lti.Centaurus", dict(d_model=H, d_state=N, sub_state_dim=2, mode="pw", discretization="zoh")),
    Case("Centaurus dws", "lti.Centaurus", dict(d_model=H, d_state=H, sub_state_dim=2, mode="dws")),
    Case("Mamba", "ltv.Mamba", dict(d_model=H, d_state=16)),
    Case("Mamba zoh event/step", "ltv.Mamba", dict(d_model=H, d_state=16, discretization="zoh", dt_min=0.01, dt_max=0.3), event="step"),
    Case("Mamba bilinear bias k3", "ltv.Mamba", dict(d_model=H, d_state=16, discretization="bilinear", bias=True, d_conv=3)),
    Case("RG-LRU", "ltv.RGLRU", dict(d_model=H)),
    Case("RG-LRU k2 bias", "ltv.RGLRU", dict(d_model=H, d_conv=2, bias=True, conv_bias=False)),
    Case("Mamba B=1", "ltv.Mamba", dict(d_model=H, d_state=16), batch=1),
    Case("Mamba B=1 split 16", "ltv.Mamba", dict(d_model=H, d_state=16), batch=1,
         config=dispatch.KernelConfig(use_kernels="always", split_programs=16)),
    Case("Mamba B=16 split 8", "ltv.Mamba", dict(d_model=H, d_state=16), batch=16,
         config=dispatch.KernelConfig(use_kernels="always", split_programs=8)),
    Case("Mamba B=32 block 16 split 16", "ltv.Mamba", dict(d_model=H, d_state=16),
         config=dispatch.KernelConfig(use_kernels="always", block_batch=16, split_programs=16)),
    Case("Mamba zoh event/step B=20 block 16 split 8", "ltv.Mamba",
         dict(d_model=H, d_state=16, discretization="zoh", dt_min=0.01, dt_max=0.3), batch=20, event="step",
         config=dispatch.KernelConfig(use_kernels="always", block_batch=16, split_programs=8)),
    Case("Mamba B=100 blocks", "ltv.Mamba", dict(d_model=H, d_state=16), batch=100),
    Case("RG-LRU B=1", "ltv.RGLRU", dict(d_model=H), batch=1),
    Case("RG-LRU B=100 blocks", "ltv.RGLRU", dict(d_model=H), batch=100,
         config=dispatch.KernelConfig(use_kernels="always")),
    Case("RG-LRU k2 bias B=20 block 16 split 4", "ltv.RGLRU", dict(d_model=H, d_conv=2, bias=True, conv_bias=False),
         batch=20, config=dispatch.KernelConfig(use_kernels="always", block_batch=16, split_programs=4)),
    Case("RG-LRU B=3 split 8", "ltv.RGLRU", dict(d_model=H), batch=3,
         config=dispatch.KernelConfig(use_kernels="always", split_programs=8)),
    # blocks of fewer rows than a dot takes (multiply-adds), split: B=32 as 8 blocks of 4 x 16 programs (one load)
    # and 16 blocks of 2 x 8 programs; B=64 as 8 blocks of 8 x 8; a ragged block of 8 in event mode; a block of 4
    # unsplit
    Case("Mamba B=32 block 4 split 16", "ltv.Mamba", dict(d_model=H, d_state=16),
         config=dispatch.KernelConfig(use_kernels="always", block_batch=4, split_programs=16)),
    Case("Mamba B=32 block 2 split 8", "ltv.Mamba", dict(d_model=H, d_state=16),
         config=dispatch.KernelConfig(use_kernels="always", block_batch=2, split_programs=8)),
    Case("Mamba zoh event/step B=20 block 8 split 8", "ltv.Mamba",
         dict(d_model=H, d_state=16, discretization="zoh", dt_min=0.01, dt_max=0.3), batch=20, event="step",
         config=dispatch.KernelConfig(use_kernels="always", block_batch=8, split_programs=8)),
    Case("RG-LRU B=64 block 8 split 8", "ltv.RGLRU", dict(d_model=H), batch=64,
         config=dispatch.KernelConfig(use_kernels="always", block_batch=8, split_programs=8)),
    Case("S5 block 4, B=32", "lti.S5", dict(d_model=H, d_state=N, discretization="zoh"),
         config=dispatch.KernelConfig(use_kernels="always", block_batch=4)),
    Case("S4D", "lti.S4D", dict(d_model=H, d_state=N, transposed=False)),
    Case("S4D bilinear c2 gate2 swap", "lti.S4D", dict(d_model=H, d_state=N, disc="bilinear", channels=2, gate=2,
                                                         swap_channels=True, transposed=False)),
    Case("S4", "lti.S4", dict(d_model=H, d_state=N, transposed=False)),
    Case("S4 B=1 split 8", "lti.S4", dict(d_model=H, d_state=N, transposed=False), batch=1,
         config=dispatch.KernelConfig(use_kernels="always", split_programs=8)),
    Case("S4 legt rank 2 bottleneck 2 c2 swap", "lti.S4", dict(d_model=H, d_state=N, rank=2, init="legt", bottleneck=2,
                                                                 channels=2, swap_channels=True, transposed=False)),
    # S7's x_proj holds 2 H^2 N weights: H=128, N=64 does not fit on chip (see FALLBACKS)
    Case("S7 H=32 N=32", "ltv.S7", dict(d_model=32, d_state=32)),
    Case("S7 J=2 H=16 N=64", "ltv.S7", dict(d_model=16, d_state=N, J=2)),
    Case("LRU B=1", "lti.LRU", dict(d_model=H, d_state=N), batch=1),
    Case("LRU H=100 N=50 B=37", "lti.LRU", dict(d_model=100, d_state=50), batch=37),
    Case("Mamba H=72 N=12 B=5", "ltv.Mamba", dict(d_model=72, d_state=12), batch=5),
    Case("LRU block 16, B=600", "lti.LRU", dict(d_model=H, d_state=N), batch=600),
    Case("S5 block 32, B=100", "lti.S5", dict(d_model=H, d_state=N, discretization="zoh"), batch=100,
         config=dispatch.KernelConfig(use_kernels="always", block_batch=32)),
    Case("ltv.S5 event/step block 16", "ltv.S5", dict(d_model=H, d_state=N), batch=64, event="step",
         config=dispatch.KernelConfig(use_kernels="always", block_batch=16)),
    Case("LRU block 16 precision=ieee", "lti.LRU", dict(d_model=H, d_state=N), batch=64,
         config=dispatch.KernelConfig(use_kernels="always", block_batch=16, precision="ieee")),
    Case("LRU block 16 precision=fast (info)", "lti.LRU", dict(d_model=H, d_state=N), batch=64,
         config=dispatch.KernelConfig(use_kernels="always", block_batch=16, precision="fast"), tol=float("inf")),
]

#: models and sizes that must take the documented fallback
FALLBACKS = [
    ("S4 H=2048 (too large, even split)", "lti.S4", dict(d_model=2048, d_state=64, transposed=False)),
    ("S4D H=512 (too large)", "lti.S4D", dict(d_model=512, d_state=64, transposed=False)),
    ("S7 H=128 N=64 (too large)", "ltv.S7", dict(d_model=128, d_state=64)),
    ("LRU H=512 N=256 (too large)", "lti.LRU", dict(d_model=512, d_state=256)),
    ("Mamba H=384 (too large)", "ltv.Mamba", dict(d_model=384, d_state=16)),
    ("Centaurus full H=32 (too large)", "lti.Centaurus", dict(d_model=32, d_state=32 * 32, sub_state_dim=2, mode="full")),
]

#: parameters that scale a model's closed-loop gain (its output path)
OUTPUT_PARAMS = ("C", "C_re", "C_im", "D")
#: layers on the output path; S7's x_proj gives its C_t and d_t (and a_t, B_t, beta_t)
OUTPUT_LAYERS = ("out_proj", "output_linear")
OUTPUT_LAYERS_OF = {"S7": ("x_proj",)}


def abstract_model(lrnnx_name: str, kwargs: dict):
    """The model with abstract parameters (``nnx.eval_shape``): enough to ask what is supported."""
    return nnx.eval_shape(lambda: model_class(lrnnx_name)(**kwargs, rngs=nnx.Rngs(0)))


def build(case: Case, seed: int = 0):
    """``(model, x0 (B, H) float32, taus or None)`` for ``case``."""
    model = model_class(case.model)(**case.kwargs, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed + 1)
    x0 = jnp.asarray(rng.standard_normal((case.batch, model.d_model)), jnp.float32)
    taus = None
    if case.event is not None:
        taus = rng.uniform(0.05, 1.5, (case.batch, 1 if case.event == "row" else case.steps)).astype(np.float32)
    return model, x0, taus


def scale_output(model, factor: float):
    """Multiply the output path (C and D, out_proj or output_linear; S7's x_proj) by ``factor``, in place."""
    targets = [getattr(model, n) for n in OUTPUT_PARAMS if isinstance(getattr(model, n, None), nnx.Param)]
    for layer in OUTPUT_LAYERS_OF.get(type(model).__name__, OUTPUT_LAYERS):
        if getattr(model, layer, None) is not None:
            targets.append(getattr(model, layer).kernel)
    for param in targets:
        param.set_value(param.get_value() * factor)


NEVER = dispatch.KernelConfig(use_kernels="never")


def reference(model, x0, steps, taus):
    """The unfused ``generate`` (the XLA program, ``use_kernels="never"``) at ``precision="highest"``, as float64 NumPy."""
    with jax.default_matmul_precision("highest"):
        return np.asarray(generation.generate(model, x0, steps, integration_timesteps=taus, kernel_config=NEVER), np.float64)


def bounded_model(model, x0, steps, taus, growth: float = 100.0, tries: int = 12):
    """Halve the output gain until the reference stays bounded: finite and ``max|y| <= growth * max|y_1|``.

    Returns ``(reference outputs, gain)``; the model is changed in place.
    """
    gain = 1.0
    for _ in range(tries):
        ref = reference(model, x0, steps, taus)
        if np.all(np.isfinite(ref)) and np.max(np.abs(ref)) <= growth * max(np.max(np.abs(ref[:, 0])), 1e-30):
            return ref, gain
        scale_output(model, 0.5)
        gain *= 0.5
    raise RuntimeError(f"{type(model).__name__}: no bounded closed loop after {tries} halvings of the output gain")


def _rel(ours, ref) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / max(np.max(np.abs(ref)), 1e-30))


def path_of(case: Case, model) -> str:
    cell = model.cell()
    parts = fg.run_parts(cell, case.batch, case.config)
    if parts is not None:
        block = fg.split_block(cell, case.batch, case.config)
        return f"split over {parts} programs per " + ("row" if block == 1 else f"block of {block} rows")
    block = fg.effective_block_batch(cell.blockable, case.batch, case.config)
    return "rows" if block == 1 else f"block {block} {case.config.precision}"


def compare(case: Case, seed: int = 0) -> dict:
    """Run one case; returns its table row as a dict."""
    model, x0, taus = build(case, seed)
    ref, gain = bounded_model(model, x0, case.steps, taus)
    start = time.perf_counter()
    ys = np.asarray(fg.fused_generate(model, x0, case.steps, taus, config=case.config), np.float64)
    seconds = time.perf_counter() - start
    late = max(1, case.steps // 8)
    err, err_late = _rel(ys, ref), _rel(ys[:, -late:], ref[:, -late:])
    growth = float(np.max(np.abs(ref)) / max(np.max(np.abs(ref[:, 0])), 1e-30))
    return dict(case=case.name, batch=case.batch, steps=case.steps, path=path_of(case, model), gain=gain,
                err=err, err_late=err_late, growth=growth, tol=case.tol,
                passed=bool(np.all(np.isfinite(ys)) and err <= case.tol), seconds=seconds)


def fallback_checks(batch: int = 32) -> list[dict]:
    """Each of :data:`FALLBACKS` must be refused with a reason, and the switch must take the XLA path."""
    rows = []
    always = dispatch.KernelConfig(use_kernels="always")
    for name, lrnnx_name, kwargs in FALLBACKS:
        model = abstract_model(lrnnx_name, kwargs)
        reason = fg.model_unsupported_reason(model, batch, False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            chosen = fg.use_fused_rollout(model, batch, False, config=always)
        rows.append(dict(case=name, reason=reason, passed=reason is not None and not chosen))
    return rows


def program_check(seed: int = 0, steps: int = 300, chunk: int = 128) -> dict:
    """``generate`` through :func:`fused_program` (several program calls, a partial last one) against the XLA program."""
    case = Case("ltv.S5 event", "ltv.S5", dict(d_model=H, d_state=N), batch=8, steps=steps, event="step")
    model, x0, taus = build(case, seed)
    ref, _ = bounded_model(model, x0, steps, taus)
    config = generation.GenerationConfig(chunk_size=chunk)
    graph = generation.capture_graph(model, case.batch, event_mode=True, config=config, kernel_config=case.config)
    assert graph.spec.fused
    ys = np.asarray(generation.generate(model, x0, steps, graph_cache=graph, integration_timesteps=taus), np.float64)
    err = _rel(ys, ref)
    return dict(case=f"fused_program, {steps} steps in chunks of {chunk}", err=err, passed=err <= 1e-5)


def run(cases, seed: int = 0, out=sys.stdout, with_fallbacks: bool = True, with_program: bool = True) -> tuple[bool, dict]:
    """Run the checks and print the tables; returns ``(all passed, results)``.

    The reference ``generate`` runs the XLA program (``use_kernels="never"``); the fused
    kernel is called explicitly with each case's configuration.
    """
    device = jax.devices()[0]
    interpret = dispatch.interpret_mode(dispatch.KernelConfig())
    print(f"device: {getattr(device, 'device_kind', device)} ({jax.default_backend()}), interpret={interpret}, "
          f"jax {jax.__version__}", file=out)
    print("| case | B | steps | path | output gain | err | err last 1/8 | growth | tol | result | s |", file=out)
    print("|---|---|---|---|---|---|---|---|---|---|---|", file=out)
    results: dict = {"device": str(getattr(device, "device_kind", device)), "interpret": interpret, "cases": []}
    ok = True
    for case in cases:
        try:
            row = compare(case, seed)
        except Exception as error:  # noqa: BLE001 - report and go on with the next case
            row = dict(case=case.name, batch=case.batch, steps=case.steps, passed=False,
                       error=f"{type(error).__name__}: {error}"[:600])
            print(f"| {case.name} | {case.batch} | {case.steps} | ERROR {row['error']} |", file=out, flush=True)
        else:
            print(f"| {row['case']} | {row['batch']} | {row['steps']} | {row['path']} | {row['gain']:g} | {row['err']:.2e} | "
                  f"{row['err_late']:.2e} | {row['growth']:.3g} | {row['tol']:.0e} | {'PASS' if row['passed'] else 'FAIL'} | "
                  f"{row['seconds']:.1f} |", file=out, flush=True)
        ok &= row["passed"]
        results["cases"].append(row)
    if with_fallbacks:
        print("\n| fallback case | reason | result |\n|---|---|---|", file=out)
        for row in fallback_checks():
            print(f"| {row['case']} | {row['reason']} | {'PASS' if row['passed'] else 'FAIL'} |", file=out)
            ok &= row["passed"]
            results.setdefault("fallbacks", []).append(row)
    if with_program:
        row = program_check(seed)
        print(f"\n{row['case']}: err {row['err']:.2e} {'PASS' if row['passed'] else 'FAIL'}", file=out)
        ok &= row["passed"]
        results["program"] = row
    return ok, results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one case per model family, no block-path cases")
    parser.add_argument("--steps", type=int, default=None, help="steps of every case (default: each case's, 512)")
    parser.add_argument("--only", default=None, help="only the cases whose name contains this text")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")
    args = parser.parse_args(argv)
    cases = CASES
    if args.quick:
        cases = [c for c in CASES if c.name in ("LRU", "S5 bilinear conj_sym event/step", "Mamba", "RG-LRU", "S4D", "S4",
                                                "S7 H=32 N=32")]
    if args.only:
        cases = [c for c in cases if args.only in c.name]
    if args.steps:
        cases = [dataclasses.replace(c, steps=args.steps) for c in cases]
    ok, results = run(cases, args.seed)
    print("ALL PASS" if ok else "SOME CHECKS FAILED")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
