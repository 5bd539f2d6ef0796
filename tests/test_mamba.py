"""Mamba (S6): a float64 NumPy reference of lrnnx's math for every discretization with and
without event mode (forward, step and prefill), chunked vs unchunked vs sequential scans
(values and gradients), the scan's memory, the initialisation, and constructor errors.

The generic checks (lengths, finite-difference gradients, bf16, transforms, bad input) run on the
Mamba entries of tests/zoo.py; the lrnnx fixtures 16-20 run in tests/test_convert.py.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import relative_error
from lrnnx_jax.convert import load_lrnnx_state_dict
from lrnnx_jax.models.ltv.mamba import DISCRETIZATIONS, Mamba, selective_scan


# --------------------------------------------------------------------------- reference
def _softplus(v):
    return np.logaddexp(0.0, v)


def _silu(v):
    return v / (1 + np.exp(-v))


def reference_mamba(sd, x, tau, discretization, *, lrnnx_bilinear_step=False):
    """lrnnx's Mamba in float64, token by token, from an lrnnx ``state_dict``.

    ``lrnnx_bilinear_step`` reproduces lrnnx's step for ``"bilinear"``, which uses
    ``A_bar = exp(delta_A A)``: the tests show that ours does not.

    Returns ``(y (B, L, H), conv_state (B, D, K), h (B, D, N))`` after the last token.
    """
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    x = np.asarray(x, np.float64)
    batch, length, _ = x.shape
    W_in, W_x, W_dt, W_out = sd["in_proj.weight"], sd["x_proj.weight"], sd["dt_proj.weight"], sd["out_proj.weight"]
    D, R = W_dt.shape
    N = (W_x.shape[0] - R) // 2
    conv_w = sd["conv1d.weight"][:, 0, :]  # (D, K), oldest tap first
    K = conv_w.shape[1]
    A = -np.exp(sd["A_log"])  # (D, N)
    history = np.zeros((batch, D, K))  # raw conv inputs, newest last
    h = np.zeros((batch, D, N))
    ys = []
    for t in range(length):
        xz = x[:, t] @ W_in.T + sd.get("in_proj.bias", 0.0)
        x_in, z = xz[:, :D], xz[:, D:]
        history = np.concatenate([history[:, :, 1:], x_in[:, :, None]], axis=2)
        u = _silu(np.einsum("bdk,dk->bd", history, conv_w) + sd.get("conv1d.bias", 0.0))
        proj = u @ W_x.T
        r, B_t, C_t = proj[:, :R], proj[:, R : R + N], proj[:, R + N :]
        delta = _softplus(r @ W_dt.T + sd["dt_proj.bias"])[:, :, None]  # (B, D, 1)
        dA = delta if tau is None else tau[:, t, None, None] * _softplus(sd["dtA_proj.bias"])[None, :, None]
        if discretization == "mamba":
            A_bar, gamma = np.exp(dA * A), delta
        elif discretization == "zoh":
            A_bar, gamma = np.exp(dA * A), np.expm1(delta * A) / A
        elif discretization == "bilinear":
            A_bar = np.exp(dA * A) if lrnnx_bilinear_step else (1 + dA * A / 2) / (1 - dA * A / 2)
            gamma = delta / (1 - delta * A / 2)
        else:  # dirac
            A_bar, gamma = np.exp(dA * A), 1.0
        h = A_bar * h + gamma * B_t[:, None, :] * u[:, :, None]
        y = (np.einsum("bdn,bn->bd", h, C_t) + sd["D"] * u) * _silu(z)
        ys.append(y @ W_out.T + sd.get("out_proj.bias", 0.0))
    return np.stack(ys, 1), history, h


def random_state_dict(model, seed, delta_range=(0.05, 1.0)):
    """A random lrnnx ``state_dict`` for ``model``'s layout with realistic steps.

    ``softplus(b_dt)`` is uniform in ``delta_range`` and ``-A`` in ``[0.5, 4]``, so ``delta * A``
    reaches O(1), where the discretizations (and lrnnx's bilinear step) differ visibly.
    """
    rng = np.random.default_rng(seed)
    sd = {}
    for name, entry in model.lrnnx_entries().items():
        fan_in = entry.shape[-1]
        sd[name] = (rng.standard_normal(entry.shape) / math.sqrt(fan_in)).astype(np.float32)
    D = model.d_inner
    sd["dt_proj.bias"] = np.log(np.expm1(rng.uniform(*delta_range, D))).astype(np.float32)
    sd["dtA_proj.bias"] = rng.standard_normal(D).astype(np.float32)
    sd["A_log"] = np.log(rng.uniform(0.5, 4.0, (D, model.d_state))).astype(np.float32)
    sd["D"] = rng.standard_normal(D).astype(np.float32)
    return sd


@nnx.jit
def forward_steps_and_prefill(model, x, tau, split):
    """Forward; the step loop from a fresh cache; the prefill cache after ``split`` tokens.

    One forward call over the batch stacked twice, with lengths ``L`` for the first copy
    and ``split`` for the second, serves both the full forward and the prefill.
    """
    batch, length, _ = x.shape
    lengths = jnp.concatenate([jnp.full((batch,), length), jnp.full((batch,), split)])
    y_both, prefill_cache = model(
        jnp.concatenate([x, x]), integration_timesteps=None if tau is None else jnp.concatenate([tau, tau]),
        lengths=lengths, return_cache=True,
    )

    def body(cache, inputs):
        x_t, tau_t = inputs
        y_t, cache = model.step(x_t, cache, integration_timesteps=tau_t)
        return cache, y_t

    cache, y_steps = jax.lax.scan(
        body, model.allocate_inference_cache(batch), (jnp.moveaxis(x, 1, 0), None if tau is None else tau.T)
    )
    prefill_cache = jax.tree.map(lambda a: a[batch:], prefill_cache)
    return y_both[:batch], jnp.moveaxis(y_steps, 0, 1), cache, y_both[batch:], prefill_cache


CASES = [(d, e) for d in DISCRETIZATIONS for e in (False, True)]


@pytest.mark.parametrize("discretization,event", CASES, ids=[f"{d}-{'event' if e else 'plain'}" for d, e in CASES])
def test_forward_step_and_prefill_match_float64_reference(discretization, event):
    # one size for every case (sizes vary in the zoo entries); chunking and biases vary here
    i = DISCRETIZATIONS.index(discretization)
    chunk_size = (None, 4, 1, 3)[i]
    model = Mamba(d_model=6, d_state=4, bias=event, conv_bias=not event, discretization=discretization,
                  chunk_size=chunk_size, rngs=nnx.Rngs(i))
    sd = random_state_dict(model, seed=10 + i)
    load_lrnnx_state_dict(model, sd)
    rng = np.random.default_rng(20 + i)
    batch, length, split = 2, 9, 5
    x = rng.standard_normal((batch, length, 6)).astype(np.float32)
    tau = rng.uniform(0.05, 2.0, (batch, length)).astype(np.float32) if event else None

    with jax.default_matmul_precision("highest"):
        y, y_steps, cache, y_head, prefill_cache = forward_steps_and_prefill(model, x, tau, split)
    y_ref, conv_ref, h_ref = reference_mamba(sd, x, tau, discretization)
    chex.assert_shape([y, y_steps], (batch, length, 6))
    chex.assert_type([y, y_steps], jnp.float32)
    assert relative_error(y, y_ref) < 1e-5
    assert relative_error(y_steps, y_ref) < 1e-5
    np.testing.assert_allclose(cache["conv_state"], conv_ref, rtol=1e-5, atol=1e-6)
    assert relative_error(cache["lrnn_state"], h_ref) < 1e-5

    # the prefill cache is the reference state after `split` tokens
    y_ref_head, conv_head, h_head = reference_mamba(sd, x[:, :split], None if tau is None else tau[:, :split], discretization)
    assert relative_error(y_head[:, :split], y_ref_head) < 1e-5
    assert np.all(np.asarray(y_head[:, split:]) == 0)
    chex.assert_shape(prefill_cache["lrnn_state"], (batch, model.d_inner, model.d_state))
    np.testing.assert_allclose(prefill_cache["conv_state"], conv_head, rtol=1e-5, atol=1e-6)
    assert relative_error(prefill_cache["lrnn_state"], h_head) < 1e-5

    if discretization == "bilinear":
        # lrnnx's bilinear step (exp(delta_A A)) is far outside our tolerance: the test would catch it
        y_lrnnx_step, _, _ = reference_mamba(sd, x, tau, discretization, lrnnx_bilinear_step=True)
        assert relative_error(y_lrnnx_step, y_ref) > 1e-3


# ------------------------------------------------------------------- scan variants
def test_chunked_unchunked_and_sequential_agree_in_values_and_gradients():
    model = Mamba(d_model=6, d_state=4, discretization="bilinear", rngs=nnx.Rngs(0))
    load_lrnnx_state_dict(model, random_state_dict(model, seed=1))
    rng = np.random.default_rng(2)
    batch, length = 3, 10
    lengths = jnp.array([10, 6, 1])
    weights = rng.standard_normal((batch, length, 6))
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((batch, length, 6)))
        tau = jnp.asarray(rng.uniform(0.05, 2.0, (batch, length)))
        graphdef, params = nnx.split(model, nnx.Param)
        params = jax.tree.map(lambda a: a.astype(jnp.float64), params)

        results = {}
        for chunk_size in (None, 1, 3):  # unchunked, sequential, chunked (10 = 3 + 3 + 3 + 1: padded)
            model_c = nnx.merge(graphdef, params)
            model_c.chunk_size = chunk_size
            graphdef_c, _ = nnx.split(model_c, nnx.Param)

            def loss(p, xx):
                y, cache = nnx.merge(graphdef_c, p)(xx, integration_timesteps=tau, lengths=lengths, return_cache=True)
                return jnp.sum(y * weights) + jnp.sum(cache["lrnn_state"] ** 2), (y, cache)

            (_, aux), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
            results[chunk_size] = (aux, grads)

    ref_aux, ref_grads = results[None]
    assert np.all(np.asarray(ref_aux[0][1, 6:]) == 0)
    for chunk_size, (aux, grads) in results.items():
        for ours, theirs in zip(jax.tree.leaves((aux, grads)), jax.tree.leaves((ref_aux, ref_grads))):
            chex.assert_type(ours, jnp.float64)
            np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12, err_msg=f"chunk_size={chunk_size}")


def _scan_train_temp_bytes(chunk_size, length, D, N):
    """XLA's temporary memory of forward + backward of :func:`selective_scan` (B=1, float32)."""
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    inputs = {"u": f32(1, length, D), "z": f32(1, length, D), "delta": f32(1, length, D), "B": f32(1, length, N), "C": f32(1, length, N)}

    def loss(inputs, A, dtA_bias, D_skip):
        y, _ = selective_scan(inputs, A, dtA_bias, D_skip, jnp.zeros((1, D, N)), chunk_size=chunk_size)
        return jnp.sum(y**2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    return grad.lower(inputs, f32(D, N), f32(D), f32(D)).compile().memory_analysis().temp_size_in_bytes


def test_chunked_scan_memory_grows_as_length_times_channels_not_times_state():
    D = N = 64
    chunked = {L: _scan_train_temp_bytes(32, L, D, N) for L in (256, 512)}
    per_token = (chunked[512] - chunked[256]) / 256
    # the per-token inputs and their gradients, O(D + N), and no per-token (D, N) state (the unchunked
    # scan keeps about 17 float32 (L, D, N) tensors: benchmarks/benchmark_scan_memory.py)
    assert per_token <= 8 * (D + N) * 4
    assert per_token <= D * N * 4 / 4


# ------------------------------------------------------------- init and interface
def test_parameters_have_lrnnx_names_shapes_and_initialisation():
    H, N, R = 64, 8, 4  # dt_rank "auto" = ceil(64 / 16) = 4
    model = Mamba(d_model=H, d_state=N, dt_min=0.01, dt_max=0.1, rngs=nnx.Rngs(0))
    D, K = 2 * H, 4
    shapes = {name: entry.shape for name, entry in model.lrnnx_entries().items()}
    assert shapes == {
        "in_proj.weight": (2 * D, H), "conv1d.weight": (D, 1, K), "conv1d.bias": (D,),
        "x_proj.weight": (R + 2 * N, D), "dt_proj.weight": (D, R), "dt_proj.bias": (D,),
        "dtA_proj.weight": (D, R), "dtA_proj.bias": (D,), "A_log": (D, N), "D": (D,), "out_proj.weight": (H, D),
    }
    assert model.dt_rank == R and model.d_inner == D
    np.testing.assert_allclose(model.A_log[...], np.log(np.tile(np.arange(1, N + 1), (D, 1))), rtol=1e-6)
    np.testing.assert_array_equal(model.D[...], np.ones(D))
    dt = np.asarray(jax.nn.softplus(model.dt_proj.bias[...]))
    assert dt.min() >= 0.01 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert dt.min() < 0.02 and dt.max() > 0.05  # log-uniform over the range
    for kernel, bound in ((model.dt_proj.kernel, R**-0.5), (model.in_proj.kernel, H**-0.5), (model.conv_weight, K**-0.5)):
        values = np.abs(np.asarray(kernel[...]))
        assert values.max() <= bound and values.max() > 0.8 * bound
    constant = Mamba(d_model=H, dt_init="constant", dt_scale=2.0, dt_rank=16, dt_init_floor=0.05, bias=True, conv_bias=False,
                     dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(np.asarray(constant.dt_proj.kernel[...], np.float32), np.float32(2.0 / 4))
    assert float(jnp.min(jax.nn.softplus(constant.dt_proj.bias[...].astype(jnp.float32)))) >= 0.05 * 0.99
    assert {"in_proj.bias", "out_proj.bias"} <= set(constant.lrnnx_entries()) and "conv1d.bias" not in constant.lrnnx_entries()
    assert constant.in_proj.kernel[...].dtype == jnp.bfloat16 and constant.A_log[...].dtype == jnp.float32
    cache = model.allocate_inference_cache(batch_size=3)
    chex.assert_shape([cache["conv_state"], cache["lrnn_state"]], [(3, D, K), (3, D, N)])
    chex.assert_type([cache["conv_state"], cache["lrnn_state"]], jnp.float32)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(dt_rank=0), r"dt_rank must be a positive integer or 'auto', got 0"),
        (dict(dt_rank=2.5), r"dt_rank must be a positive integer or 'auto', got 2.5"),
        (dict(dt_rank="full"), r"dt_rank must be a positive integer or 'auto', got 'full'"),
        (dict(dt_rank=True), r"dt_rank must be a positive integer or 'auto', got True"),
        (dict(discretization="async"), r"unknown discretization 'async'; expected one of \['bilinear', 'dirac', 'mamba', 'zoh'\]"),
        (dict(discretization="s7"), r"unknown discretization 's7'"),
        (dict(dt_init="normal"), r"dt_init must be one of \['random', 'constant'\], got 'normal'"),
        (dict(dt_min=0.2, dt_max=0.1), r"need 0 < dt_min <= dt_max, got dt_min=0.2, dt_max=0.1"),
        (dict(expand=0), r"expand must be a positive number"),
        (dict(d_state=0), r"d_state must be a positive integer, got 0"),
        (dict(chunk_size=0), r"chunk_size must be a positive integer, got 0"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Mamba(d_model=4, **kwargs, rngs=nnx.Rngs(0))


def test_bad_integration_timesteps_raise_in_forward_and_step():
    model = Mamba(d_model=4, d_state=2, rngs=nnx.Rngs(0))
    x = np.ones((2, 3, 4), np.float32)
    tau = np.full((2, 3), 0.5, np.float32)
    # (B, L, 1) is accepted as (B, L)
    np.testing.assert_array_equal(model(x, integration_timesteps=tau[..., None]), model(x, integration_timesteps=tau))
    with pytest.raises(ValueError, match=r"integration_timesteps must have shape \(2, 3\), got \(3, 2\)"):
        model(x, integration_timesteps=tau.T)
    with pytest.raises(TypeError, match="integration_timesteps must have a floating dtype"):
        model(x, integration_timesteps=np.ones((2, 3), np.int32))
    cache = model.allocate_inference_cache(2)
    with pytest.raises(ValueError, match=r"integration_timesteps must have shape \(2,\), got \(2, 3\)"):
        model.step(x[:, 0], cache, integration_timesteps=tau)
    with pytest.raises(ValueError, match="integration_timesteps must be > 0"):
        model.step(x[:, 0], cache, integration_timesteps=-tau[:, :1])
