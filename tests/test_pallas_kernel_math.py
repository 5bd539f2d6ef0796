"""pallas_kernels.kernel_math: the kernels' discretizations against the single definitions.

The core functions are evaluated in float64 (``enable_x64``); the in-kernel versions
run in float32 on realistic steps, real and complex, with and without event mode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrnnx_jax.core import discretization as disc
from lrnnx_jax.models.ltv.rglru import rglru_coefficients
from lrnnx_jax.models.ltv.s7 import s7_transition
from pallas_kernels import complex_lib as cl
from pallas_kernels import kernel_math as km


def _relative(got, expected):
    got = np.asarray(cl.merge(got) if cl.is_planes(got) else got, np.complex128)
    expected = np.asarray(expected, np.complex128)
    return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))


def _inputs(complex_A: bool):
    rng = np.random.default_rng(0)
    n = 256
    A = -np.exp(rng.uniform(-2, 2.5, n))  # Re A in [-12, -0.1]
    if complex_A:
        A = A + 1j * rng.uniform(-40, 40, n)
    delta = np.exp(rng.uniform(np.log(1e-3), np.log(0.5), n))
    delta_A = delta * rng.uniform(0.05, 2.0, n)
    return A, delta, delta_A


# no_discretization has no event mode; async exists only in event mode
CASES = [(n, e) for n in ("zoh", "async", "bilinear", "dirac", "mamba", "no_discretization") for e in (False, True)
         if not (n == "no_discretization" and e) and not (n == "async" and not e)]


@pytest.mark.parametrize("complex_A", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("name,event", CASES, ids=[f"{n}{'-event' if e else ''}" for n, e in CASES])
def test_discretize_matches_core(name, complex_A, event):
    A, delta, delta_A = _inputs(complex_A)
    with jax.enable_x64(True):
        A_bar, gamma = disc.get_discretization(name)(jnp.asarray(A), jnp.asarray(delta), delta_A=jnp.asarray(delta_A) if event else None)
        A_bar, gamma = np.asarray(A_bar), np.broadcast_to(np.asarray(gamma), A.shape)
    A32 = cl.split(A) if complex_A else jnp.asarray(A, jnp.float32)
    d32 = jnp.asarray(delta, jnp.float32)
    k_A_bar, k_gamma = km.discretize(name, A32, d32, jnp.asarray(delta_A, jnp.float32) if event else None)
    assert cl.is_planes(k_A_bar) == complex_A
    assert _relative(k_A_bar, A_bar) < 2e-6
    assert _relative(np.broadcast_to(np.asarray(cl.merge(k_gamma) if cl.is_planes(k_gamma) else k_gamma), A.shape), gamma) < 2e-6


def test_gated_transitions_match_the_models():
    rng = np.random.default_rng(1)
    a_log = np.log(rng.uniform(0.9, 0.999, 128))
    step = rng.uniform(0.5, 8.0, 128)
    with jax.enable_x64(True):
        A_bar, gamma = rglru_coefficients(1.0, jnp.asarray(step), 1.0, jnp.asarray(a_log), 1.0)
        s7_bar = s7_transition(jnp.asarray(step - 4.0))
    k_A_bar, k_gamma = km.discretize("rglru", jnp.asarray(a_log, jnp.float32), jnp.asarray(step, jnp.float32))
    assert _relative(k_A_bar, A_bar) < 2e-6 and _relative(k_gamma, gamma) < 2e-6
    k_s7, one = km.discretize("s7", None, jnp.asarray(step - 4.0, jnp.float32))
    assert _relative(k_s7, s7_bar) < 2e-6 and one == 1.0


def test_softplus_and_silu():
    x = jnp.linspace(-30.0, 30.0, 601)
    np.testing.assert_allclose(km.softplus(x), jax.nn.softplus(x), rtol=2e-6, atol=1e-12)
    np.testing.assert_allclose(km.silu(x), jax.nn.silu(x), rtol=2e-6, atol=1e-12)


def test_unknown_name_raises():
    with pytest.raises(ValueError, match="unknown discretization 'euler'"):
        km.discretize("euler", jnp.ones(3), jnp.ones(3))
