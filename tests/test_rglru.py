"""RG-LRU: a float64 NumPy reference of the block, the ``a_init_range`` initialisation, prefill (raw
pre-conv ``conv_state``) and ``lengths`` on the lrnnx fixture, the forward, ``step`` and ``multi_step``
from a prefill's cache, the stable ``sqrt(1 - A_bar^2)`` in the forward and in the cell, the cell
on the fused kernels (interpret mode, and lowered to Triton), forward == step on random
configurations, errors."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from conftest import check_prefill_then_decode, relative_error, run_steps
from lrnnx_jax.models.ltv.rglru import RGLRU, rglru_coefficients
from pallas_kernels import KernelConfig
from pallas_kernels import fused_generation as fg
from pallas_kernels.cells import xla_step
from test_mamba import INTERPRET, NEVER, assert_caches_close, check_forward_from_cache


def reference(w, u, c):
    """float64 RG-LRU block from lrnnx-layout weights (``(out, in)`` matrices, ``conv1d.weight (D, 1, K)``)."""
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    u = np.asarray(u, np.float64)
    linear = lambda name, v: v @ w[f"{name}.weight"].T + w.get(f"{name}.bias", 0)
    sigmoid = lambda v: 1 / (1 + np.exp(-v))
    g = linear("gate_proj", u)
    g = 0.5 * g * (1 + erf(g / np.sqrt(2)))
    raw = linear("in_proj", u)
    kernel = w["conv1d.weight"][:, 0]  # (D, K)
    K = kernel.shape[1]
    padded = np.concatenate([np.zeros((u.shape[0], K - 1, raw.shape[-1])), raw], 1)
    x = sum(padded[:, k : k + raw.shape[1]] * kernel[:, k] for k in range(K)) + w.get("conv1d.bias", 0)
    r, i = sigmoid(linear("recurrent_gate_proj", x)), sigmoid(linear("input_gate_proj", x))
    a = sigmoid(w["a_log"][:, 0])
    h = np.zeros((u.shape[0], x.shape[-1]))
    hs = []
    for t in range(u.shape[1]):
        A_bar = a ** (c * r[:, t])
        h = A_bar * h + np.sqrt(1 - A_bar**2) * i[:, t] * x[:, t]
        hs.append(h)
    return linear("out_proj", g * np.stack(hs, 1))


def lrnnx_weights(model):
    weights = {}
    for name in ("gate_proj", "in_proj", "recurrent_gate_proj", "input_gate_proj", "out_proj"):
        linear = getattr(model, name)
        weights[f"{name}.weight"] = linear.kernel[...].T
        if linear.bias is not None:
            weights[f"{name}.bias"] = linear.bias[...]
    weights["conv1d.weight"] = model.conv_weight[...][:, None, :]
    if model.conv_bias is not None:
        weights["conv1d.bias"] = model.conv_bias[...]
    weights["a_log"] = model.a_log[...]
    return weights


@pytest.mark.parametrize("kwargs", [dict(), dict(d_conv=3, expand=2, c=4.0, bias=True, conv_bias=False, chunk_size=4)])
def test_forward_matches_float64_reference(kwargs):
    H = 5
    model = RGLRU(H, **kwargs, rngs=nnx.Rngs(1))
    u = np.random.default_rng(0).standard_normal((2, 14, H)).astype(np.float32)
    y = model(u)
    chex.assert_shape(y, u.shape)
    assert relative_error(y, reference(lrnnx_weights(model), u, model.c)) < 2e-6


def test_fixture_prefill_then_decode_and_lengths():
    """Decoding after a prefill continues lrnnx's forward (lrnnx's own prefill stores post-conv values)."""
    split = 9
    _, arrays, state_dict, cache = check_prefill_then_decode("21_ltv_RGLRU", split)
    D = state_dict["in_proj.weight"].shape[0]
    chex.assert_shape((cache["conv_state"], cache["lrnn_state"]), [(2, D, 4), (2, D, 1)])
    raw = np.asarray(arrays["x"][:, split - 4 : split] @ state_dict["in_proj.weight"].T)  # the last 4 pre-conv inputs
    np.testing.assert_allclose(cache["conv_state"], np.moveaxis(raw, 1, 2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("a_init_range", [(0.9, 0.999), (0.3, 0.35)])
def test_a_starts_in_a_init_range(a_init_range):
    lo, hi = a_init_range
    model = RGLRU(16, expand=2, a_init_range=a_init_range, rngs=nnx.Rngs(0))
    a = np.asarray(jax.nn.sigmoid(model.a_log[...]))
    chex.assert_shape(a, (32, 1))
    assert a.min() >= lo - 1e-6 and a.max() <= hi + 1e-6
    assert a.max() - a.min() > 0.5 * (hi - lo)  # spread over the range, not one value
    bound = 1 / np.sqrt(model.d_conv)
    assert np.abs(np.asarray(model.conv_weight[...])).max() <= bound


def test_lrnnx_layout_follows_the_bias_flags():
    H, D, K = 4, 8, 2
    shapes = {k: e.shape for k, e in RGLRU(H, d_conv=K, expand=2, bias=True, conv_bias=False, rngs=nnx.Rngs(0)).lrnnx_entries().items()}
    assert shapes == {
        "gate_proj.weight": (D, H), "gate_proj.bias": (D,), "in_proj.weight": (D, H), "in_proj.bias": (D,),
        "conv1d.weight": (D, 1, K), "recurrent_gate_proj.weight": (D, D), "recurrent_gate_proj.bias": (D,),
        "input_gate_proj.weight": (D, D), "input_gate_proj.bias": (D,), "a_log": (D, 1),
        "out_proj.weight": (H, D), "out_proj.bias": (H,),
    }


def test_input_scale_is_accurate_and_differentiable_near_one():
    a_log = jnp.asarray([2.0, 8.0, 14.0, 30.0, 120.0])  # a = sigmoid(a_log) up to 1 - 1e-52
    r = jnp.full(5, 0.01)
    ones = jnp.ones(5)
    A_bar, b = rglru_coefficients(ones, r, ones, a_log, 8.0)
    log_a_bar = 8.0 * 0.01 * -np.log1p(np.exp(-np.asarray(a_log, np.float64)))
    expected = np.sqrt(-np.expm1(2 * log_a_bar))
    np.testing.assert_allclose(np.asarray(A_bar), np.exp(log_a_bar), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(b)[:4], expected[:4], rtol=1e-5)  # the naive float32 formula gives 0 here
    assert 0 < float(b[4]) < 1e-18  # below float32 resolution of 1 - A_bar^2: floored, not NaN
    grads = jax.grad(lambda al, rr: jnp.sum(rglru_coefficients(ones, rr, ones, al, 8.0)[1]), argnums=(0, 1))(a_log, r)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("kwargs,split", [(dict(), 5), (dict(d_conv=3, expand=2, bias=True, conv_bias=False, chunk_size=4), 1)])
def test_forward_step_and_multi_step_from_a_cache_continue_the_reference(kwargs, split):
    model = RGLRU(5, **kwargs, rngs=nnx.Rngs(2))
    u = np.random.default_rng(3).standard_normal((3, 10, 5)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        check_forward_from_cache(model, u, None, split, reference(lrnnx_weights(model), u, model.c))


def _set_a_log(model, values):
    model.a_log.set_value(jnp.asarray(values, jnp.float32).reshape(model.a_log[...].shape))


def test_cell_transition_agrees_with_the_forward_near_one_and_far_from_it():
    """The cell writes log_sigmoid(a_log) as -softplus(-a_log) (kernel_math); the forward uses rglru_coefficients:
    both stay accurate where A_bar is within float32 rounding of 1 (a -> 1) and where it is tiny."""
    model = RGLRU(4, expand=2, c=8.0, rngs=nnx.Rngs(5))
    a_log = np.array([-30.0, -5.0, 0.5, 2.0, 8.0, 14.0, 30.0, 120.0])
    _set_a_log(model, a_log)
    u = np.random.default_rng(6).standard_normal((2, 7, 4)).astype(np.float32)
    y, cache = model(u, return_cache=True)
    y_steps, cache_steps = run_steps(model, u)
    assert relative_error(y_steps, y) < 1e-5
    assert_caches_close(cache_steps, cache)
    assert relative_error(y, reference(lrnnx_weights(model), u, model.c)) < 2e-6
    # the cell's one step against rglru_coefficients on the same conv output
    cell = model.cell()
    state = model.cell_state(cache)
    _, new_state = xla_step(cell, state, jnp.asarray(u[:, 0]), {})
    xc = sum(cell.params[f"conv_w{k}"] * new_state[f"conv{k}"] for k in range(model.d_conv)) + cell.params["conv_b"]
    r, i = model.gates(xc)
    A_bar, b = rglru_coefficients(xc, r, i, jnp.asarray(a_log, jnp.float32), model.c)
    np.testing.assert_allclose(new_state["h"], A_bar * state["h"] + b, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("kwargs", [dict(d_conv=2, expand=2, bias=True, conv_bias=False), dict(d_conv=3, c=3.0)])
def test_cell_on_the_fused_kernels_equals_multi_step_and_the_forward(kwargs):
    """The cell in one Pallas kernel (interpret mode; padded lanes: H=5, D=10 or 5) from a prefill's cache: given
    tokens (the multi-token kernel), the closed loop and the one-step kernel of ``model.step``."""
    model = RGLRU(5, **kwargs, rngs=nnx.Rngs(7))
    rng = np.random.default_rng(8)
    batch, length, split = 2, 6, 2
    T = length - split
    u = rng.standard_normal((batch, length, 5)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        y_full = model(u)
    assert relative_error(y_full, reference(lrnnx_weights(model), u, model.c)) < 2e-6
    _, cache = model(u[:, :split], return_cache=True)
    y_multi, cache_multi = model.multi_step(u[:, split:], cache, kernel_config=NEVER)

    cell = model.cell()
    assert fg.unsupported_reason(cell, batch, jnp.float32) is None
    state = model.cell_state(cache)
    ys, final = fg.run_cell(cell, state, u[:, split], T, config=INTERPRET, xs=u[:, split:])
    assert relative_error(ys, y_multi) < 1e-5
    assert relative_error(ys, y_full[:, split:]) < 1e-5
    assert_caches_close(model.cell_cache(final, cache), cache_multi, "run_cell")
    y_kernel, cache_kernel = model.multi_step(u[:, split:], cache, kernel_config=INTERPRET)
    assert relative_error(y_kernel, y_multi) < 1e-5
    assert_caches_close(cache_kernel, cache_multi, "multi_step on the kernel")

    y_t, cache_t = model.step(u[:, split], cache, kernel_config=INTERPRET)
    y_ref_t, cache_ref_t = model.step(u[:, split], cache, kernel_config=NEVER)
    assert relative_error(y_t, y_ref_t) < 1e-5
    assert_caches_close(cache_t, cache_ref_t, "step on the kernel")

    ys_loop, _ = fg.run_cell(cell, state, u[:, split], 3, config=INTERPRET)  # closed loop against model.step
    x_t, c = u[:, split], cache
    for t in range(3):
        x_t, c = model.step(x_t, c, kernel_config=NEVER)
        assert relative_error(ys_loop[:, t], x_t) < 1e-5, t


def test_cell_layout_dtypes_and_policy():
    model = RGLRU(4, d_conv=2, expand=2, bias=True, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    cell = model.cell()
    H, D = 4, 8
    assert {name: value.shape for name, value in cell.params.items()} == {
        "Wg": (H, D), "Wg_b": (D,), "Wi": (H, D), "Wi_b": (D,), "conv_w0": (D,), "conv_w1": (D,), "conv_b": (D,),
        "Wr": (D, D), "Wr_b": (D,), "Wig": (D, D), "Wig_b": (D,), "a_log": (D,), "Wout": (D, H), "Wout_b": (H,),
    }
    assert all(value.dtype == jnp.float32 for value in cell.params.values())
    assert cell.pad_values == {} and cell.blockable  # a split run takes blocks of rows beyond 33 rows
    cache = model.allocate_inference_cache(3)
    state = model.cell_state(cache)
    assert set(state) == {"conv0", "conv1", "h"}
    chex.assert_shape([state["conv1"], state["h"]], [(3, D), (3, D)])
    assert_caches_close(model.cell_cache(state, cache), cache)
    # measured on an H200: the split rollout faster than the XLA program up to B=32, the one-step kernel mixed
    assert cell.policy.slower_reason("rollout", 512) is None and "H200" in cell.policy.evidence
    assert cell.policy.slower_reason("rollout", 513) is not None
    assert cell.policy.slower_reason("step", 1) is not None
    assert cell.split.params["Wr"] == 0 and cell.split.state == {"h": 0, "conv0": 0, "conv1": 0}


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
def test_cell_lowers_to_triton(lower_for_h100):
    model = RGLRU(5, d_conv=3, expand=2, bias=True, rngs=nnx.Rngs(0))
    leaves, treedef = jax.tree.flatten(model)
    config = KernelConfig(use_kernels="always", interpret=False)

    def given_tokens(leaves, xs, cache):
        m = jax.tree.unflatten(treedef, leaves)
        return fg.run_cell(m.cell(), m.cell_state(cache), xs[:, 0], xs.shape[1], config=config, xs=xs)

    lower_for_h100(given_tokens, leaves, jnp.ones((2, 4, 5)), model.allocate_inference_cache(2))


@pytest.mark.parametrize("seed", [0, 1])
def test_forward_matches_step_on_random_configurations(seed):
    rng = np.random.default_rng(seed)
    H, K, expand = int(rng.integers(2, 7)), int(rng.integers(1, 5)), int(rng.integers(1, 3))
    model = RGLRU(
        H, d_conv=K, expand=expand, c=float(rng.uniform(1, 10)), bias=bool(rng.integers(2)),
        conv_bias=bool(rng.integers(2)), chunk_size=int(rng.integers(1, 6)), rngs=nnx.Rngs(seed),
    )
    x = rng.standard_normal((2, 12, H)).astype(np.float32)
    y, cache_fwd = model(x, return_cache=True)
    y_step, cache = run_steps(model, x)
    assert relative_error(y, y_step) < 1e-5, (H, K, expand)
    for key in ("conv_state", "lrnn_state"):
        np.testing.assert_allclose(cache_fwd[key], cache[key], rtol=1e-5, atol=1e-6)


def test_bad_arguments_raise_clear_errors():
    for bad in ((0.0, 0.5), (0.5, 1.0), (0.9, 0.8)):
        with pytest.raises(ValueError, match=r"a_init_range must satisfy 0 < lo <= hi < 1"):
            RGLRU(4, a_init_range=bad, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="c must be > 0, got -1"):
        RGLRU(4, c=-1.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="d_conv must be a positive integer, got 0"):
        RGLRU(4, d_conv=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="RGLRU has no event mode"):
        RGLRU(4, rngs=nnx.Rngs(0))(np.zeros((1, 3, 4), np.float32), integration_timesteps=np.ones((1, 3), np.float32))


def test_float64_tokens_with_a_float32_cache_keep_the_cache_dtype():
    """The cell's state keeps the cache's dtype: float64 tokens from a float32 cache give a float32 cache (the
    state rounded to float32 after every token) and float64 outputs close to those from a float64 cache."""
    with jax.enable_x64(True):
        model = RGLRU(4, d_conv=2, rngs=nnx.Rngs(0))
        x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 4)))
        y32, cache32, states = model.multi_step(x, model.allocate_inference_cache(2), return_states=True)
        y64, cache64 = model.multi_step(x, model.allocate_inference_cache(2, dtype=jnp.float64))
        assert y32.dtype == y64.dtype == jnp.float64
        for key in cache32:
            assert cache32[key].dtype == states[key].dtype == jnp.float32 and cache64[key].dtype == jnp.float64
            np.testing.assert_allclose(cache32[key], cache64[key], rtol=1e-6, atol=1e-7)
        assert relative_error(y32, y64) < 1e-6
