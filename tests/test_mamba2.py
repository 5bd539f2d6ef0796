"""Mamba-2 against an independent float64 NumPy implementation of mamba_ssm's Mamba2 math (in the head layout
``(nheads, headdim, N)``, token by token), loading mamba_ssm state_dicts, the cell on the fused kernel, and
constructor errors. The generic contract (step, caches, lengths, gradients, transforms) runs through tests/zoo.py."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import relative_error
from lrnnx_jax.convert import from_mamba_ssm
from lrnnx_jax.models.ltv import Mamba2
from pallas_kernels import KernelConfig
from pallas_kernels import fused_generation as fg

H = 6
#: dt in [0.05, 0.5] so that the decay matters within a few steps
CONFIGS = {
    "default": dict(),
    "groups3-bias-hdim-skip": dict(ngroups=3, bias=True, D_has_hdim=True),
    "norm-before-gate-groups3": dict(norm_before_gate=True, ngroups=3, conv_bias=False),
    "no-rmsnorm-dt-limit": dict(rmsnorm=False, dt_limit=(0.1, 0.3), d_conv=2),
}


def build(name, seed=0, **kwargs):
    return Mamba2(**{**dict(d_model=H, d_state=4, headdim=4, d_conv=3, chunk_size=4, dt_min=0.05, dt_max=0.5),
                     **CONFIGS[name], **kwargs}, rngs=nnx.Rngs(seed))


def mamba_ssm_state_dict(model) -> dict:
    """The model's parameters under mamba_ssm's names and shapes (torch layout)."""
    out = {"in_proj.weight": np.asarray(model.in_proj.kernel[...]).T,
           "conv1d.weight": np.asarray(model.conv_weight[...])[:, None, :],
           "dt_bias": np.asarray(model.dt_bias[...]), "A_log": np.asarray(model.A_log[...]), "D": np.asarray(model.D[...]),
           "out_proj.weight": np.asarray(model.out_proj.kernel[...]).T}
    if model.in_proj.bias is not None:
        out["in_proj.bias"], out["out_proj.bias"] = np.asarray(model.in_proj.bias[...]), np.asarray(model.out_proj.bias[...])
    if model.conv_bias is not None:
        out["conv1d.bias"] = np.asarray(model.conv_bias[...])
    if model.norm_weight is not None:
        out["norm.weight"] = np.asarray(model.norm_weight[...])
    return out


def numpy_mamba2(sd: dict, model, x, conv_state=None, ssm_state=None):
    """mamba_ssm's Mamba2 in float64 NumPy, one token at a time, from a state dict (``sd``) and the model's
    hyperparameters. ``x (B, L, H)``; returns ``(y (B, L, H), conv_state (B, conv_dim, K), ssm_state (B, nh, P, N))``."""
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    batch, length, _ = x.shape
    D, N, G, P, nh, K = model.d_inner, model.d_state, model.ngroups, model.headdim, model.nheads, model.d_conv
    conv_dim = D + 2 * G * N
    W_in, W_out = f(sd["in_proj.weight"]), f(sd["out_proj.weight"])
    b_in = f(sd.get("in_proj.bias", np.zeros(W_in.shape[0])))
    b_out = f(sd.get("out_proj.bias", np.zeros(W_out.shape[0])))
    w_conv, b_conv = f(sd["conv1d.weight"])[:, 0], f(sd.get("conv1d.bias", np.zeros(conv_dim)))
    A = -np.exp(f(sd["A_log"]))
    skip = f(sd["D"]).reshape(nh, -1) if model.D_has_hdim else f(sd["D"])[:, None]
    conv = np.zeros((batch, conv_dim, K)) if conv_state is None else f(conv_state).copy()
    h = np.zeros((batch, nh, P, N)) if ssm_state is None else f(ssm_state).copy()
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    ys = []
    for t in range(length):
        proj = f(x[:, t]) @ W_in.T + b_in
        z, xBC, dt = proj[:, :D], proj[:, D:D + conv_dim], proj[:, D + conv_dim:]
        conv = np.concatenate([conv[:, :, 1:], xBC[:, :, None]], axis=2)
        xBC = silu(np.sum(conv * w_conv, axis=-1) + b_conv)
        xs, Bs, Cs = xBC[:, :D].reshape(batch, nh, P), xBC[:, D:D + G * N].reshape(batch, G, N), xBC[:, D + G * N:].reshape(batch, G, N)
        dt = np.log1p(np.exp(dt + f(sd["dt_bias"])))
        dt = np.clip(dt, *model.dt_limit)
        y = np.zeros((batch, nh, P))
        for head in range(nh):
            g = head // (nh // G)
            decay = np.exp(dt[:, head] * A[head])[:, None, None]
            h[:, head] = decay * h[:, head] + (dt[:, head, None] * xs[:, head])[:, :, None] * Bs[:, g][:, None, :]
            y[:, head] = np.einsum("bpn,bn->bp", h[:, head], Cs[:, g]) + skip[head] * xs[:, head]
        y = y.reshape(batch, D)
        if model.rmsnorm:
            if not model.norm_before_gate:
                y = y * silu(z)
            grouped = y.reshape(batch, G, -1)
            y = (grouped / np.sqrt(np.mean(grouped**2, axis=-1, keepdims=True) + 1e-5)).reshape(batch, D) * f(sd["norm.weight"])
            if model.norm_before_gate:
                y = y * silu(z)
        else:
            y = y * silu(z)
        ys.append(y @ W_out.T + b_out)
    return np.stack(ys, 1), conv, h


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_step_and_prefill_match_float64_numpy(name):
    model = build(name, seed=1)
    sd = mamba_ssm_state_dict(model)
    x = np.random.default_rng(2).standard_normal((2, 13, H)).astype(np.float32)
    y_ref, conv_ref, h_ref = numpy_mamba2(sd, model, x)
    y, cache = model(x, return_cache=True)
    chex.assert_shape(y, (2, 13, H))
    chex.assert_shape(cache["lrnn_state"], (2, model.nheads, model.headdim, model.d_state))
    assert relative_error(y, y_ref) < 2e-5
    assert relative_error(cache["lrnn_state"], h_ref) < 2e-5 and relative_error(cache["conv_state"], conv_ref) < 2e-5
    _, head_cache = model(x[:, :6], return_cache=True)
    ys = []
    step_cache = head_cache
    for t in range(6, 13):
        y_t, step_cache = model.step(x[:, t], step_cache)
        ys.append(y_t)
    assert relative_error(np.stack(ys, 1), y_ref[:, 6:]) < 2e-5
    assert relative_error(step_cache["lrnn_state"], h_ref) < 2e-5
    # the NumPy model continued from the JAX prefill's cache: the cache layout is mamba_ssm's
    y_tail, _, _ = numpy_mamba2(sd, model, x[:, 6:], head_cache["conv_state"], head_cache["lrnn_state"])
    assert relative_error(y_tail, y_ref[:, 6:]) < 2e-5


def test_float64_forward_matches_numpy_closely():
    model = build("groups3-bias-hdim-skip", seed=3)
    sd = mamba_ssm_state_dict(model)
    x = np.random.default_rng(4).standard_normal((2, 9, H))
    y_ref, _, _ = numpy_mamba2(sd, model, x)
    with jax.enable_x64(True):
        graphdef, state = nnx.split(model)
        wide = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, state)
        y = nnx.merge(graphdef, wide)(jnp.asarray(x, jnp.float64))
        assert y.dtype == jnp.float64
        assert relative_error(y, y_ref) < 1e-11


def test_from_mamba_ssm_loads_the_state_dict_and_names_problems():
    source = build("groups3-bias-hdim-skip", seed=5)
    sd = mamba_ssm_state_dict(source)
    kwargs = dict(d_model=H, d_state=4, headdim=4, d_conv=3, chunk_size=4, **CONFIGS["groups3-bias-hdim-skip"])
    loaded = from_mamba_ssm("Mamba2", kwargs, sd, rngs=nnx.Rngs(9))
    x = np.random.default_rng(6).standard_normal((2, 7, H)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(source(x)))
    with pytest.raises(ValueError, match=r"missing entries \['A_log'\]"):
        from_mamba_ssm("Mamba2", kwargs, {k: v for k, v in sd.items() if k != "A_log"})
    with pytest.raises(ValueError, match=r"conv1d.weight: expected \(36, 1, 3\), got \(36, 3\)"):
        from_mamba_ssm("Mamba2", kwargs, {**sd, "conv1d.weight": sd["conv1d.weight"][:, 0]})
    with pytest.raises(ValueError, match=r"unexpected entries \['norm.bias'\]"):
        from_mamba_ssm("Mamba2", kwargs, {**sd, "norm.bias": np.zeros(12)})
    with pytest.raises(ValueError, match="unknown mamba_ssm model 'Mamba3'"):
        from_mamba_ssm("Mamba3", kwargs, sd)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ssd_forward_cache_and_gradients_equal_the_scan(name):
    """``scan_method="ssd"`` (:func:`lrnnx_jax.core.ssd.ssd_chunked`) against the default scan, the same parameters
    (the scan method draws none): the forward from an entering cache with lengths (frozen steps), its final cache,
    and the gradients w.r.t. every parameter, x and the entering state, of a random projection of the output and
    the final state. L = 13 in chunks of 4 (padded). Both are float32 with different summation orders over 13
    steps: 1e-5 relative (measured: 2e-7 to 2e-6, the largest on the gradients)."""
    models = {method: build(name, seed=11, scan_method=method) for method in ("scan", "ssd")}
    rng = np.random.default_rng(12)
    prefix, x = (rng.standard_normal((2, T, H)).astype(np.float32) for T in (5, 13))
    _, entering = models["scan"](prefix, return_cache=True)
    lengths = jnp.asarray([13, 7])
    w_y = rng.standard_normal((2, 13, H)).astype(np.float32)
    w_h = rng.standard_normal(entering["lrnn_state"].shape).astype(np.float32)

    def run(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params, x, h0):
            y, cache = nnx.merge(graphdef, params, rest)(
                x, lengths=lengths, cache={**entering, "lrnn_state": h0}, return_cache=True)
            return jnp.sum(y * w_y) + jnp.sum(cache["lrnn_state"] * w_h), (y, cache)

        (_, outputs), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
            params, jnp.asarray(x), entering["lrnn_state"])
        return outputs, grads

    (y_scan, cache_scan), grads_scan = run(models["scan"])
    (y_ssd, cache_ssd), grads_ssd = run(models["ssd"])
    chex.assert_trees_all_equal_shapes_and_dtypes((y_ssd, cache_ssd, grads_ssd), (y_scan, cache_scan, grads_scan))
    assert relative_error(y_ssd, y_scan) < 1e-5
    assert np.all(np.asarray(y_ssd[1, 7:]) == 0)
    for key in cache_scan:
        assert relative_error(cache_ssd[key], cache_scan[key]) < 1e-5, key
    for (path, g_ssd), g_scan in zip(jax.tree_util.tree_leaves_with_path(grads_ssd), jax.tree.leaves(grads_scan)):
        assert np.max(np.abs(g_scan)) > 0, path
        assert relative_error(g_ssd, g_scan) < 1e-5, path


@pytest.mark.parametrize("name", ["default", "norm-before-gate-groups3"])
def test_cell_on_the_fused_kernel(name):
    """The cell in one Pallas kernel (interpret mode): the multi-token kernel and the closed-loop rollout
    equal the XLA driver; the one-step kernel equals the XLA step."""
    model = build(name, seed=7)
    x = np.random.default_rng(8).standard_normal((3, 9, H)).astype(np.float32)
    _, cache = model(x[:, :4], return_cache=True)
    always, never = KernelConfig(use_kernels="always"), KernelConfig(use_kernels="never")
    y_ref, cache_ref = model.multi_step(x[:, 4:], cache, kernel_config=never)
    y_kernel, cache_kernel = model.multi_step(x[:, 4:], cache, kernel_config=always)
    assert relative_error(y_kernel, y_ref) < 1e-5
    for key in cache_ref:
        assert relative_error(cache_kernel[key], cache_ref[key]) < 1e-5, key
    y1, c1 = model.step(x[:, 4], cache, kernel_config=always)
    y1_ref, c1_ref = model.step(x[:, 4], cache, kernel_config=never)
    assert relative_error(y1, y1_ref) < 1e-5 and relative_error(c1["conv_state"], c1_ref["conv_state"]) < 1e-6
    ys = fg.fused_generate(model, jnp.asarray(x[:, 0]), 8)
    closed, c = [], model.allocate_inference_cache(3)
    x_t = jnp.asarray(x[:, 0])
    for _ in range(8):
        x_t, c = model.step(x_t, c, kernel_config=never)
        closed.append(x_t)
    assert relative_error(ys, np.stack(closed, 1)) < 5e-5  # float32 rounding, fed back through 8 closed-loop steps


@pytest.mark.parametrize("name", ["groups3-bias-hdim-skip", "no-rmsnorm-dt-limit"])
def test_verify_step_runs_the_checkpointed_ssu_and_matches_numpy(name):
    """Three verify_step calls of 3 drafts with random acceptance, on the SSU kernel (interpret mode) and on its
    reference: the drafts' outputs equal float64 NumPy stepped from the state after exactly the accepted tokens
    (float32 arithmetic over a few steps: 1e-5). A dt_limit clamp (which the op does not apply) takes the generic
    replay instead."""
    model = build(name, seed=9)
    sd = mamba_ssm_state_dict(model)
    rng = np.random.default_rng(9)
    batch, T = 3, 3
    assert ("old_conv_in" in model.allocate_verify_cache(batch, T)) == (name != "no-rmsnorm-dt-limit")
    for config in (KernelConfig(use_kernels="always"), KernelConfig(use_kernels="never")):
        cache, accepted = model.allocate_verify_cache(batch, T), None
        conv_state, ssm_state = None, None
        previous = None
        for call in range(3):
            x = rng.standard_normal((batch, T, H)).astype(np.float32)
            if previous is not None:  # commit each row's accepted prefix in NumPy
                rows = [numpy_mamba2(sd, model, previous[b : b + 1, : accepted[b]], conv_state[b : b + 1], ssm_state[b : b + 1])
                        if accepted[b] else (None, conv_state[b : b + 1], ssm_state[b : b + 1]) for b in range(batch)]
                conv_state = np.concatenate([r[1] for r in rows])
                ssm_state = np.concatenate([r[2] for r in rows])
            y, cache = model.verify_step(x, cache, None if accepted is None else jnp.asarray(accepted, jnp.int32),
                                         kernel_config=config)
            expected, _, _ = numpy_mamba2(sd, model, x, conv_state, ssm_state)
            assert relative_error(y, expected) < 1e-5, (config.use_kernels, call)
            if ssm_state is not None:
                assert relative_error(cache["checkpoint"]["lrnn_state"], ssm_state) < 1e-5
            previous, accepted = x, rng.integers(0, T + 1, batch)
            if conv_state is None:
                conv_state = np.zeros((batch, model.conv_dim, model.d_conv))
                ssm_state = np.zeros((batch, model.nheads, model.headdim, model.d_state))


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(headdim=5), ValueError, r"d_inner = expand \* d_model = 12 must be a multiple of headdim=5"),
    (dict(ngroups=2), ValueError, r"ngroups=2 must divide nheads = d_inner / headdim = 3"),
    (dict(d_ssm=6), ValueError, r"d_ssm=6 .* is not implemented"),
    (dict(A_init_range=(0, 4)), ValueError, r"A_init_range must satisfy 0 < lo <= hi"),
    (dict(dt_limit=(0.5, 0.1)), ValueError, r"dt_limit must satisfy 0 <= lo < hi"),
    (dict(d_state=0), ValueError, "d_state must be a positive integer"),
    (dict(activation="relu"), ValueError, "activation must be 'silu' or 'swish'"),
    (dict(scan_method="chunked"), ValueError, r"scan_method must be one of \('scan', 'ssd'\), got 'chunked'"),
    (dict(scan_method="ssd", chunk_size=0), ValueError, "chunk_size must be a positive integer or None, got 0"),
])
def test_constructor_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        Mamba2(**{**dict(d_model=H, d_state=4, headdim=4), **kwargs}, rngs=nnx.Rngs(0))
