"""LTV (event-driven) S5: a float64 NumPy reference of the math, the S5-paper initialisation,
prefill and ``lengths`` on the lrnnx fixtures, forward == step on random configurations, errors."""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import check_prefill_then_decode, relative_error, run_steps
from lrnnx_jax.core import hippo
from lrnnx_jax.models.ltv.s5 import S5


def reference(params, x, tau, discretization, conj_sym, step_rescale):
    """float64 loop: ``s_t = A_bar_t s + gamma B~ x_t``, ``y_t = kappa Re(C~ s_t) + D x_t``."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    Lam = p["A"][:, 0] + 1j * p["A"][:, 1]
    Bt = p["B"][..., 0] + 1j * p["B"][..., 1]
    Ct = p["C"][..., 0] + 1j * p["C"][..., 1]
    dt = np.exp(p["log_dt"]) * step_rescale
    x = np.asarray(x, np.float64)
    s = np.zeros((x.shape[0], Lam.shape[0]), complex)
    ys = []
    for t in range(x.shape[1]):
        dA = dt if tau is None else dt * np.asarray(tau, np.float64)[:, t : t + 1]
        if discretization == "zoh":
            A_bar, gamma = np.exp(dA * Lam), (np.exp(dt * Lam) - 1) / Lam
        elif discretization == "bilinear":
            A_bar, gamma = (1 + dA * Lam / 2) / (1 - dA * Lam / 2), dt / (1 - dt * Lam / 2)
        else:
            A_bar, gamma = np.exp(dA * Lam), np.ones_like(Lam)
        s = A_bar * s + gamma * (x[:, t] @ Bt.T)
        ys.append((2 if conj_sym else 1) * np.real(s @ Ct.T) + p["D"] * x[:, t])
    return np.stack(ys, 1)


def params_of(model):
    return {name: getattr(model, name)[...] for name in ("A", "B", "C", "D", "log_dt")}


@pytest.mark.parametrize("discretization,conj_sym", [("zoh", False), ("bilinear", True), ("dirac", False)])
def test_forward_matches_float64_reference(discretization, conj_sym):
    # large steps (dt up to 0.5, tau up to 2) so that the three discretizations differ clearly
    model = S5(5, 4, discretization, conj_sym, dt_min=0.05, dt_max=0.5, step_rescale=1.3, method="fft", rngs=nnx.Rngs(3))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 17, 5)).astype(np.float32)
    tau = rng.uniform(0.1, 2.0, (2, 17)).astype(np.float32)
    args = (params_of(model), x)
    y = model(x)  # FFT path
    model.method = "auto"
    y_event = model(x, integration_timesteps=tau)  # time-varying scan
    chex.assert_shape((y, y_event), x.shape)
    assert relative_error(y, reference(*args, None, discretization, conj_sym, 1.3)) < 2e-6
    assert relative_error(y_event, reference(*args, tau, discretization, conj_sym, 1.3)) < 2e-6
    # tau = 1 is the regular system (as in lrnnx)
    y_ones = model(x, integration_timesteps=np.ones((2, 17, 1), np.float32))
    assert relative_error(y_ones, y) < 2e-6


@pytest.mark.parametrize("conj_sym", [False, True])
def test_initialisation_follows_the_s5_paper(conj_sym):
    P, H = 6, 5
    model = S5(H, P, conj_sym=conj_sym, dt_min=0.01, dt_max=0.2, rngs=nnx.Rngs(0))
    chex.assert_shape((model.A[...], model.B[...], model.C[...], model.D[...], model.log_dt[...]), [(P, 2), (P, H, 2), (H, P, 2), (H,), (P,)])
    Lam, _, _, V, _ = hippo.make_DPLR_HiPPO(2 * P if conj_sym else P)
    np.testing.assert_allclose(model.A[...][:, 0], -0.5)
    np.testing.assert_allclose(model.A[...][:, 1], Lam.imag[:P], rtol=1e-6, atol=1e-6)
    log_dt = np.asarray(model.log_dt[...])
    assert np.all((log_dt >= np.log(0.01)) & (log_dt <= np.log(0.2)))
    Bt = np.asarray(model.B[...][..., 0] + 1j * model.B[...][..., 1], np.complex128)
    if not conj_sym:
        # B~ = V^-1 B0 with B0 real
        B0 = V @ Bt
        np.testing.assert_allclose(B0.imag, 0, atol=1e-5)
    # the conjugate-symmetric model outputs 2 Re: twice the real part of its single-copy readout
    x = np.random.default_rng(1).standard_normal((1, 3, H)).astype(np.float32)
    y = np.asarray(model(x)) - np.asarray(model.D[...]) * x
    twin = S5(H, P, conj_sym=False, rngs=nnx.Rngs(0))
    for name in ("A", "B", "C", "log_dt"):
        getattr(twin, name).set_value(getattr(model, name)[...])
    twin.D.set_value(jnp.zeros(H))
    np.testing.assert_allclose(y, (2 if conj_sym else 1) * np.asarray(twin(x)), rtol=1e-5, atol=1e-6)


def test_fixture_prefill_then_decode_and_lengths():
    """lrnnx cannot prefill S5; ours continues the event-mode fixture exactly."""
    check_prefill_then_decode("15_ltv_S5_event", split=9)


@pytest.mark.parametrize("seed,event", [(0, True), (1, False)])
def test_forward_matches_step_on_random_configurations(seed, event):
    rng = np.random.default_rng(seed)
    H, P = (int(v) for v in rng.integers(2, 9, size=2))
    discretization = ("zoh", "bilinear", "dirac")[int(rng.integers(3))]
    conj_sym = bool(rng.integers(2))
    model = S5(
        H, P, discretization, conj_sym, dt_min=0.01, dt_max=0.5, step_rescale=float(rng.uniform(0.5, 2)),
        chunk_size=int(rng.integers(2, 6)), rngs=nnx.Rngs(seed),
    )
    x = rng.standard_normal((2, 13, H)).astype(np.float32)
    tau = rng.uniform(0.05, 2.0, (2, 13)).astype(np.float32) if event else None
    y, cache_fwd = model(x, integration_timesteps=tau, return_cache=True)
    y_step, cache = run_steps(model, x, tau)
    assert relative_error(y, y_step) < 1e-5, (H, P, discretization, conj_sym, event)
    np.testing.assert_allclose(cache_fwd["lrnn_state"], cache["lrnn_state"], rtol=1e-5, atol=1e-6)


def test_bad_arguments_raise_clear_errors():
    for name in ("mamba", "async", "no_discretization", "ZOH"):
        with pytest.raises(ValueError, match=rf"unknown discretization '{name}'; expected one of \['bilinear', 'dirac', 'zoh'\]"):
            S5(4, 3, discretization=name, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="need 0 < dt_min <= dt_max, got dt_min=0.2, dt_max=0.1"):
        S5(4, 3, dt_min=0.2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="step_rescale must be > 0"):
        S5(4, 3, step_rescale=0.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="d_state must be a positive integer, got 0"):
        S5(4, 0, rngs=nnx.Rngs(0))
    model = S5(4, 3, method="fft", rngs=nnx.Rngs(0))
    x = np.zeros((1, 5, 4), np.float32)
    with pytest.raises(ValueError, match="method='fft' needs a time-invariant system"):
        model(x, integration_timesteps=np.ones((1, 5), np.float32))
    with pytest.raises(ValueError, match=r"integration_timesteps must have shape \(1,\), got \(1, 2\)"):
        model.step(x[:, 0], model.allocate_inference_cache(1), integration_timesteps=np.ones((1, 2), np.float32))
