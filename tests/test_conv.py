"""Causal depthwise conv against a float64 NumPy reference, and its rolling state."""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np

from lrnnx_jax.core import conv


def numpy_conv(x, w, b):
    K = w.shape[1]
    padded = np.concatenate([np.zeros((x.shape[0], K - 1, x.shape[2])), x], 1)
    return np.stack([np.einsum("bkd,dk->bd", padded[:, t : t + K], w) for t in range(x.shape[1])], 1) + b


def test_forward_step_and_state_agree_with_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 5)).astype(np.float32)
    w = rng.standard_normal((5, 3)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    ref = numpy_conv(x.astype(np.float64), w.astype(np.float64), b)
    y = conv.causal_conv1d(jnp.asarray(x), w, b)
    chex.assert_shape(y, x.shape)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    state = jnp.zeros((2, 5, 3))
    steps = []
    for t in range(9):
        y_t, state = conv.causal_conv1d_step(x[:, t], state, w, b)
        steps.append(y_t)
    np.testing.assert_allclose(np.stack(steps, 1), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(conv.conv_state_after(jnp.asarray(x), 3), state)
    # continuing from a prefix's state, and the state at per-row lengths
    head = conv.conv_state_after(jnp.asarray(x[:, :4]), 3)
    np.testing.assert_allclose(conv.causal_conv1d(jnp.asarray(x[:, 4:]), w, b, head), ref[:, 4:], rtol=1e-5, atol=1e-5)
    per_row = conv.conv_state_after(jnp.asarray(x), 3, lengths=jnp.array([4, 9]))
    np.testing.assert_array_equal(per_row[0], head[0])
    np.testing.assert_array_equal(per_row[1], state[1])
    # a length shorter than the kernel keeps zeros of the empty history
    short = conv.conv_state_after(jnp.asarray(x), 3, lengths=jnp.array([1, 0]))
    np.testing.assert_array_equal(short[0], np.stack([np.zeros(5), np.zeros(5), x[0, 0]], -1))
    np.testing.assert_array_equal(short[1], np.zeros((5, 3)))
