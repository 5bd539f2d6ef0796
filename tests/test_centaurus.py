"""Centaurus: every mode against a float64 NumPy reference of its math, lrnnx's layout and init, errors."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load_fixture, relative_error
from lrnnx_jax.convert import from_lrnnx
from lrnnx_jax.models.lti.centaurus import (
    Centaurus,
    CentaurusBase,
    CentaurusDWS,
    CentaurusFull,
    CentaurusNeck,
    CentaurusPWNeck,
)


# ----------------------------------------------------------- float64 NumPy reference
def numpy_discretize(rule, A, delta):
    """``(A_bar, gamma)``, each ``(N, M)``, of ``h' = A h + B u`` with step ``delta (N,)``."""
    dA = delta[:, None] * A
    if rule == "mamba":
        return np.exp(dA), np.broadcast_to(delta[:, None], A.shape).astype(complex)
    if rule == "zoh":
        return np.exp(dA), np.expm1(dA) / A
    if rule == "bilinear":
        return (1 + dA / 2) / (1 - dA / 2), delta[:, None] / (1 - dA / 2)
    if rule == "dirac":
        return np.exp(dA), np.ones_like(A)
    raise AssertionError(rule)


def numpy_params(model):
    """The model's parameters as NumPy arrays, by name."""
    return {path[0]: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def reference_recurrence(model, x):
    """Neck, DWS and PWNeck, as lrnnx's step writes them, one time step at a time."""
    p = numpy_params(model)
    N, M, H = model.d_state, model.sub_state_dim, model.d_model
    A_bar, gamma = numpy_discretize(model.discretization, p["A"], np.exp(p["log_delta"]))
    batch, length, _ = x.shape
    y = np.zeros((batch, length, H))
    if model.mode == "pointwise":  # N*M independent lanes, lane n*M + m
        h = np.zeros((batch, N * M), complex)
        for t in range(length):
            h = A_bar.reshape(-1) * h + gamma.reshape(-1) * (x[:, t] @ p["B"].T)
            y[:, t] = h.real @ p["C"].T
        return y
    B_in, C_out = (np.diag(p["B"]), np.diag(p["C"])) if model.mode == "dws" else (p["B"], p["C"])
    h = np.zeros((batch, N, M), complex)
    for t in range(length):
        h = A_bar * h + gamma * (x[:, t] @ B_in.T)[:, :, None]
        y[:, t] = (h.real * p["E"]).sum(-1) @ C_out.T
    return y


def reference_full(model, x):
    """Full mode as H*H single-input single-output convolutions: state o*H + i maps input i to output o."""
    p = numpy_params(model)
    H = model.d_model
    A_bar, gamma = numpy_discretize(model.discretization, p["A"], np.exp(p["log_delta"]))
    batch, length, _ = x.shape
    lags = np.arange(length)
    y = np.zeros((batch, length, H))
    for o in range(H):
        for i in range(H):
            n = o * H + i
            kernel = p["C"][n] * p["B"][n] * np.real(A_bar[n][None, :] ** lags[:, None] * gamma[n]) @ p["E"][n]
            for b in range(batch):
                y[b, :, o] += np.convolve(x[b, :, i], kernel)[:length]
    return y


def randomize(model, rng):
    """Random float64 parameters at realistic scales (delta in [0.01, 0.5], stable A)."""
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = var.get_value().shape
        if path[0] == "A":
            value = -rng.uniform(0.05, 1.0, shape) + 1j * rng.uniform(-3.0, 3.0, shape)
        elif path[0] == "log_delta":
            value = np.log(rng.uniform(0.01, 0.5, shape))
        else:
            value = rng.standard_normal(shape)
        var.set_value(jnp.asarray(value))


CASES = [
    ("neck", "mamba", 4, 3),
    ("neck", "zoh", 4, 3),
    ("neck", "bilinear", 4, 2),
    ("dws", "dirac", 3, 2),
    ("pw", "zoh", 3, 3),
    ("full", "mamba", 9, 2),
    ("full", "zoh", 9, 3),
]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_forward_and_step_match_float64_reference(case):
    mode, rule, d_state, sub = CASES[case]
    H, batch, length = 3, 2, 17
    rng = np.random.default_rng(case)
    x = rng.standard_normal((batch, length, H))
    with jax.enable_x64(True):
        model = Centaurus(H, d_state, sub, rule, mode, rngs=nnx.Rngs(0))
        randomize(model, rng)
        reference = (reference_full if mode == "full" else reference_recurrence)(model, x)
        for method in ("fft", "scan"):
            model.method = method
            y = model(jnp.asarray(x))
            chex.assert_type(y, jnp.float64)
            assert relative_error(y, reference) < 1e-11, method
        cache = model.allocate_inference_cache(batch, dtype=jnp.float64)
        ys = []
        for t in range(length):
            y_t, cache = model.step(jnp.asarray(x[:, t]), cache)
            ys.append(y_t)
        assert relative_error(np.stack(ys, 1), reference) < 1e-11


@pytest.mark.parametrize(
    "mode,cls,lrnnx_mode",
    [
        ("neck", CentaurusNeck, "neck"),
        ("pointwise", CentaurusPWNeck, "pointwise"),
        ("pw", CentaurusPWNeck, "pointwise"),
        ("s5", CentaurusPWNeck, "pointwise"),
        ("dws", CentaurusDWS, "dws"),
        ("full", CentaurusFull, "full"),
    ],
)
def test_factory_builds_each_mode(mode, cls, lrnnx_mode):
    model = Centaurus(d_model=2, d_state=2 if mode == "dws" else 4, sub_state_dim=2, mode=mode, rngs=nnx.Rngs(0))
    assert type(model) is cls and isinstance(model, CentaurusBase)
    assert model.mode == lrnnx_mode and model.discretization == "mamba" and model.method == "auto"


def test_init_matches_lrnnx():
    H, N, M = 8, 64, 8
    models = {mode: Centaurus(H, {"dws": H}.get(mode, N), M, mode=mode, rngs=nnx.Rngs(3)) for mode in ("neck", "dws", "full", "pw")}
    expected_A = np.tile(-0.5 + 1j * np.pi * np.arange(M) / M, (N, 1))
    shapes = {
        "neck": {"A": (N, M), "log_delta": (N,), "E": (N, M), "B": (N, H), "C": (H, N)},
        "dws": {"A": (H, M), "log_delta": (H,), "E": (H, M), "B": (H,), "C": (H,)},
        "full": {"A": (N, M), "log_delta": (N,), "E": (N, M), "B": (N,), "C": (N,)},
        "pw": {"A": (N, M), "log_delta": (N,), "B": (N * M, H), "C": (H, N * M)},
    }
    for mode, model in models.items():
        n = model.d_state
        assert {k: v.shape for k, v in model.lrnnx_entries().items()} == shapes[mode], mode
        chex.assert_type(model.A[...], jnp.complex64)
        np.testing.assert_allclose(model.A[...], expected_A[:n], rtol=1e-7)
        np.testing.assert_allclose(np.exp(model.log_delta[...]), np.logspace(-3, -1, n), rtol=1e-5)
        if mode in ("neck", "full"):  # N*M = 512 samples
            assert abs(np.std(model.E[...]) / math.sqrt(2) - 1) < 0.1, mode
    bound_B, bound_C = 1 / math.sqrt(H), 1 / math.sqrt(N)  # kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))
    neck = models["neck"]
    assert np.abs(neck.B[...]).max() <= bound_B and np.abs(neck.B[...]).max() > 0.9 * bound_B
    assert np.abs(neck.C[...]).max() <= bound_C and np.abs(neck.C[...]).max() > 0.9 * bound_C
    np.testing.assert_array_equal(models["dws"].B[...], np.ones(H))
    np.testing.assert_array_equal(models["dws"].C[...], np.ones(H))
    assert abs(np.std(models["full"].B[...]) / math.sqrt(2 / H) - 1) < 0.25
    assert abs(np.std(models["full"].C[...]) / math.sqrt(2 / N) - 1) < 0.25
    np.testing.assert_allclose(models["pw"].B[...], np.full((N * M, H), 1 / math.sqrt(H)), rtol=1e-7)
    assert abs(np.std(models["pw"].C[...]) / math.sqrt(2 / (N * M)) - 1) < 0.1


@pytest.mark.parametrize(
    "name,cls,state_shape",
    [("08_lti_Centaurus", CentaurusNeck, (8, 4)), ("09_lti_Centaurus", CentaurusDWS, (16, 4)), ("11_lti_Centaurus", CentaurusPWNeck, (32,))],
)
def test_lrnnx_checkpoint_loads_into_the_right_mode(name, cls, state_shape):
    meta, arrays, state_dict = load_fixture(name)
    model = from_lrnnx(meta["model"], meta["kwargs"], state_dict)
    assert type(model) is cls
    np.testing.assert_array_equal(model.A[...], state_dict["A"])  # complex64 in lrnnx, loaded exactly
    # our flattened discrete system is lrnnx's derived buffers lifted onto the sub-states
    suffix = "_flat" if cls is CentaurusPWNeck else ""
    A_bar, B_bar, C = (np.asarray(a) for a in model.discrete_system())
    N, M, H = model.d_state, model.sub_state_dim, model.d_model
    np.testing.assert_allclose(A_bar, state_dict[f"_A_bar{suffix}"].reshape(-1), rtol=1e-6)
    if cls is CentaurusPWNeck:
        np.testing.assert_allclose(B_bar, state_dict["_B_bar_flat"], rtol=1e-6)
        np.testing.assert_allclose(C, state_dict["_C_eff_flat"], rtol=1e-6)
    else:
        np.testing.assert_allclose(B_bar.reshape(N, M, H), np.repeat(state_dict["_B_bar"][:, None], M, 1), rtol=1e-6)
        np.testing.assert_allclose(C.reshape(H, N, M), state_dict["_C_eff"][:, :, None] * state_dict["E"][None], rtol=1e-6)
    # lrnnx's cache layout, and prefill then decode reproduces lrnnx's forward
    x, split = arrays["x"], 10
    cache = model.allocate_inference_cache(batch_size=meta["B"])
    chex.assert_shape(cache["lrnn_state"], (meta["B"],) + state_shape)
    chex.assert_type(cache["lrnn_state"], jnp.complex64)
    y_head, cache = model(x[:, :split], return_cache=True)
    chex.assert_shape(cache["lrnn_state"], (meta["B"],) + state_shape)
    ys = [y_head]
    for t in range(split, x.shape[1]):
        y_t, cache = model.step(x[:, t], cache)
        ys.append(y_t[:, None])
    assert relative_error(np.concatenate(ys, 1), arrays["y_forward"]) < 1e-4


def test_invalid_configurations_raise_clear_errors():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match=r"mode='dws'.*d_state == d_model, got d_state=5, d_model=4"):
        Centaurus(4, 5, 2, mode="dws", rngs=rngs)
    with pytest.raises(ValueError, match=r"mode='full'.*d_state == d_model\*\*2 = 16, got d_state=4, d_model=4"):
        Centaurus(4, 4, 2, mode="full", rngs=rngs)
    with pytest.raises(ValueError, match=r"unknown Centaurus mode 'conv'; expected one of \['dws', 'full'"):
        Centaurus(4, 4, 2, mode="conv", rngs=rngs)
    for name in ("async", "no_discretization", "ZOH"):
        with pytest.raises(ValueError, match=rf"unknown discretization '{name}'; expected one of \['bilinear', 'dirac', 'mamba', 'zoh'\]"):
            Centaurus(4, 4, 2, discretization=name, rngs=rngs)
    with pytest.raises(ValueError, match="sub_state_dim must be a positive integer, got 0"):
        Centaurus(4, 4, 0, rngs=rngs)
    with pytest.raises(ValueError, match=r"method must be one of \('auto', 'fft', 'scan'\), got 'conv'"):
        Centaurus(4, 4, 2, method="conv", rngs=rngs)


def test_lrnnx_discretization_argument_keeps_lrnnx_semantics():
    """lrnnx ignores Centaurus' ``discretization``; a checkpoint made with ``"zoh"`` loads with lrnnx's rule."""
    meta, arrays, state_dict = load_fixture("08_lti_Centaurus")
    model = from_lrnnx(meta["model"], {**meta["kwargs"], "discretization": "zoh"}, state_dict)
    assert model.discretization == "mamba"
    assert relative_error(model(arrays["x"]), arrays["y_forward"]) < 1e-4
