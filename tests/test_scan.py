"""The chunked scan engine against a float64 NumPy loop, for every chunking."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrnnx_jax.core import scan as scan_lib


def numpy_recurrence(a, b, h0, mask):
    h = h0.astype(np.complex128)
    out = []
    for t in range(a.shape[1]):
        m = mask[:, t][:, None]
        h = np.where(m, a[:, t] * h + b[:, t], h)
        out.append(h)
    return np.stack(out, 1), h


def random_problem(seed, batch=3, length=11, state=4):
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.3, 1.0, (batch, length, state)) * np.exp(1j * rng.uniform(-3, 3, (batch, length, state)))
    b = rng.standard_normal((batch, length, state)) + 1j * rng.standard_normal((batch, length, state))
    h0 = rng.standard_normal((batch, state)) + 1j * rng.standard_normal((batch, state))
    mask = np.arange(length)[None, :] < np.array([length, 6, 1])[:batch, None]
    return a.astype(np.complex64), b.astype(np.complex64), h0.astype(np.complex64), mask


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 4, 11, 64])
def test_chunked_scan_matches_numpy(chunk_size):
    a, b, h0, mask = random_problem(0)
    ys, h_last = scan_lib.chunked_scan(
        lambda c: (c[0], c[1]), lambda h, c: h * 2.0, (a, b), jnp.asarray(h0), jnp.asarray(mask), chunk_size
    )
    ref_h, ref_last = numpy_recurrence(a, b, h0, mask)
    chex.assert_shape(ys, a.shape)
    chex.assert_shape(h_last, h0.shape)
    np.testing.assert_allclose(ys, 2 * ref_h, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(h_last, ref_last, rtol=2e-5, atol=2e-5)


def test_linear_scan_with_initial_state():
    a, b, h0, _ = random_problem(1)
    ref, _ = numpy_recurrence(a, b, h0, np.ones(a.shape[:2], bool))
    np.testing.assert_allclose(scan_lib.linear_scan(a, b, h0=h0), ref, rtol=2e-5, atol=2e-5)


def test_chunked_and_unchunked_gradients_agree():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 13, 3)), jnp.float32)
    decay = jnp.asarray(rng.uniform(-2, 0, (3,)), jnp.float32)

    def loss(params, xx, chunk_size):
        d, w = params

        def coefficients(chunk):
            return jnp.exp(d * jax.nn.softplus(chunk[0])), chunk[0] * w

        ys, h = scan_lib.chunked_scan(coefficients, lambda h, c: h * c[0], (xx,), jnp.zeros((2, 3)), None, chunk_size)
        return jnp.sum(ys**2) + jnp.sum(h)

    params = (decay, jnp.float32(0.7))
    grads = {c: jax.grad(loss, argnums=(0, 1))(params, x, c) for c in (None, 1, 4)}
    for c in (1, 4):
        for g, g_ref in zip(jax.tree.leaves(grads[c]), jax.tree.leaves(grads[None])):
            np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)
