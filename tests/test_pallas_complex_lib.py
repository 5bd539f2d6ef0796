"""pallas_kernels.complex_lib: planes arithmetic against NumPy complex128."""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np

from pallas_kernels import complex_lib as cl


def _complex(rng, shape, scale=1.0):
    return scale * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))


def _close(planes, expected, rtol=2e-6):
    got = np.asarray(planes.re, np.float64) + 1j * np.asarray(planes.im, np.float64)
    scale = np.maximum(np.abs(expected), 1e-3)
    assert np.max(np.abs(got - expected) / scale) < rtol


def test_split_merge_round_trip():
    z = _complex(np.random.default_rng(0), (3, 7)).astype(np.complex64)
    p = cl.split(jnp.asarray(z))
    chex.assert_type([p.re, p.im], jnp.float32)
    chex.assert_shape([p.re, p.im], (3, 7))
    np.testing.assert_array_equal(cl.merge(p), z)
    real = cl.split(jnp.asarray(z.real), jnp.bfloat16)
    chex.assert_type([real.re, real.im], jnp.bfloat16)
    assert not np.any(np.asarray(real.im))


def test_arithmetic_matches_complex128():
    rng = np.random.default_rng(1)
    a, b = _complex(rng, (64,)), _complex(rng, (64,))
    r = rng.standard_normal(64)
    pa, pb = cl.split(a), cl.split(b)
    _close(cl.add(pa, pb), a + b)
    _close(cl.sub(pa, pb), a - b)
    _close(cl.mul(pa, pb), a * b)
    _close(cl.div(pa, pb), a / b, rtol=1e-5)
    _close(cl.div(jnp.asarray(r, jnp.float32), pb), r / b, rtol=1e-5)
    _close(cl.exp(pa), np.exp(a))
    _close(cl.scale(pa, jnp.asarray(r, jnp.float32)), a * r)
    _close(cl.mul(jnp.asarray(r, jnp.float32), pb), r * b)
    _close(cl.add_real(pa, 2.5), a + 2.5)
    _close(cl.where(r > 0, pa, 0.0), np.where(r > 0, a, 0))


def test_expm1_is_accurate_for_small_arguments():
    rng = np.random.default_rng(2)
    for scale in (1e-6, 1e-3, 1.0):
        z = _complex(rng, (64,), scale)
        _close(cl.expm1(cl.split(z)), np.expm1(z.real) * np.cos(z.imag) - 2 * np.sin(z.imag / 2) ** 2
               + 1j * np.exp(z.real) * np.sin(z.imag), rtol=2e-5)
        # and against the definition where it is well conditioned
        if scale == 1.0:
            _close(cl.expm1(cl.split(z)), np.exp(z) - 1, rtol=2e-5)


def test_real_arrays_take_the_real_path():
    x = jnp.asarray(np.random.default_rng(3).standard_normal(8), jnp.float32)
    for got, expected in ((cl.mul(x, x), x * x), (cl.exp(x), jnp.exp(x)), (cl.expm1(x), jnp.expm1(x)),
                          (cl.div(x, 2.0), x / 2), (cl.add_real(x, 1.0), x + 1), (cl.real(x), x)):
        assert not cl.is_planes(got)
        np.testing.assert_allclose(got, expected, rtol=1e-6)
