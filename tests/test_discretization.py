"""Discretizations against an independent float64 NumPy implementation of their formulas."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrnnx_jax.core import discretization as disc


def numpy_reference(name, A, delta, tau=None, delta_A=None):
    """Textbook formulas in float64/complex128 (written independently of the library)."""
    dA = delta_A if delta_A is not None else (delta * tau if tau is not None else delta)
    if name in ("zoh", "async"):
        return np.exp(dA * A), (np.exp(delta * A) - 1) / A
    if name == "bilinear":
        return (1 + dA * A / 2) / (1 - dA * A / 2), delta / (1 - delta * A / 2)
    if name == "dirac":
        return np.exp(dA * A), np.ones(np.broadcast(A, delta).shape)
    if name == "mamba":
        return np.exp(dA * A), np.broadcast_to(delta, np.broadcast(A, delta).shape)
    if name == "no_discretization":
        return np.broadcast_to(A, np.broadcast(A, delta).shape), np.ones(np.broadcast(A, delta).shape)
    raise KeyError(name)


def random_system(seed, complex_A):
    rng = np.random.default_rng(seed)
    re = -rng.uniform(0.05, 3.0, (5, 7))
    A = re + 1j * rng.uniform(-4, 4, (5, 7)) if complex_A else re
    delta = rng.uniform(1e-3, 0.5, (5, 1))  # realistic steps, not only tiny ones
    tau = rng.uniform(0.1, 3.0, (5, 1))
    return A, delta, tau


@pytest.mark.parametrize("complex_A", [False, True])
@pytest.mark.parametrize("name", ["zoh", "bilinear", "dirac", "mamba", "no_discretization"])
def test_matches_float64_reference(name, complex_A):
    A, delta, _ = random_system(0, complex_A)
    dtype = jnp.complex64 if complex_A else jnp.float32
    A_bar, gamma = disc.get_discretization(name)(jnp.asarray(A, dtype), jnp.asarray(delta, jnp.float32))
    ref_A, ref_g = numpy_reference(name, A, delta)
    chex.assert_shape((A_bar, gamma), (5, 7))
    chex.assert_type(A_bar, dtype)
    np.testing.assert_allclose(A_bar, ref_A, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(gamma, ref_g, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("complex_A", [False, True])
@pytest.mark.parametrize("name", ["zoh", "async", "bilinear", "dirac", "mamba"])
def test_event_mode_scales_only_the_state_propagation(name, complex_A):
    A, delta, tau = random_system(1, complex_A)
    with jax.enable_x64(True):
        A_bar, gamma = disc.discretize(name, jnp.asarray(A), jnp.asarray(delta), jnp.asarray(tau))
        ref_A, ref_g = numpy_reference(name, A, delta, tau=tau)
        np.testing.assert_allclose(A_bar, ref_A, rtol=1e-12)
        np.testing.assert_allclose(gamma, ref_g, rtol=1e-12)
        # an explicit delta_A (Mamba's event mode) gives the same as tau * delta
        A_bar2, gamma2 = disc.discretize(name, jnp.asarray(A), jnp.asarray(delta), delta_A=jnp.asarray(delta * tau))
        np.testing.assert_allclose(A_bar2, ref_A, rtol=1e-12)
        np.testing.assert_allclose(gamma2, ref_g, rtol=1e-12)


def test_stable_systems_stay_stable():
    """|A_bar| < 1 for Re A < 0 (lrnnx's sign-flipped bilinear fails this)."""
    A, delta, _ = random_system(2, True)
    for name in ("zoh", "bilinear", "dirac", "mamba"):
        A_bar, _ = disc.discretize(name, jnp.asarray(A, jnp.complex64), jnp.asarray(delta, jnp.float32))
        assert np.all(np.abs(A_bar) < 1), name


def test_timesteps_of_one_reproduce_plain_discretization():
    A, delta, _ = random_system(3, True)
    for name in ("zoh", "bilinear", "dirac"):
        plain = disc.discretize(name, A, delta)
        event = disc.discretize(name, A, delta, np.ones_like(delta))
        np.testing.assert_allclose(event[0], plain[0], rtol=1e-6)
        np.testing.assert_allclose(event[1], plain[1], rtol=1e-6)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown discretization 'foh'.*'bilinear'.*'zoh'"):
        disc.get_discretization("foh")
    with pytest.raises(ValueError, match=r"expected one of \['dirac', 'zoh'\]"):
        disc.get_discretization("bilinear", allowed=("zoh", "dirac"))


def test_async_needs_timesteps_and_no_discretization_rejects_them():
    A, delta, tau = random_system(4, True)
    with pytest.raises(ValueError, match="'async' discretization needs integration_timesteps"):
        disc.discretize("async", A, delta)
    with pytest.raises(ValueError, match="cannot use integration_timesteps"):
        disc.discretize("no_discretization", A, delta, tau)
    with pytest.raises(ValueError, match="either integration_timesteps or delta_A"):
        disc.discretize("zoh", A, delta, tau, delta_A=delta)
