"""pallas_kernels.simplified_state_update: reference against complex128 NumPy, kernel (interpret mode)
against the reference, bad inputs, and the in-place update."""

from __future__ import annotations

import dataclasses

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import complex_lib as cl
from pallas_kernels import dispatch
from pallas_kernels import gpu_selftest as cases
from pallas_kernels.simplified import DISCRETIZATIONS, simplified_state_update

KERNEL = dispatch.KernelConfig(use_kernels="always")
REFERENCE = dispatch.KernelConfig(use_kernels="never")


def _c128(a):
    return np.asarray(cl.merge(a) if cl.is_planes(a) else a, np.complex128)


def numpy_step(kw):
    """Independent complex128 NumPy version of the step."""
    state = _c128(kw["state"]).copy()
    x = np.asarray(kw["x"], np.float64)
    A, B, C = _c128(kw["A"]), _c128(kw["B"]), _c128(kw["C"])
    delta = None if kw["delta"] is None else np.asarray(kw["delta"], np.float64)
    tau = kw.get("integration_timesteps")
    sbi = kw.get("state_batch_indices")
    kappa = 2.0 if kw["conj_sym"] else 1.0
    out = np.zeros((x.shape[0], C.shape[0]))
    for b in range(x.shape[0]):
        slot = b if sbi is None else int(sbi[b])
        if slot == -1:
            continue
        name = kw["discretization"]
        if name == "no_discretization":
            A_bar, gamma = (A[b] if A.ndim == 2 else A), 1.0
        else:
            step_A = delta * (1.0 if tau is None else float(tau[b]))
            if name == "bilinear":
                A_bar, gamma = (1 + step_A * A / 2) / (1 - step_A * A / 2), delta / (1 - delta * A / 2)
            else:
                A_bar = np.exp(step_A * A)
                gamma = {"zoh": np.expm1(delta * A) / A, "async": np.expm1(delta * A) / A,
                         "dirac": 1.0, "mamba": delta}[name]
        state[slot] = A_bar * state[slot] + gamma * (B @ x[b])
        out[b] = kappa * np.real(C @ state[slot])
        if kw["D"] is not None:
            out[b] += np.asarray(kw["D"], np.float64) * x[b]
    return out, state


REFERENCE_CASES = {
    "zoh": dict(batch=3, P=7, H_in=5),
    "bilinear-conj-slots": dict(batch=4, extra_slots=3, P=6, H_in=4, discretization="bilinear", conj_sym=True),
    "dirac-event-realB": dict(batch=3, P=5, H_in=6, discretization="dirac", event=True, real_B=True),
    "mamba-realC-planes": dict(batch=2, P=8, H_in=3, H_out=5, skip=False, discretization="mamba", real_C=True, planes=True),
    "async-event": dict(batch=3, P=4, H_in=4, discretization="async", event=True),
    "none-row-wise": dict(batch=3, P=6, H_in=5, discretization="no_discretization", row_wise_A=True),
}


@pytest.mark.parametrize("name", list(REFERENCE_CASES))
def test_reference_matches_numpy_complex128(name):
    kw = cases.simplified_case(np.random.default_rng(0), **REFERENCE_CASES[name])
    out, state = simplified_state_update(**kw, config=REFERENCE)
    chex.assert_shape(out, (kw["x"].shape[0], kw["C"].shape[0]))
    chex.assert_type(out, jnp.float32)
    assert cl.is_planes(state) == cl.is_planes(kw["state"])
    expected_out, expected_state = numpy_step(kw)
    assert cases.relative_error(out, expected_out) < 1e-5
    assert cases.relative_error(_c128(state), expected_state) < 1e-5


# Each interpret-mode case costs ~2 s, so each combines several features; the discretizations
# differ in the kernel only through kernel_math.discretize (tested for every name there).
KERNEL_CASES = {
    "zoh-batch1-conj": dict(batch=1, P=5, H_in=6, conj_sym=True),
    "bilinear-event-slots-chunks": dict(batch=37, extra_slots=4, P=70, H_in=20, discretization="bilinear",
                                        event=True),
    "none-row-wise-realBC-bf16-planes": dict(batch=5, P=24, H_in=9, H_out=70, skip=False,
                                             discretization="no_discretization", row_wise_A=True, real_B=True,
                                             real_C=True, dtype=jnp.bfloat16, planes=True, state_dtype=jnp.bfloat16),
}


@pytest.mark.parametrize("name,block_batch", [(name, 1) for name in KERNEL_CASES] + [
    ("bilinear-event-slots-chunks", 16), ("bilinear-event-slots-chunks", 4)])
def test_kernel_matches_reference(name, block_batch):
    """Every case on the one-row path (the default at these batches); one on blocks of 16 rows (dots) and of 4
    (multiply-adds)."""
    kw = cases.simplified_case(np.random.default_rng(1), **KERNEL_CASES[name])
    out, state = simplified_state_update(**kw, config=dataclasses.replace(KERNEL, block_batch=block_batch))
    chex.assert_type(out, kw["x"].dtype)
    assert type(state) is type(kw["state"])
    ref_out, ref_state = simplified_state_update(**kw, config=REFERENCE)
    tol = cases.tolerance(kw)
    assert cases.relative_error(out, ref_out) <= tol
    assert cases.relative_error(_c128(state), _c128(ref_state)) <= tol
    if "state_batch_indices" in kw:  # padded rows: zero output, their slots untouched
        sbi = np.asarray(kw["state_batch_indices"])
        assert not np.any(np.asarray(out)[sbi == -1])
        untouched = np.setdiff1d(np.arange(kw["state"].shape[0]), sbi)
        np.testing.assert_array_equal(_c128(state)[untouched], _c128(kw["state"])[untouched])


