"""pallas_kernels.selective_state_update: reference against float64 NumPy, kernel (interpret mode)
against the reference, bad inputs, and the in-place update."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch
from pallas_kernels import gpu_selftest as cases
from pallas_kernels.selective import DISCRETIZATIONS, selective_state_update

KERNEL = dispatch.KernelConfig(use_kernels="always", block_elems=64)  # several channel blocks per row


def numpy_step(kw):
    """Independent float64 NumPy version of the selective step (head-form or head-less arrays)."""
    f = {k: (np.asarray(v, np.float64) if hasattr(v, "dtype") and k != "state_batch_indices" else v) for k, v in kw.items()}
    heads = f["state"].ndim == 4
    if not heads:  # add the head and group axes
        for k in ("state", "x", "dt", "z", "delta_A", "B", "C"):
            if f.get(k) is not None:
                f[k] = f[k][:, None]
        for k in ("A", "D", "dt_bias"):
            if f.get(k) is not None:
                f[k] = f[k][None]
    state = f["state"].copy()
    batch, nheads = f["x"].shape[:2]
    rep = nheads // f["B"].shape[1]
    sbi = kw.get("state_batch_indices")
    out = np.zeros(f["x"].shape)
    for b in range(batch):
        slot = b if sbi is None else int(sbi[b])
        if slot == -1:
            continue
        for h in range(nheads):
            A, x = f["A"][h], f["x"][b, h][:, None]
            delta = f["dt"][b, h] + (0 if f["dt_bias"] is None else f["dt_bias"][h])
            if f["dt_softplus"]:
                delta = np.log1p(np.exp(delta))
            delta = delta[:, None]
            step_A = delta if f.get("delta_A") is None else f["delta_A"][b, h][:, None]
            name = f["discretization"]
            if name == "bilinear":
                A_bar, gamma = (1 + step_A * A / 2) / (1 - step_A * A / 2), delta / (1 - delta * A / 2)
            else:
                A_bar = np.exp(step_A * A)
                gamma = {"mamba": delta, "zoh": np.expm1(delta * A) / A, "dirac": 1.0}[name]
            new = A_bar * state[slot, h] + gamma * f["B"][b, h // rep] * x
            state[slot, h] = new
            y = new @ f["C"][b, h // rep]
            if f["D"] is not None:
                y = y + f["D"][h] * x[:, 0]
            if f["z"] is not None:
                y = y * f["z"][b, h] / (1 + np.exp(-f["z"][b, h]))
            out[b, h] = y
    if not heads:
        out, state = out[:, 0], state[:, 0]
    return out, state


REFERENCE_CASES = {
    "mamba": dict(batch=3, dim=11, dstate=5),
    "zoh-heads-event": dict(batch=3, nheads=4, ngroups=2, dim=6, dstate=7, discretization="zoh", event=True),
    "bilinear-slots": dict(batch=4, extra_slots=3, dim=9, dstate=4, discretization="bilinear"),
    "dirac-bare": dict(batch=2, dim=5, dstate=3, discretization="dirac", skip=False, gate=False, softplus=False),
    "mamba-dstate1-slots-heads": dict(batch=3, extra_slots=2, nheads=2, ngroups=2, dim=8, dstate=1, event=True),
}


@pytest.mark.parametrize("name", list(REFERENCE_CASES))
def test_reference_matches_numpy_float64(name):
    kw = cases.selective_case(np.random.default_rng(0), **REFERENCE_CASES[name])
    out, state = selective_state_update(**kw, config=dispatch.KernelConfig(use_kernels="never"))
    chex.assert_shape(out, kw["x"].shape)
    chex.assert_type(out, jnp.float32)
    chex.assert_shape(state, kw["state"].shape)
    expected_out, expected_state = numpy_step(kw)
    assert cases.relative_error(out, expected_out) < 1e-5
    assert cases.relative_error(state, expected_state) < 1e-5


# Interpret mode costs ~2 s of tracing and compiling per case, so each case combines several
# features. The kernel body differs between discretizations only in kernel_math.discretize,
# which tests/test_pallas_kernel_math.py checks for every name; the GPU self-test runs all.
KERNEL_CASES = {
    "mamba-batch1-odd-dim": dict(batch=1, dim=37, dstate=5),
    "zoh-heads-event-slots": dict(batch=3, extra_slots=2, nheads=3, ngroups=1, dim=10, dstate=16,
                                  discretization="zoh", event=True),
    "bilinear-groups-bf16": dict(batch=2, nheads=4, ngroups=2, dim=24, dstate=7, discretization="bilinear",
                                 dtype=jnp.bfloat16, state_dtype=jnp.bfloat16),
}


@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_kernel_matches_reference(name):
    kw = cases.selective_case(np.random.default_rng(1), **KERNEL_CASES[name])
    out, state = selective_state_update(**kw, config=KERNEL)
    chex.assert_type(out, kw["x"].dtype)
    chex.assert_type(state, kw["state"].dtype)
    ref_out, ref_state = selective_state_update(**kw, config=dispatch.KernelConfig(use_kernels="never"))
    tol = cases.tolerance(kw)
    assert cases.relative_error(out, ref_out) <= tol
    assert cases.relative_error(state, ref_state) <= tol
    if "state_batch_indices" in kw:  # padded rows: zero output, their slots untouched
        sbi = np.asarray(kw["state_batch_indices"])
        assert not np.any(np.asarray(out, np.float32)[sbi == -1])
        untouched = np.setdiff1d(np.arange(kw["state"].shape[0]), sbi)
        np.testing.assert_array_equal(np.asarray(state)[untouched], np.asarray(kw["state"])[untouched])


def test_in_place_update_is_aliased():
    kw = cases.selective_case(np.random.default_rng(2), batch=3, dim=16, dstate=4)
    report = cases.in_place_report("selective", kw, KERNEL)
    assert report["alias_bytes"] == report["state_bytes"] == 3 * 16 * 4 * 4
    assert report["same_buffer"] is True


def _good(**changes):
    kw = cases.selective_case(np.random.default_rng(3), batch=2, nheads=2, ngroups=1, dim=4, dstate=3)
    kw.update(changes)
    return kw


@pytest.mark.parametrize("changes,error,message", [
    (dict(discretization="euler"), ValueError, "discretization must be one of"),
    (dict(state=jnp.zeros((2, 4, 3))), ValueError, r"x must have shape \(batch, dim\) = \(2, 4\), got \(2, 2, 4\)"),
    (dict(dt=jnp.zeros((2, 2, 5))), ValueError, r"dt must have shape \(batch, nheads, dim\) = \(2, 2, 4\)"),
    (dict(A=jnp.zeros((2, 4, 4))), ValueError, r"A must have shape \(nheads, dim, dstate\) = \(2, 4, 3\)"),
    (dict(B=jnp.zeros((2, 3, 3)), C=jnp.zeros((2, 3, 3))), ValueError, "nheads=2 must be a multiple of ngroups=3"),
    (dict(D=jnp.zeros((4,))), ValueError, r"D must have shape \(nheads, dim\) = \(2, 4\)"),
    (dict(x=jnp.zeros((2, 2, 4), jnp.int32)), TypeError, "x must have a real floating dtype, got int32"),
    (dict(state=jnp.zeros((3, 2, 4, 3))), ValueError, "state has 3 rows but x has batch 2"),
    (dict(state_batch_indices=jnp.zeros((3,), jnp.int32)), ValueError, r"state_batch_indices must be integers of shape \(batch,\)"),
    # RG-LRU and S7 run their own cells; their modes of this op were removed
    (dict(discretization="rglru"), ValueError, "discretization must be one of"),
    (dict(discretization="s7"), ValueError, "discretization must be one of"),
])
def test_bad_inputs_raise(changes, error, message):
    with pytest.raises(error, match=message):
        selective_state_update(**_good(**changes))


def test_every_discretization_has_a_reference_case():
    assert set(DISCRETIZATIONS) == {"mamba", "zoh", "bilinear", "dirac"}
    assert {c.get("discretization", "mamba") for c in REFERENCE_CASES.values()} == set(DISCRETIZATIONS)


def test_float64_reference_matches_numpy_closely():
    """With float64 arrays the reference computes in float64 (the kernel takes only 16/32-bit arrays)."""
    with jax.enable_x64(True):
        kw = cases.selective_case(np.random.default_rng(4), batch=2, nheads=2, ngroups=1, dim=6, dstate=3,
                                  discretization="zoh", event=True)
        kw = {k: (v.astype(jnp.float64) if hasattr(v, "dtype") and jnp.issubdtype(v.dtype, jnp.floating) else v)
              for k, v in kw.items()}
        out, state = selective_state_update(**kw, config=dispatch.KernelConfig(use_kernels="never"))
        chex.assert_type([out, state], jnp.float64)
        expected_out, expected_state = numpy_step(kw)
        assert cases.relative_error(out, expected_out) < 1e-12
        assert cases.relative_error(state, expected_state) < 1e-12


def test_num_warps_and_block_elems_reach_the_kernel():
    kw = cases.selective_case(np.random.default_rng(5), batch=2, dim=16, dstate=4)
    text = str(jax.make_jaxpr(lambda: selective_state_update(**kw, config=KERNEL))())
    assert "num_warps=4" in text  # the default (num_warps=None)
    config = dispatch.KernelConfig(use_kernels="always", num_warps=8, block_elems=32)
    text = str(jax.make_jaxpr(lambda: selective_state_update(**kw, config=config))())
    assert "num_warps=8" in text
    out, state = selective_state_update(**kw, config=config)
    ref_out, ref_state = selective_state_update(**kw, config=dispatch.KernelConfig(use_kernels="never"))
    assert cases.relative_error(out, ref_out) < 1e-5 and cases.relative_error(state, ref_state) < 1e-5
