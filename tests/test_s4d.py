"""S4D: ZOH and bilinear discretizations and both forward paths (from the zero state or a given one) against a
float64 NumPy recurrence. The block, its step and its cell on the kernels: tests/test_s4_layer.py."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import relative_error
from lrnnx_jax.models.lti import s4d
from lrnnx_jax.models.lti.s4d import S4D
from zoo import ZOO


def float64_copy(model):
    graphdef, state = nnx.split(model)
    widen = lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a  # noqa: E731
    return nnx.merge(graphdef, jax.tree.map(widen, state))


def numpy_discretize(params, disc):
    """lrnnx's S4DKernel._setup_step formulas, float64: ``(dA, dB (H, N/2), C (c, H, N/2))``."""
    A, B, C = (np.asarray(a, np.complex128) for a in (params.A, params.B, params.C))
    dtA = np.asarray(params.dt, np.float64) * A
    if disc == "zoh":
        return np.exp(dtA), B * (np.exp(dtA) - 1) / A, C
    return (1 + dtA / 2) / (1 - dtA / 2), B * np.asarray(params.dt) / (1 - dtA / 2), C


@pytest.mark.parametrize("from_state", [False, True], ids=["zero-state", "from-state"])
@pytest.mark.parametrize("disc", ["zoh", "bilinear"])
def test_ssm_matches_the_recurrence(disc, from_state):
    model = next(e for e in ZOO if e.name == "S4D-bilinear-lin-c2-gate2").build(seed=0, disc=disc, init="legs", dt_max=0.8)
    rng = np.random.default_rng(0)
    u = rng.standard_normal((3, 9, 6))
    lengths = np.array([9, 4, 0])
    mask = np.arange(9)[None, :] < lengths[:, None]
    u[~mask] = 0
    h0 = rng.standard_normal((3, 6, 3)) + 1j * rng.standard_normal((3, 6, 3)) if from_state else None
    with jax.enable_x64(True):
        wide = float64_copy(model)
        dA, dB, C = numpy_discretize(wide.ssm_params(), disc)
        A_bar, B_bar, C2 = wide.discrete_system()
        np.testing.assert_allclose(A_bar, dA, rtol=1e-13)
        np.testing.assert_allclose(B_bar, dB, rtol=1e-13)
        np.testing.assert_allclose(C2, 2 * C, rtol=1e-13)
        outs = {
            method: s4d.ssm_forward(
                jnp.asarray(u), A_bar, B_bar, C2, mask=jnp.asarray(mask), lengths=jnp.asarray(lengths), method=method, chunk_size=4,
                return_state=True, h0=None if h0 is None else jnp.asarray(h0),
            )
            for method in ("fft", "scan")
        }
    h = np.zeros((3, 6, 3), np.complex128) if h0 is None else h0
    ys, states = [], []
    for t in range(9):
        h = dA * h + dB * u[:, t, :, None]
        states.append(h)
        ys.append(2 * np.einsum("chn,bhn->bch", C, h).real)  # lrnnx: 2 Re(sum_n C h)
    y_ref, states = np.stack(ys, 1), np.stack(states, 1)
    expected = np.stack([states[0, 8], states[1, 3], np.zeros_like(states[0, 0]) if h0 is None else h0[2]])
    for method, (y, state) in outs.items():
        chex.assert_shape(y, (3, 9, 2, 6))
        assert relative_error(np.asarray(y)[mask], y_ref[mask]) < 1e-12, method  # (the model zeroes the rest)
        np.testing.assert_allclose(state, expected, rtol=0, atol=1e-12 * np.abs(expected).max())


def test_unknown_discretization():
    with pytest.raises(ValueError, match=r"unknown discretization 'dirac'; expected one of \['bilinear', 'zoh'\]"):
        S4D(d_model=2, d_state=4, disc="dirac", rngs=nnx.Rngs(0))


def test_state_is_the_half_state():
    model = next(e for e in ZOO if e.name == "S4D-bilinear-lin-c2-gate2").build()
    cache = model.allocate_inference_cache(4)
    chex.assert_shape(cache["lrnn_state"], (4, 6, 3))
    chex.assert_type(cache["lrnn_state"], jnp.complex64)
