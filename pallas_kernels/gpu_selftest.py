"""Kernel-versus-reference comparisons, for the real GPU (``python -m pallas_kernels.gpu_selftest``).

Runs every case of :data:`CASES` through each op twice, with the kernel forced
(``use_kernels="always"``) and with the pure-JAX reference (``"never"``), and
prints one table row per case: the relative errors ``max|kernel - ref| / max|ref|``
of the output and of the new state, and the tolerance. Then it checks that the
kernels update a donated state in place. Off-GPU the kernels run in interpret
mode (slow: use ``--quick``). Exits non-zero when a check fails.

Needs only jax and numpy (no network). The case builders are shared with the
CPU tests (tests/test_pallas_gpu_selftest.py), which run small cases.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import complex_lib as cl
from pallas_kernels import dispatch
from pallas_kernels.selective import selective_state_update
from pallas_kernels.simplified import simplified_state_update

KERNEL = dispatch.KernelConfig(use_kernels="always")
REFERENCE = dispatch.KernelConfig(use_kernels="never")
OPS = {"selective": selective_state_update, "simplified": simplified_state_update}


def _normal(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(np.float32).astype(dtype)


def _uniform(rng, lo, hi, shape, dtype=np.float32):
    return rng.uniform(lo, hi, shape).astype(np.float32).astype(dtype)


def _slot_map(rng, batch, slots):
    """Distinct slots for the rows, with about a quarter of the rows padded (-1)."""
    index = rng.permutation(slots)[:batch]
    index[rng.uniform(size=batch) < 0.25] = -1
    return index.astype(np.int32)


def _to_device(kwargs):
    """NumPy arrays (drawn without compiling anything) -> JAX arrays."""
    return {k: jax.tree.map(jnp.asarray, v) if isinstance(v, (np.ndarray, cl.Planes)) else v for k, v in kwargs.items()}


def selective_case(rng, *, batch=4, nheads=None, ngroups=1, dim=64, dstate=16, extra_slots=0,
                   discretization="mamba", event=False, dtype=jnp.float32, state_dtype=jnp.float32,
                   skip=True, gate=True, softplus=True):
    """Random arguments of :func:`selective_state_update` at realistic steps (delta in ~[1e-3, 0.5]).

    ``nheads=None`` gives the head-less layout; ``extra_slots > 0`` adds
    ``state_batch_indices`` over ``batch + extra_slots`` slots with padded rows.
    """
    lead = () if nheads is None else (nheads,)
    groups = () if nheads is None else (ngroups,)
    slots = batch + extra_slots
    A = -np.broadcast_to(np.arange(1, dstate + 1, dtype=np.float32), (*lead, dim, dstate)).copy()  # Mamba's -(1..N)
    if softplus:  # dt_bias = softplus^-1 of steps in [1e-3, 0.3]; dt a small perturbation
        step = _uniform(rng, 1e-3, 0.3, (*lead, dim))
        dt_bias = (step + np.log(-np.expm1(-step))).astype(np.float32)
        dt = (0.5 * _normal(rng, (batch, *lead, dim))).astype(dtype)
    else:  # steps used as is, in [1e-3, 0.5]
        dt_bias = None
        dt = np.exp(_uniform(rng, np.log(1e-3), np.log(0.5), (batch, *lead, dim))).astype(dtype)
    kwargs = dict(
        state=_normal(rng, (slots, *lead, dim, dstate), state_dtype),
        x=_normal(rng, (batch, *lead, dim), dtype),
        dt=dt,
        A=A,
        B=_normal(rng, (batch, *groups, dstate), dtype),
        C=_normal(rng, (batch, *groups, dstate), dtype),
        D=_normal(rng, (*lead, dim)) if skip else None,
        z=_normal(rng, (batch, *lead, dim), dtype) if gate else None,
        dt_bias=dt_bias,
        dt_softplus=softplus,
        discretization=discretization,
    )
    if event:
        kwargs["delta_A"] = _uniform(rng, 0.01, 1.0, (batch, *lead, dim), dtype)
    if extra_slots:
        kwargs["state_batch_indices"] = _slot_map(rng, batch, slots)
    return _to_device(kwargs)


def simplified_case(rng, *, batch=4, P=16, H_in=32, H_out=None, extra_slots=0, discretization="zoh", event=False,
                    dtype=jnp.float32, planes=False, state_dtype=jnp.float32, skip=True, conj_sym=False,
                    real_B=False, real_C=False, row_wise_A=False):
    """Random arguments of :func:`simplified_state_update` (S5-like: Re A = -0.5, Im A = pi n / 4)."""
    H_out = H_in if H_out is None else H_out
    slots = batch + extra_slots
    Lambda = (-0.5 + 1j * np.pi * np.arange(P) / 4).astype(np.complex64)
    if discretization == "no_discretization":
        A = np.exp(Lambda * _uniform(rng, 1e-3, 0.1, (batch, P) if row_wise_A else (P,))).astype(np.complex64)
        delta = None
    else:
        A, delta = Lambda, np.exp(_uniform(rng, np.log(1e-3), np.log(0.1), (P,)))

    def matrix(shape, real):
        m = _normal(rng, shape) / np.sqrt(shape[-1])
        return m if real else (m + 1j * _normal(rng, shape) / np.sqrt(shape[-1])).astype(np.complex64)

    state = matrix((slots, P), False) * 4
    kwargs = dict(
        state=cl.Planes(state.real.astype(state_dtype), state.imag.astype(state_dtype)) if planes else state,
        x=_normal(rng, (batch, H_in), dtype),
        A=A,
        B=matrix((P, H_in), real_B),
        C=matrix((H_out, P), real_C),
        delta=delta,
        D=_normal(rng, (H_in,)) if skip else None,
        discretization=discretization,
        conj_sym=conj_sym,
    )
    if event:
        kwargs["integration_timesteps"] = _uniform(rng, 0.05, 1.5, (batch,), dtype)
    if extra_slots:
        kwargs["state_batch_indices"] = _slot_map(rng, batch, slots)
    return _to_device(kwargs)


def _flat_state(state):
    return np.concatenate([np.asarray(p, np.float64) for p in state]) if cl.is_planes(state) else np.asarray(state)


def relative_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.complex128), np.asarray(ref, np.complex128)
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


def tolerance(kwargs) -> float:
    """1e-5 when everything is float32; 1e-2 when an input or the state is 16-bit."""
    state = kwargs["state"]
    dtypes = [kwargs["x"].dtype, state.re.dtype if cl.is_planes(state) else jnp.real(state).dtype]
    return 1e-5 if all(d == jnp.float32 for d in dtypes) else 1e-2


def compare(op: str, kwargs, kernel_config=KERNEL):
    """``(err_out, err_state)`` of the kernel against the reference on the same arguments."""
    out_k, state_k = OPS[op](**kwargs, config=kernel_config)
    out_r, state_r = OPS[op](**kwargs, config=REFERENCE)
    return relative_error(out_k, out_r), relative_error(_flat_state(state_k), _flat_state(state_r))


def in_place_report(op: str, kwargs, kernel_config=KERNEL):
    """Compile the op with the state donated; report the aliasing and whether the buffer was reused.

    Returns a dict: ``alias_bytes`` (from the compiled memory analysis), ``state_bytes``,
    ``temp_bytes`` and ``same_buffer`` (the new state lives in the donated buffer; None
    where the backend cannot say).
    """
    state = kwargs["state"]
    rest = {k: v for k, v in kwargs.items() if k != "state"}
    static = {k: v for k, v in rest.items() if isinstance(v, (str, bool)) or v is None}
    dynamic = {k: v for k, v in rest.items() if k not in static}
    fn = jax.jit(lambda s, d: OPS[op](s, **d, **static, config=kernel_config), donate_argnums=0)
    compiled = fn.lower(state, dynamic).compile()
    analysis = compiled.memory_analysis()
    leaves = jax.tree.leaves(state)
    pointers = [_pointer(a) for a in leaves]
    _, new_state = compiled(state, dynamic)
    new_pointers = [_pointer(a) for a in jax.tree.leaves(new_state)]
    same = None if None in pointers + new_pointers else pointers == new_pointers
    return dict(
        alias_bytes=getattr(analysis, "alias_size_in_bytes", None),
        state_bytes=sum(a.size * a.dtype.itemsize for a in leaves),
        temp_bytes=getattr(analysis, "temp_size_in_bytes", None),
        same_buffer=same,
    )


def _pointer(a):
    try:
        return a.unsafe_buffer_pointer()
    except Exception:  # noqa: BLE001 - backends without raw pointers
        return None


F32, BF16 = jnp.float32, jnp.bfloat16

#: (name, op, builder keyword arguments): realistic sizes for the GPU run
CASES = [
    ("mamba d=2048 N=16 b=32", "selective", dict(batch=32, dim=2048, dstate=16)),
    ("mamba batch 1, d=2064", "selective", dict(batch=1, dim=2064, dstate=16)),
    ("zoh N=64 d=768", "selective", dict(batch=8, dim=768, dstate=64, discretization="zoh")),
    ("bilinear N=32", "selective", dict(batch=8, dim=1000, dstate=32, discretization="bilinear")),
    ("dirac N=16", "selective", dict(batch=8, dim=520, dstate=16, discretization="dirac")),
    ("mamba event (delta_A)", "selective", dict(batch=8, dim=512, dstate=16, event=True)),
    ("zoh event", "selective", dict(batch=8, dim=512, dstate=16, event=True, discretization="zoh")),
    ("heads 8, groups 2, N=128", "selective", dict(batch=4, nheads=8, ngroups=2, dim=64, dstate=128)),
    ("heads 3, groups 3, N=7", "selective", dict(batch=5, nheads=3, ngroups=3, dim=50, dstate=7)),
    ("slots + padding", "selective", dict(batch=16, extra_slots=9, dim=2048, dstate=16)),
    ("slots + heads + event", "selective", dict(batch=6, extra_slots=5, nheads=4, ngroups=2, dim=64, dstate=32, event=True)),
    ("bf16 inputs", "selective", dict(batch=8, dim=1024, dstate=16, dtype=BF16)),
    ("bf16 state", "selective", dict(batch=8, dim=1024, dstate=16, state_dtype=BF16)),
    ("no D, no z, no bias", "selective", dict(batch=8, dim=300, dstate=16, skip=False, gate=False, softplus=False)),
    ("dstate 1, zoh, no D/z/bias", "selective", dict(batch=8, dim=1536, dstate=1, discretization="zoh", skip=False, gate=False, softplus=False)),
    ("zoh P=64 H=128 b=32", "simplified", dict(batch=32, P=64, H_in=128)),
    ("zoh batch 1, P=5 H=6", "simplified", dict(batch=1, P=5, H_in=6)),
    ("bilinear conj_sym", "simplified", dict(batch=8, P=48, H_in=40, discretization="bilinear", conj_sym=True)),
    ("dirac real B", "simplified", dict(batch=8, P=32, H_in=64, discretization="dirac", real_B=True)),
    ("mamba real C (Centaurus)", "simplified", dict(batch=8, P=96, H_in=24, H_out=40, skip=False, discretization="mamba", real_C=True)),
    ("zoh event (S5)", "simplified", dict(batch=8, P=64, H_in=128, event=True)),
    ("async event", "simplified", dict(batch=8, P=32, H_in=32, event=True, discretization="async")),
    ("LRU no_discretization", "simplified", dict(batch=8, P=64, H_in=128, discretization="no_discretization")),
    ("per-row A_bar", "simplified", dict(batch=8, P=32, H_in=32, discretization="no_discretization", row_wise_A=True)),
    ("P=128 H=256 (chunks)", "simplified", dict(batch=40, P=128, H_in=256)),
    ("slots + padding", "simplified", dict(batch=37, extra_slots=11, P=64, H_in=128, event=True)),
    ("planes f32 state", "simplified", dict(batch=16, P=64, H_in=128, planes=True)),
    ("planes bf16 state", "simplified", dict(batch=16, P=64, H_in=128, planes=True, state_dtype=BF16)),
    ("bf16 x", "simplified", dict(batch=16, P=64, H_in=128, dtype=BF16)),
    ("blocks of 16 rows (b=300)", "simplified", dict(batch=300, P=64, H_in=128)),
    ("blocks of 32, event, slots", "simplified", dict(batch=2100, extra_slots=7, P=64, H_in=128, event=True)),
]

BUILDERS = {"selective": selective_case, "simplified": simplified_case}


#: (op, builder arguments) of the in-place checks
IN_PLACE_CASES = [("selective", dict(batch=64, dim=2048, dstate=16)), ("simplified", dict(batch=64, P=64, H_in=128, planes=True))]


def run(cases, kernel_config=KERNEL, seed=0, out=sys.stdout, in_place_cases=IN_PLACE_CASES) -> bool:
    """Compare every case, check the in-place updates, and print a table; True when all pass."""
    rng = np.random.default_rng(seed)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"interpret={dispatch.interpret_mode(kernel_config)}", file=out)
    print(f"{'op':<11} {'case':<32} {'err out':>9} {'err state':>9} {'tol':>7}  result   time", file=out)
    ok = True
    for name, op, spec in cases:
        kwargs = BUILDERS[op](rng, **spec)
        start = time.perf_counter()
        try:
            err_out, err_state = compare(op, kwargs, kernel_config)
        except Exception as error:  # noqa: BLE001 - report and continue with the next case
            print(f"{op:<11} {name:<32} {'-':>9} {'-':>9} {'-':>7}  ERROR    {type(error).__name__}: {error}"[:400], file=out)
            ok = False
            continue
        tol = tolerance(kwargs)
        passed = bool(err_out <= tol and err_state <= tol)
        ok &= passed
        print(f"{op:<11} {name:<32} {err_out:9.2e} {err_state:9.2e} {tol:7.0e}  {'PASS' if passed else 'FAIL':<7} "
              f"{time.perf_counter() - start:5.1f}s", file=out)
    for op, spec in in_place_cases:
        report = in_place_report(op, BUILDERS[op](rng, **spec), kernel_config)
        aliased = report["alias_bytes"] is not None and report["alias_bytes"] >= report["state_bytes"]
        passed = aliased and report["same_buffer"] is not False
        ok &= passed
        print(f"in place {op:<11} state {report['state_bytes']} B, aliased {report['alias_bytes']} B, "
              f"temp {report['temp_bytes']} B, same buffer {report['same_buffer']}: {'PASS' if passed else 'FAIL'}", file=out)
    return ok


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the first case of each op")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cases = CASES
    if args.quick:
        cases = [next(c for c in CASES if c[1] == op) for op in OPS]
    ok = run(cases, seed=args.seed)
    print("ALL PASS" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
