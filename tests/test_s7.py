"""S7: a float64 NumPy reference of the math, the initialisation, prefill and ``lengths`` on the lrnnx
fixtures, forward == step on random configurations, errors."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from conftest import check_prefill_then_decode, relative_error, run_steps
from lrnnx_jax.models.ltv.s7 import S7


def reference(weights, u, N):
    """float64 S7 from lrnnx-layout weights (``(out, in)`` matrices)."""
    w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    u = np.asarray(u, np.float64)
    H = u.shape[-1]
    x = u @ w["in_proj.weight"].T
    proj = x @ w["x_proj.weight"].T
    a, B, C, d, beta = np.split(proj, np.cumsum([N, H * N, H * N, H]), axis=-1)
    A_bar = 1 - 1 / ((a + w["base_params"]) ** 2 + 0.5)
    B = B.reshape(B.shape[:-1] + (H, N))
    C = C.reshape(C.shape[:-1] + (H, N))
    s = np.zeros((u.shape[0], N))
    ys = []
    for t in range(u.shape[1]):
        s = A_bar[:, t] * s + np.einsum("bhn,bh->bn", B[:, t], x[:, t]) + beta[:, t]
        ys.append(np.einsum("bhn,bn->bh", C[:, t], s) + d[:, t] * x[:, t])
    y = np.stack(ys, 1)
    gelu = 0.5 * y * (1 + erf(y / np.sqrt(2)))
    return 1 / (1 + np.exp(-(gelu @ w["gate_proj.weight"].T))) * y + u


def lrnnx_weights(model):
    return {
        "in_proj.weight": model.in_proj.kernel[...].T,
        "x_proj.weight": model.x_proj.kernel[...].T,
        "gate_proj.weight": model.gate_proj.kernel[...].T,
        "base_params": model.base_params[...],
    }


@pytest.mark.parametrize("J,chunk_size", [(1, None), (2, 3)])
def test_forward_matches_float64_reference(J, chunk_size):
    H, N = 5, 4
    model = S7(H, N, J=J, chunk_size=chunk_size, rngs=nnx.Rngs(J))
    # larger projections than the 0.02 init, so that A_bar_t, B_t, C_t vary a lot between tokens
    model.x_proj.kernel.set_value(0.3 * jax.random.normal(jax.random.key(J), model.x_proj.kernel[...].shape))
    model.base_params.set_value(jnp.linspace(-1.5, 1.0, N))
    u = np.random.default_rng(J).standard_normal((2, 15, H)).astype(np.float32)
    y = model(u)
    chex.assert_shape(y, u.shape)
    chex.assert_type(y, jnp.float32)
    assert relative_error(y, reference(lrnnx_weights(model), u, N)) < 2e-6


def test_fixture_prefill_then_decode_and_lengths():
    """lrnnx does not store S7's state in forward; ours continues its forward exactly."""
    meta, _, _, cache = check_prefill_then_decode("23_ltv_S7", split=7)
    chex.assert_shape(cache["lrnn_state"], (meta["B"], meta["kwargs"]["d_state"]))


def test_initialisation_and_lrnnx_layout():
    H, N, J = 8, 6, 3
    model = S7(H, N, J=J, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(model.base_params[...], -0.5)  # Re of the HiPPO-DPLR eigenvalues
    x_proj = np.asarray(model.x_proj.kernel[...])
    assert x_proj.shape == (H, N + 2 * H * N + H + N)
    assert abs(x_proj.std() - 0.02) < 0.002
    for linear in (model.in_proj, model.gate_proj):
        w = np.asarray(linear.kernel[...])
        assert np.abs(w).max() <= 1 / np.sqrt(H) and np.abs(w).max() > 0.5 / np.sqrt(H)
        assert linear.bias is None
    shapes = {name: entry.shape for name, entry in model.lrnnx_entries().items()}
    assert shapes == {
        "in_proj.weight": (H, H),
        "x_proj.weight": (N + 2 * H * N + H + N, H),
        "gate_proj.weight": (H, H),
        "base_params": (N,),
    }


@pytest.mark.parametrize("seed", [0, 1])
def test_forward_matches_step_on_random_configurations(seed):
    rng = np.random.default_rng(seed)
    H = int(rng.integers(2, 8))
    J = int(rng.integers(1, 4))
    N = J * int(rng.integers(1, 4))
    model = S7(H, N, J=J, chunk_size=int(rng.integers(1, 6)), rngs=nnx.Rngs(seed))
    model.x_proj.kernel.set_value(0.2 * jax.random.normal(jax.random.key(seed), model.x_proj.kernel[...].shape))
    x = rng.standard_normal((2, 12, H)).astype(np.float32)
    y, cache_fwd = model(x, return_cache=True)
    y_step, cache = run_steps(model, x)
    assert relative_error(y, y_step) < 1e-5, (H, N, J)
    np.testing.assert_allclose(cache_fwd["lrnn_state"], cache["lrnn_state"], rtol=1e-5, atol=1e-6)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="d_state must be divisible by J.*got d_state=6, J=4"):
        S7(4, 6, J=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="J must be a positive integer, got 0"):
        S7(4, 6, J=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="S7 has no event mode"):
        S7(4, 2, rngs=nnx.Rngs(0)).step(np.zeros((1, 4), np.float32), {"lrnn_state": jnp.zeros((1, 2))}, np.ones((1,), np.float32))
