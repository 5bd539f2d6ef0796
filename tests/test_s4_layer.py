"""The S4/S4D block: layout, gate/bottleneck/channels, dropout, initialisations and argument errors."""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from conftest import load_fixture, relative_error
from lrnnx_jax.models.lti import s4_layer
from lrnnx_jax.models.lti.s4 import S4
from lrnnx_jax.models.lti.s4d import S4D
from zoo import ZOO


def gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def linear(layer, x):
    return x @ np.asarray(layer.kernel[...], np.float64) + np.asarray(layer.bias[...], np.float64)


def test_block_matches_numpy_reference_transposed_gated_bottleneck():
    """lrnnx's block on (B, H, L): gate, a working bottleneck, 2 channels flattened as (h c)."""
    H, L = 6, 7
    model = S4D(d_model=H, d_state=6, bottleneck=2, gate=3, channels=2, swap_channels=True, dt_min=0.1, dt_max=0.5, rngs=nnx.Rngs(0))
    assert model.transposed and model.d_inner == 3 and model.output_gate is not None
    x = np.random.default_rng(0).standard_normal((2, H, L)).astype(np.float32)
    y = model(x)
    chex.assert_shape(y, (2, H, L))

    xs = np.swapaxes(x, 1, 2).astype(np.float64)  # (B, L, H)
    v = gelu(linear(model.input_gate, xs))
    u = linear(model.input_linear, xs)  # (B, L, 3)
    A_bar, B_bar, C = (np.asarray(a, np.complex128) for a in model.discrete_system())
    h = np.zeros((2, 3, 3), np.complex128)
    ssm = []
    for t in range(L):
        h = A_bar * h + B_bar * u[:, t, :, None]
        ssm.append(np.einsum("chn,bhn->bch", C, h).real)
    z = np.stack(ssm, 1) + np.asarray(model.D[...]) * u[:, :, None, :]  # (B, L, c, H')
    z = gelu(np.swapaxes(z, -1, -2).reshape(2, L, 6))  # swap_channels: (h c)
    z = gelu(linear(model.output_gate, z) * v)
    expected = gelu(linear(model.output_linear, z))
    assert relative_error(np.swapaxes(y, 1, 2), expected) < 1e-5

    y_cache, cache = model(x, return_cache=True)
    np.testing.assert_allclose(y_cache, y, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(cache["lrnn_state"], h, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"x must have shape \(B, H, L\) with H=6 \(transposed=True\), got shape \(2, 7, 6\)"):
        model(np.swapaxes(x, 1, 2))


def test_dropout_is_off_until_enabled():
    x = np.random.default_rng(1).standard_normal((2, 5, 6)).astype(np.float32)
    entry = next(e for e in ZOO if e.name == "S4D-bilinear-lin-c2-gate2")
    reference = entry.build(seed=3)(x)
    model = entry.build(seed=3, dropout=0.5, tie_dropout=True)
    np.testing.assert_array_equal(model(x), reference)
    training = nnx.view(model, deterministic=False)
    first, second = np.asarray(training(x)), np.asarray(training(x))
    assert relative_error(first, reference) > 1e-3 and relative_error(second, first) > 1e-3


# ------------------------------------------------------------------------ inits
def test_legs_init_matches_lrnnx():
    _, _, state_dict = load_fixture("07_lti_S4")
    model = S4(d_model=16, d_state=8, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(model.A_real[...], state_dict["A_real"], rtol=1e-6)
    np.testing.assert_allclose(model.A_imag[...], state_dict["A_imag"], rtol=1e-6)
    ours_B, theirs_B = s4_layer.as_complex(model.B[...]), s4_layer.as_complex(jnp.asarray(state_dict["B"]))
    ours_P, theirs_P = s4_layer.as_complex(model.P[...]), s4_layer.as_complex(jnp.asarray(state_dict["P"]))
    # eigenvectors are defined up to a phase: compare |P| and B conj(P) where Im B is not clipped
    np.testing.assert_allclose(jnp.abs(ours_P), jnp.abs(theirs_P), rtol=1e-5)
    free = np.abs(np.imag(theirs_B)) < 2
    np.testing.assert_allclose((ours_B * jnp.conj(ours_P[0]))[free], (theirs_B * jnp.conj(theirs_P[0]))[free], rtol=1e-5)


@pytest.mark.parametrize("measure, rank", [("legs", 1), ("legt", 2), ("fourier", 1)])
def test_nplr_is_unitarily_equivalent_to_hippo(measure, rank):
    N = 8
    W, P, B, V = s4_layer.nplr(measure, N, rank, B_clip=None)
    full = lambda z: np.concatenate([z, np.conj(z)], axis=-1)
    A = np.diag(full(W)) - full(P).T @ np.conj(full(P))
    A_hippo, B_hippo = s4_layer.hippo_transition(measure, N)
    np.testing.assert_allclose(full(V) @ A @ full(V).conj().T, A_hippo, atol=1e-12)
    np.testing.assert_allclose(full(V) @ full(B), B_hippo, atol=1e-12)


def test_direct_inits_and_combinations():
    n = np.arange(4)
    cases = {
        "diag-lin": -0.5 - 1j * np.pi * n,
        "diag-inv": -0.5 - 1j * 8 / np.pi * (8 / (1 + 2 * n) - 1),
        "diag-quad": -0.5 - 1j * (1 + 2 * n) ** 2 / np.pi,
        "diag-real": -(1.0 + n) + 0j,
    }
    for init, A in cases.items():
        params = S4(d_model=6, d_state=8, init=init, rngs=nnx.Rngs(0)).ssm_params()
        np.testing.assert_allclose(params.A, np.broadcast_to(A, (6, 4)), rtol=1e-6, atol=1e-4, err_msg=init)
        np.testing.assert_array_equal(params.P, 0)  # diag-*: no low-rank term
    params = S4D(d_model=6, d_state=8, init="hippo", rngs=nnx.Rngs(0)).ssm_params()  # 3 legs copies, 3 fourier
    np.testing.assert_allclose(params.A[:3], np.broadcast_to(s4_layer.nplr("legs", 8)[0], (3, 4)), rtol=1e-6)
    np.testing.assert_allclose(params.A[3:].imag, np.broadcast_to(s4_layer.nplr("fourier", 8)[0].imag, (3, 4)), atol=1e-4)
    model = S4D(d_model=6, d_state=8, init="dplr-lin", B_init="alternating", normalize=True, rngs=nnx.Rngs(0))
    B = model.ssm_params().B
    np.testing.assert_allclose(2 * jnp.sum(jnp.abs(B / model.ssm_params().A) ** 2, -1), 1, rtol=1e-5)
    np.testing.assert_allclose(jnp.sign(B.real), np.broadcast_to([1, -1, 1, -1], (6, 4)))


def test_deterministic_init_and_transforms():
    model = S4D(d_model=6, d_state=8, init="diag-lin", deterministic=True, dt_min=0.01, dt_max=0.1, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(model.inv_dt[...][:, 0], np.linspace(np.log(0.01), np.log(0.1), 6), rtol=1e-6)
    np.testing.assert_allclose(model.ssm_params().C, np.broadcast_to([1, 0, 0, 0], (1, 6, 4)), atol=0)
    for transform in s4_layer.TRANSFORMS:
        value = jnp.array([1e-3, 0.3, 0.9])  # below 1 so that "sigmoid" can represent it
        expected = value + (1e-4 if transform == "relu" else 0)  # lrnnx's relu transform adds 1e-4
        stored = s4_layer.inv_transform(value, transform)
        np.testing.assert_allclose(s4_layer.param_transform(stored, transform), expected, rtol=2e-3, err_msg=transform)
    transforms = dict(dt_transform="softplus", real_transform="softplus", imag_transform="exp")
    fast = S4D(d_model=6, d_state=8, dt_fast=True, dt_tie=False, **transforms, rngs=nnx.Rngs(0))
    params = fast.ssm_params()
    chex.assert_shape(params.dt, (6, 4))
    assert np.all((params.dt > 1e-3 * 0.99) & (params.dt < 0.1 * 1.01))
    np.testing.assert_allclose(params.A.real, -0.5, rtol=1e-6)


def test_is_real():
    model = S4D(d_model=6, d_state=8, init="diag-real", is_real=True, transposed=False, rngs=nnx.Rngs(0))
    chex.assert_shape(model.B[...], (1, 6, 4))
    assert not hasattr(model, "A_imag") and "A_imag" not in model.lrnnx_entries()
    np.testing.assert_array_equal(model.ssm_params().A.imag, 0)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(d_state=5), ValueError, "d_state must be a positive even number"),
        (dict(drop_kernel=0.1), ValueError, "drop_kernel"),
        (dict(real_random=True), TypeError, r"init='legs' does not take \['real_random'\]"),
        (dict(init="diag-lin", B_clip=1.0), TypeError, r"init='diag-lin' does not take \['B_clip'\]"),
        (dict(init="nope"), ValueError, "unknown init 'nope'"),
        (dict(init="diag-nope"), ValueError, "not 'diag-<x>' or 'dplr-<x>'"),
        (dict(init="legt"), ValueError, "init='legt' needs rank >= 2"),
        (dict(channels=2, final_act=None), ValueError, "final_act=None leaves 12 output features"),
        (dict(postact="glu"), ValueError, "postact is the deprecated name of final_act"),
        (dict(deterministic=True, dt_tie=False), ValueError, "deterministic=True needs dt_tie=True"),
        (dict(n_ssm=4), ValueError, "n_ssm=4 must divide the SSM width 6"),
        (dict(init="hippo", n_ssm=1), ValueError, "n_ssm=1 SSM copies must be a multiple of the 2 inits"),
        (dict(dt_transform="log"), ValueError, "dt_transform must be one of"),
        (dict(method="cuda"), ValueError, "method must be one of"),
        (dict(dropout=1.0), ValueError, r"dropout must lie in \[0, 1\)"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        S4(**{"d_model": 6, "d_state": 8, **kwargs}, rngs=nnx.Rngs(0))


def test_final_act_none_and_postact():
    x = np.random.default_rng(2).standard_normal((1, 3, 6)).astype(np.float32)
    model = S4D(d_model=6, d_state=8, final_act=None, transposed=False, rngs=nnx.Rngs(0))
    assert model.output_linear is None and "output_linear.0.weight" not in model.lrnnx_entries()
    assert S4D(d_model=6, d_state=8, final_act=None, postact="glu", rngs=nnx.Rngs(0)).output_linear is not None
    chex.assert_shape(model(x), (1, 3, 6))