def test_in_place_update_is_aliased():
    kw = cases.simplified_case(np.random.default_rng(2), batch=3, P=8, H_in=4, planes=True)
    report = cases.in_place_report("simplified", kw, KERNEL)
    assert report["alias_bytes"] == report["state_bytes"] == 2 * 3 * 8 * 4
    assert report["same_buffer"] is True


def _good(**changes):
    kw = cases.simplified_case(np.random.default_rng(3), batch=2, P=4, H_in=3)
    kw.update(changes)
    return kw


@pytest.mark.parametrize("changes,error,message", [
    (dict(discretization="euler"), ValueError, "discretization must be one of"),
    (dict(state=jnp.zeros((2, 4))), TypeError, "state must be complex or Planes"),
    (dict(state=cl.Planes(jnp.zeros((2, 4)), jnp.zeros((2, 5)))), ValueError, "state planes must match"),
    (dict(x=jnp.zeros((2, 3), jnp.int32)), TypeError, "x must have a real floating dtype, got int32"),
    (dict(A=jnp.zeros((2, 4), jnp.complex64)), ValueError, r"A must have shape \(4,\), got \(2, 4\)"),
    (dict(B=jnp.zeros((4, 2), jnp.complex64)), ValueError, r"B must have shape \(P, H_in\) = \(4, 3\), got \(4, 2\)"),
    (dict(C=jnp.zeros((3, 5), jnp.complex64)), ValueError, r"C must have shape \(H_out, P=4\), got \(3, 5\)"),
    (dict(delta=None), ValueError, r"delta must have shape \(P,\) = \(4,\) for discretization='zoh'"),
    (dict(discretization="no_discretization"), ValueError, "pass delta=None"),
    (dict(discretization="async"), ValueError, "'async' needs integration_timesteps"),
    (dict(integration_timesteps=jnp.ones((3,))), ValueError, r"integration_timesteps must have shape \(batch,\) = \(2,\)"),
    (dict(D=jnp.ones((4,))), ValueError, r"D must have shape \(H,\) with H = H_in = H_out"),
    (dict(state=jnp.zeros((3, 4), jnp.complex64)), ValueError, "state has 3 rows but x has batch 2"),
])
def test_bad_inputs_raise(changes, error, message):
    with pytest.raises(error, match=message):
        simplified_state_update(**_good(**changes))


def test_every_discretization_has_a_reference_case():
    assert {c.get("discretization", "zoh") for c in REFERENCE_CASES.values()} == set(DISCRETIZATIONS)


@pytest.mark.parametrize("precision,algorithm", [("highest", "TF32_TF32_F32_X3"), ("ieee", "F32_F32_F32"),
                                                 ("fast", "TF32_TF32_F32")])
def test_block_dots_follow_the_configured_precision(precision, algorithm):
    """Blocks of 16 rows use ``dispatch.dot_precision(config)`` (traced for the GPU here, not run); one row
    per program and blocks of fewer rows have no dots; interpret mode runs its dots at HIGHEST."""
    kw = cases.simplified_case(np.random.default_rng(4), batch=3, P=8, H_in=4)

    def precisions(**changes):
        config = dispatch.KernelConfig(use_kernels="always", **changes)
        text = str(jax.make_jaxpr(lambda: simplified_state_update(**kw, config=config))())
        assert "pallas_call" in text and "num_warps=4" in text
        return set(re.findall(r"precision=\(?([\w.]+)", text))

    assert precisions(interpret=False, block_batch=16, precision=precision) == {algorithm}
    assert precisions(interpret=False, block_batch=1, precision=precision) == set()
    assert precisions(interpret=False, block_batch=8, precision=precision) == set()  # multiply-adds
    assert precisions(interpret=True, block_batch=16, precision=precision) == {"Precision.HIGHEST"}


def test_float64_reference_matches_numpy_closely():
    """With float64 inputs the reference computes in complex128 (the kernel takes only 32-bit arrays)."""
    with jax.enable_x64(True):
        kw = cases.simplified_case(np.random.default_rng(5), batch=3, P=5, H_in=4, discretization="bilinear",
                                   event=True, conj_sym=True)
        wide = {"state": jnp.complex128, "A": jnp.complex128, "B": jnp.complex128, "C": jnp.complex128,
                "x": jnp.float64, "delta": jnp.float64, "D": jnp.float64, "integration_timesteps": jnp.float64}
        kw = {k: (v.astype(wide[k]) if k in wide else v) for k, v in kw.items()}
        out, state = simplified_state_update(**kw, config=REFERENCE)
        chex.assert_type(out, jnp.float64)
        chex.assert_type(state, jnp.complex128)
        expected_out, expected_state = numpy_step(kw)
        assert cases.relative_error(out, expected_out) < 1e-12
        assert cases.relative_error(state, expected_state) < 1e-12
