"""pallas_kernels.causal_conv: the depthwise causal conv + SiLU kernels against the pure-JAX reference and float64
NumPy (interpret mode on the CPU), their Triton lowering, dispatch and argument checks, and Mamba's forward on them.

Both paths compute the same float32 products; the kernels sum the taps in the same order, and only the sums over
time and batch of the parameters' gradients (per tile, then across tiles) reorder roundings: tolerance 1e-5.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import relative_error
from lrnnx_jax.core import conv
from lrnnx_jax.models.ltv.mamba import Mamba
from pallas_kernels import KernelConfig
from pallas_kernels import causal_conv as cc

ALWAYS = KernelConfig(use_kernels="always")  # interpret mode on the CPU
NEVER = KernelConfig(use_kernels="never")
TOL = 1e-5
#: bfloat16 x: both paths round u and dx to bfloat16 once, from float32 values within 1e-6 of each other
BF16_TOL = 2.0**-7
TRITON_DEPRECATION = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")


def _arrays(seed, batch=2, length=45, dim=20, width=4, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, length, dim)), dtype)
    weight = jnp.asarray(rng.standard_normal((dim, width)) * 0.5, jnp.float32)
    bias = jnp.asarray(rng.standard_normal(dim), jnp.float32)
    return x, weight, bias


def _numpy_conv_silu(x, weight, bias):
    """float64 NumPy: ``c_t = sum_k w[:, k] x_{t-(K-1)+k} + b``, ``silu(c)``."""
    x, weight = np.asarray(x, np.float64), np.asarray(weight, np.float64)
    K = weight.shape[1]
    c = np.zeros_like(x) + (0.0 if bias is None else np.asarray(bias, np.float64))
    for t in range(x.shape[1]):
        for k in range(K):
            s = t - (K - 1) + k
            if s >= 0:
                c[:, t] += weight[:, k] * x[:, s]
    return c / (1.0 + np.exp(-c))


def _value_and_grads(fn, x, weight, bias, seed=3):
    rng = np.random.default_rng(seed)
    w_out = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    loss = lambda x, w, b: jnp.sum(fn(x, w, b).astype(jnp.float32) * w_out)  # noqa: E731
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, weight, bias)


def _kernels(x, w, b):
    return cc.causal_conv_silu(x, w, b, config=ALWAYS)


@pytest.mark.parametrize("width", [4, 3, 1])
def test_reference_matches_float64_numpy_and_the_models_conv(width):
    x, weight, bias = _arrays(0, width=width)
    u = cc.reference(x, weight, bias)
    chex.assert_shape(u, x.shape)
    chex.assert_type(u, jnp.float32)
    assert relative_error(u, _numpy_conv_silu(x, weight, bias)) < TOL
    assert relative_error(u, jax.nn.silu(conv.causal_conv1d(x, weight, bias))) < TOL
    assert relative_error(cc.reference(x, weight), _numpy_conv_silu(x, weight, None)) < TOL


@pytest.mark.parametrize("blocks", [None, (8, 16)])
@pytest.mark.parametrize("width", [4, 3])
def test_kernels_match_the_reference_with_gradients(monkeypatch, blocks, width):
    """L = 45 and D = 20: ragged tiles in time and channels; with blocks (8, 16) several of each (6 x 2 per row)."""
    if blocks is not None:
        monkeypatch.setattr(cc, "BLOCK_T", blocks[0])
        monkeypatch.setattr(cc, "BLOCK_D", blocks[1])
    x, weight, bias = _arrays(1, width=width)
    value_k, grads_k = _value_and_grads(_kernels, x, weight, bias)
    value_r, grads_r = _value_and_grads(cc.reference, x, weight, bias)
    assert abs(float(value_k) - float(value_r)) <= TOL * abs(float(value_r))
    chex.assert_trees_all_equal_shapes_and_dtypes(grads_k, grads_r)
    for ours, theirs in zip(grads_k, grads_r):
        assert relative_error(ours, theirs) < TOL


def test_without_a_bias_and_in_bfloat16():
    x, weight, _ = _arrays(2, dtype=jnp.bfloat16)
    u = cc.causal_conv_silu(x, weight, config=ALWAYS)
    chex.assert_type(u, jnp.bfloat16)
    assert relative_error(u, _numpy_conv_silu(x, weight, None)) < BF16_TOL
    grads_k = jax.grad(lambda x, w: jnp.sum(cc.causal_conv_silu(x, w, config=ALWAYS).astype(jnp.float32) ** 2),
                       argnums=(0, 1))(x, weight)
    grads_r = jax.grad(lambda x, w: jnp.sum(cc.reference(x, w).astype(jnp.float32) ** 2), argnums=(0, 1))(x, weight)
    chex.assert_trees_all_equal_shapes_and_dtypes(grads_k, grads_r)
    assert all(relative_error(a, b) < BF16_TOL for a, b in zip(grads_k, grads_r))


def test_dispatch():
    """"never" and "auto" off the GPU take the reference; "always" takes the kernels (interpret mode here)."""
    x, weight, bias = _arrays(4)
    assert not cc.choose(x, weight, bias, config=NEVER) and cc.choose(x, weight, bias, config=ALWAYS)
    assert not cc.choose(x, weight, bias, config=KernelConfig())
    assert (cc.unsupported_reason(x.astype(jnp.complex64), weight)
            == "x of dtype complex64 (supported: float32, bfloat16, float16)")
    assert cc.unsupported_reason(x, jnp.ones((20, 9))) == "a kernel width of 9 > 8"
    with pytest.warns(RuntimeWarning, match="width of 9"):
        u = cc.causal_conv_silu(x, jnp.ones((20, 9)) * 0.1, config=ALWAYS)
    assert relative_error(u, _numpy_conv_silu(x, np.ones((20, 9)) * 0.1, None)) < TOL


def test_bad_arguments():
    x, weight, bias = _arrays(5)
    with pytest.raises(ValueError, match=r"x must be \(batch, L, D\)"):
        cc.causal_conv_silu(x[0], weight)
    with pytest.raises(ValueError, match=r"weight must have shape \(20, K\)"):
        cc.causal_conv_silu(x, weight[:4])
    with pytest.raises(ValueError, match=r"bias must have shape \(20,\), got \(3,\)"):
        cc.causal_conv_silu(x, weight, bias[:3])
    with pytest.raises(TypeError, match="x must have a real floating dtype, got int32"):
        cc.causal_conv_silu(x.astype(jnp.int32), weight)


@TRITON_DEPRECATION
def test_kernels_lower_to_triton(lower_for_h100):
    """Forward and backward (bfloat16 x, K = 4, ragged L = 45 and D = 200)."""
    config = KernelConfig(use_kernels="always", interpret=False)
    x = jnp.ones((2, 45, 200), jnp.bfloat16)
    loss = lambda x, w, b: jnp.sum(cc.causal_conv_silu(x, w, b, config=config).astype(jnp.float32))  # noqa: E731
    lower_for_h100(jax.value_and_grad(loss, argnums=(0, 1, 2)), x, jnp.ones((200, 4)), jnp.ones((200,)), kernels=2)


def test_mamba_forward_and_gradients_on_the_conv_kernels():
    """Mamba with ``use_kernels="always"`` runs the conv kernels (and the scan's) in its forward: the same output and
    gradients as its XLA path; with a cache (a conv history) it keeps the XLA conv."""
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((2, 12, 8)), jnp.float32)
    kw = dict(d_model=8, d_state=4, d_conv=4, expand=2, chunk_size=4)
    kernels = Mamba(**kw, kernel_config=ALWAYS, rngs=nnx.Rngs(0))
    xla = Mamba(**kw, kernel_config=NEVER, rngs=nnx.Rngs(0))
    calls = []
    original = cc.kernel_conv
    try:
        cc.kernel_conv = lambda *a, **k: calls.append(1) or original(*a, **k)
        grads_k = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(kernels)
    finally:
        cc.kernel_conv = original
    grads_r = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(xla)
    assert calls, "the conv kernels were not used"
    assert relative_error(kernels(x), xla(x)) < TOL
    for (path, ours), (_, theirs) in zip(jax.tree_util.tree_leaves_with_path(grads_k),
                                         jax.tree_util.tree_leaves_with_path(grads_r)):
        if not np.any(np.asarray(theirs)):  # a parameter outside this configuration (event mode's dtA_proj)
            assert not np.any(np.asarray(ours)), jax.tree_util.keystr(path)
        else:
            assert relative_error(ours, theirs) < TOL, jax.tree_util.keystr(path)
