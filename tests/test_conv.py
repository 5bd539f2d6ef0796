"""Causal depthwise conv against a float64 NumPy reference, its rolling state (also from a given
history and at per-row lengths), and the cells' conv step (per row and for a block of rows)."""

from __future__ import annotations

import chex
import jax
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
    # the cells' step over a block of rows (the batch), from a zero history
    params = conv.conv_cell_params(jnp.asarray(w), jnp.asarray(b))
    assert set(params) == {"conv_w0", "conv_w1", "conv_w2", "conv_b"} and conv.conv_taps(params) == 3
    zeros = jnp.zeros((2, 5, 3))
    cell_state = conv.conv_cell_state(zeros)
    steps = []
    for t in range(9):
        y_t, cell_state = conv.conv_cell_step(params, cell_state, jnp.asarray(x[:, t]), 3)
        steps.append(y_t)
    np.testing.assert_allclose(np.stack(steps, 1), ref, rtol=1e-5, atol=1e-5)
    state = conv.conv_cell_cache(cell_state, zeros)
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


def test_cell_step_one_row_without_bias_and_state_round_trip():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 6, 4))
    w = rng.standard_normal((4, 2))
    params = conv.conv_cell_params(jnp.asarray(w, jnp.bfloat16))  # no bias; bfloat16 taps become float32
    assert set(params) == {"conv_w0", "conv_w1"} and all(p.dtype == jnp.float32 for p in params.values())
    ref = numpy_conv(x, np.asarray(jnp.asarray(w, jnp.bfloat16), np.float64), 0.0)
    # one row, no leading axis (a kernel program's view), from the history after 2 tokens
    head = conv.conv_state_after(jnp.asarray(x[:, :2], jnp.float32), 2)
    for row in range(3):
        state = conv.conv_cell_state(head[row])
        assert set(state) == {"conv0", "conv1"} and state["conv0"].shape == (4,)
        for t in range(2, 6):
            y_t, state = conv.conv_cell_step(params, state, jnp.asarray(x[row, t], jnp.float32), 2)
            np.testing.assert_allclose(y_t, ref[row, t], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(conv.conv_cell_cache(state, jnp.zeros((4, 2))), x[row, 4:6].T, rtol=1e-6)
    # a history in a wider dtype keeps it; the cache takes the dtype of `like`
    with jax.enable_x64(True):
        wide = conv.conv_cell_state(jnp.asarray(x[:, :, :2]).transpose(0, 2, 1))
        assert wide["conv0"].dtype == jnp.float64
        back = conv.conv_cell_cache(wide, jnp.zeros((3, 2, 6), jnp.float32))
        assert back.dtype == jnp.float32
        np.testing.assert_allclose(back, np.moveaxis(x[:, :, :2], 1, 2), rtol=1e-6)


def test_forward_and_state_continue_from_a_given_history():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 8, 4)).astype(np.float32)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    ref = numpy_conv(x.astype(np.float64), w.astype(np.float64), 0.0)
    full = conv.conv_state_after(jnp.asarray(x), 3)
    for split in (1, 2, 5):
        head = conv.conv_state_after(jnp.asarray(x[:, :split]), 3)
        np.testing.assert_allclose(conv.causal_conv1d(jnp.asarray(x[:, split:]), w, conv_state=head), ref[:, split:],
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(conv.conv_state_after(jnp.asarray(x[:, split:]), 3, conv_state=head), full)
        # per-row lengths of the continuation: all, one token, none (the given history itself)
        rows = conv.conv_state_after(jnp.asarray(x[:, split:]), 3, lengths=jnp.array([8 - split, 1, 0]), conv_state=head)
        np.testing.assert_array_equal(rows[0], full[0])
        np.testing.assert_array_equal(rows[1], conv.conv_state_after(jnp.asarray(x[:, :split + 1]), 3)[1])
        np.testing.assert_array_equal(rows[2], head[2])
