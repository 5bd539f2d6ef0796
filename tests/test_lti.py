"""The diagonal LTI engine: FFT and scan paths against a float64 NumPy recurrence."""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from lrnnx_jax.core import lti


def numpy_ssm(x, A_bar, B_bar, C, h0):
    h = h0.astype(np.complex128)
    ys = []
    for t in range(x.shape[1]):
        a = A_bar[:, t] if A_bar.ndim == 3 else A_bar
        h = a * h + x[:, t] @ B_bar.T
        ys.append((h @ C.T).real)
    y = np.stack(ys, 1) if ys else np.zeros((x.shape[0], 0, C.shape[0]))
    return y, h


def random_system(seed, batch, length, h_in, n, h_out):
    rng = np.random.default_rng(seed)
    A_bar = rng.uniform(0.5, 0.99, n) * np.exp(1j * rng.uniform(-np.pi, np.pi, n))
    B_bar = rng.standard_normal((n, h_in)) + 1j * rng.standard_normal((n, h_in))
    C = rng.standard_normal((h_out, n)) + 1j * rng.standard_normal((h_out, n))
    x = rng.standard_normal((batch, length, h_in))
    h0 = rng.standard_normal((batch, n)) + 1j * rng.standard_normal((batch, n))
    return x, A_bar, B_bar, C, h0


# (h_in, n, h_out): the first shape makes the FFT path project first, the second builds the kernel first
SHAPES = [(7, 3, 5), (2, 24, 2)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["fft", "scan"])
def test_paths_match_numpy_recurrence(method, shape):
    h_in, n, h_out = shape
    x, A_bar, B_bar, C, h0 = random_system(0, 3, 37, h_in, n, h_out)
    ref_y, ref_h = numpy_ssm(x, A_bar, B_bar, C, h0)
    args = [jnp.asarray(v, dt) for v, dt in ((x, jnp.float32), (A_bar, jnp.complex64), (B_bar, jnp.complex64), (C, jnp.complex64))]
    y, h = lti.diagonal_forward(*args, h0=jnp.asarray(h0, jnp.complex64), method=method, chunk_size=8, return_state=True)
    chex.assert_shape(y, (3, 37, h_out))
    chex.assert_type(y, jnp.float32)
    scale = np.abs(ref_y).max()
    np.testing.assert_allclose(y, ref_y, atol=2e-5 * scale)
    np.testing.assert_allclose(h, ref_h, atol=2e-5 * np.abs(ref_h).max())


def test_both_fft_contraction_orders_are_exercised():
    costs = [lti._fft_costs(3, 37, n, h_in, h_out) for h_in, n, h_out in SHAPES]
    assert costs[0][0] <= costs[0][1] and costs[1][0] > costs[1][1]


@pytest.mark.parametrize("method", ["fft", "scan"])
def test_state_at_each_rows_length(method):
    x, A_bar, B_bar, C, _ = random_system(1, 3, 20, 4, 5, 4)
    lengths = np.array([20, 9, 0])
    mask = np.arange(20)[None] < lengths[:, None]
    x = np.where(mask[..., None], x, 0.0)
    _, h = lti.diagonal_forward(
        jnp.asarray(x, jnp.float32), jnp.asarray(A_bar, jnp.complex64), jnp.asarray(B_bar, jnp.complex64),
        jnp.asarray(C, jnp.complex64), mask=jnp.asarray(mask), lengths=jnp.asarray(lengths), method=method,
        return_state=True,
    )
    for b, n in enumerate(lengths):
        _, ref_h = numpy_ssm(x[b : b + 1, :n], A_bar, B_bar, C, np.zeros((1, 5)))
        np.testing.assert_allclose(h[b], ref_h[0], atol=1e-5 * max(1.0, np.abs(ref_h).max()))


def test_time_varying_system_uses_the_scan():
    x, A_bar, B_bar, C, h0 = random_system(2, 2, 15, 3, 4, 3)
    rng = np.random.default_rng(3)
    A_t = A_bar[None, None, :] ** rng.uniform(0.2, 3.0, (2, 15, 1))
    ref_y, _ = numpy_ssm(x, A_t, B_bar, C, h0)
    y, _ = lti.diagonal_forward(jnp.asarray(x, jnp.float32), jnp.asarray(A_t, jnp.complex64), jnp.asarray(B_bar, jnp.complex64),
                                jnp.asarray(C, jnp.complex64), h0=jnp.asarray(h0, jnp.complex64))
    np.testing.assert_allclose(y, ref_y, atol=2e-5 * np.abs(ref_y).max())
    with pytest.raises(ValueError, match="method='fft' needs a time-invariant system"):
        lti.resolve_method("fft", 15, True)
    with pytest.raises(ValueError, match=r"method must be one of \('auto', 'fft', 'scan'\), got 'conv'"):
        lti.resolve_method("conv", 15, False)


def test_step_matches_numpy():
    x, A_bar, B_bar, C, h0 = random_system(4, 2, 1, 3, 4, 5)
    ref_y, ref_h = numpy_ssm(x, A_bar, B_bar, C, h0)
    y, h = lti.diagonal_step(jnp.asarray(h0, jnp.complex64), jnp.asarray(x[:, 0], jnp.float32), jnp.asarray(A_bar, jnp.complex64),
                             jnp.asarray(B_bar, jnp.complex64), jnp.asarray(C, jnp.complex64))
    np.testing.assert_allclose(y, ref_y[:, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h, ref_h, rtol=1e-5, atol=1e-5)
