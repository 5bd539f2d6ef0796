"""S4 (DPLR): discretization, Cauchy/Woodbury kernel, both forward paths (from zero or a given state) and the
step, against float64 NumPy.

The references build the dense continuous matrix ``A = diag(Lambda) - P conj(P)^T`` over the
conjugate-expanded state and discretize it with dense solves, independently of the
Woodbury forms in lrnnx_jax.models.lti.s4 (the step's factored ``O(N r)`` update included).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load_fixture, relative_error, run_steps
from lrnnx_jax.convert import from_lrnnx
from lrnnx_jax.core.discretization import bilinear
from lrnnx_jax.models.lti import s4
from test_s4_layer import numpy_block
from zoo import ZOO


def float64_copy(model):
    """The model with float64 parameters (call inside ``jax.enable_x64(True)``)."""
    graphdef, state = nnx.split(model)
    widen = lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a  # noqa: E731
    return nnx.merge(graphdef, jax.tree.map(widen, state))


def complex_error(ours, theirs) -> float:
    """``max|ours - theirs| / max|theirs|`` for complex arrays."""
    ours, theirs = np.asarray(ours, np.complex128), np.asarray(theirs, np.complex128)
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def numpy_system(params):
    """Dense float64 ``(dA (H, N, N), dB (H, N), C (c, H, N))`` from the half-state parameters, by solves."""
    full = lambda z: np.concatenate([z, np.conj(z)], axis=-1)
    lam, P, B, C = (full(np.asarray(a, np.complex128)) for a in (params.A, params.P, params.B, params.C))
    dt = np.asarray(params.dt, np.float64)
    dt = np.broadcast_to(dt if dt.shape[-1] == 1 else full(dt).real, lam.shape)
    dA, dB = [], []
    for h in range(lam.shape[0]):
        A = np.diag(lam[h]) - P[:, h].T @ np.conj(P[:, h])
        M = np.eye(len(A)) - dt[h][:, None] * A / 2
        dA.append(np.linalg.solve(M, np.eye(len(A)) + dt[h][:, None] * A / 2))
        dB.append(np.linalg.solve(M, dt[h] * B[h]))
    return np.stack(dA), np.stack(dB), C


def numpy_recurrence(dA, dB, C, u, h0=None):
    """``h_t = dA h_{t-1} + dB u_t`` from ``h0`` (zeros if None), ``y_t = Re(C h_t)``:
    ``u (B, L, H)`` -> ``(y (B, L, c, H), states (B, L, H, N))``."""
    h = np.zeros((u.shape[0],) + dB.shape, np.complex128) if h0 is None else np.asarray(h0, np.complex128)  # (B, H, N)
    ys, hs = [], []
    for t in range(u.shape[1]):
        h = np.einsum("hnm,bhm->bhn", dA, h) + dB * u[:, t, :, None]
        hs.append(h)
        ys.append(np.einsum("chn,bhn->bch", C, h).real)
    return np.stack(ys, 1), np.stack(hs, 1)


@pytest.fixture(scope="module")
def model():
    """The zoo's rank-2, 2-channel, per-state-dt S4 (its SSM runs on 3 features); sharing it shares compilations."""
    return next(e for e in ZOO if e.name == "S4-legt-r2-c2-gate-bottleneck").build(seed=0, dt_max=0.8)


def test_dplr_bilinear_matches_dense_solve():
    rng = np.random.default_rng(0)
    H, N, r = 2, 5, 2
    lam = -rng.uniform(0.1, 1, (H, N)) + 1j * rng.normal(0, 5, (H, N))
    P = rng.normal(size=(r, H, N)) + 1j * rng.normal(size=(r, H, N))
    B = rng.normal(size=(H, N)) + 1j * rng.normal(size=(H, N))
    dt = rng.uniform(0.01, 0.5, (H, N))
    with jax.enable_x64(True):
        dA, dB = jax.jit(lambda *a: s4.dplr_bilinear(*bilinear(a[0], a[1]), *a[2:]))(lam, dt, P, B)
    for h in range(H):
        A = np.diag(lam[h]) - P[:, h].T @ np.conj(P[:, h])
        M = np.eye(N) - dt[h][:, None] * A / 2
        np.testing.assert_allclose(dA[h], np.linalg.solve(M, np.eye(N) + dt[h][:, None] * A / 2), rtol=0, atol=1e-12)
        np.testing.assert_allclose(dB[h], np.linalg.solve(M, dt[h] * B[h]), rtol=0, atol=1e-12)


def test_kernel_is_the_impulse_response(model):
    """``K_l = Re(C dA^l dB)``: with C~ = C(I - dA^L) the length-L generating function has exactly the first L taps."""
    length = 20
    with jax.enable_x64(True):
        wide = float64_copy(model)
        K = s4.dplr_kernel(wide.discrete_system(), length)
        dA, dB, C = numpy_system(wide.ssm_params())
    chex.assert_shape(K, (2, 3, length))
    taps = [np.einsum("chn,hnm,hm->ch", C, np.linalg.matrix_power(dA, k), dB).real for k in range(length)]
    reference = np.stack(taps, -1)
    assert relative_error(K, reference) < 1e-11


@pytest.mark.parametrize("from_state", [False, True], ids=["zero-state", "from-state"])
@pytest.mark.parametrize("method", ["fft", "scan"])
def test_forward_paths_match_the_recurrence(model, method, from_state):
    """Both paths, from the zero state or a given (conjugate-symmetric) one, with lengths: outputs and final states."""
    rng = np.random.default_rng(1)
    u = rng.standard_normal((3, 13, 3))
    lengths = np.array([13, 5, 0])
    u[np.arange(13)[None, :] >= lengths[:, None]] = 0
    h0 = None
    if from_state:
        half = rng.standard_normal((3, 3, 3)) + 1j * rng.standard_normal((3, 3, 3))
        h0 = np.concatenate([half, np.conj(half)], -1)
    with jax.enable_x64(True):
        wide = float64_copy(model)
        y, h = s4.dplr_forward(wide.discrete_system(), jnp.asarray(u), lengths=jnp.asarray(lengths), method=method,
                               chunk_size=4, return_state=True, h0=None if h0 is None else jnp.asarray(h0))
        y_ref, h_ref = numpy_recurrence(*numpy_system(wide.ssm_params()), u, h0)
    chex.assert_shape(y, (3, 13, 2, 3))
    assert relative_error(y, y_ref) < 1e-10
    expected = np.stack([h_ref[0, 12], h_ref[1, 4], np.zeros_like(h_ref[0, 0]) if h0 is None else h0[2]])
    np.testing.assert_allclose(h, expected, rtol=0, atol=1e-10 * np.abs(expected).max())
    # the state is conjugate-symmetric: the output is real without taking Re
    np.testing.assert_allclose(h[..., 3:], np.conj(h[..., :3]), atol=1e-12)


def test_step_is_the_dense_recurrence(model):
    """``step`` and ``multi_step`` (the block's cell: the factored O(N r) DPLR update) in float64 equal the dense
    recurrence ``h <- dA h + dB u`` with ``dA, dB`` from dense solves (and ``s4.dplr_bilinear`` equals them),
    from a random state that is not conjugate-symmetric, and the block output built on it."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 5, 6))
    h0 = rng.standard_normal((2, 3, 6)) + 1j * rng.standard_normal((2, 3, 6))
    with jax.enable_x64(True):
        wide = float64_copy(model)
        dA, dB, C = numpy_system(wide.ssm_params())
        system = wide.discrete_system()
        cache = {"lrnn_state": jnp.asarray(h0)}
        y_steps, c_steps = run_steps(wide, jnp.asarray(x), cache=cache)
        y_multi, c_multi, per_token = wide.multi_step(jnp.asarray(x), cache, return_states=True)
    np.testing.assert_allclose(system.dA, dA, rtol=0, atol=1e-12)  # the dense form of the factors (dplr_bilinear)
    np.testing.assert_allclose(system.dB, dB, rtol=0, atol=1e-12)
    chex.assert_type(c_steps["lrnn_state"], jnp.complex128)
    u = x @ np.asarray(model.input_linear.kernel[...], np.float64) + np.asarray(model.input_linear.bias[...], np.float64)
    h, states = h0, []
    for t in range(5):
        h = np.einsum("hnm,bhm->bhn", dA, h) + dB * u[:, t, :, None]
        states.append(h)
    states = np.stack(states, 1)
    assert relative_error(per_token["lrnn_state"], states) < 1e-12
    assert relative_error(c_steps["lrnn_state"], states[:, -1]) < 1e-12
    assert relative_error(c_multi["lrnn_state"], states[:, -1]) < 1e-12
    y_ref, _ = numpy_block(model, x, h0=h0, system=(dA, dB, C))
    assert relative_error(y_steps, y_ref) < 1e-12
    assert relative_error(y_multi, y_ref) < 1e-12


def test_single_step_and_unchunked_scan(model):
    u = np.random.default_rng(2).standard_normal((2, 6, 3)).astype(np.float32)
    system = model.discrete_system()
    scans = [s4.dplr_forward(system, jnp.asarray(u), method="scan", chunk_size=c)[0] for c in (None, 1, 4)]
    fft = s4.dplr_forward(system, jnp.asarray(u[:, :1]), method="fft")[0]
    for y in scans[1:]:
        assert relative_error(y, scans[0]) < 1e-5
    assert relative_error(fft, scans[0][:, :1]) < 1e-5


def test_lrnnx_c_tilde_is_converted_on_load():
    meta, _, state_dict = load_fixture("07_lti_S4")
    l_kernel = int(state_dict["layer.kernel.l_kernel"])
    model = from_lrnnx(meta["model"], meta["kwargs"], state_dict)
    with jax.enable_x64(True):
        dA, _, C = numpy_system(float64_copy(model).ssm_params())
    C_tilde = C - np.einsum("chn,hnm->chm", C, np.linalg.matrix_power(dA, l_kernel))
    stored = state_dict["C"][..., 0] + 1j * state_dict["C"][..., 1]
    assert complex_error(C_tilde[..., :4], stored) < 1e-5
    assert complex_error(model.ssm_params().C, stored) > 1e-2  # the conversion did something
    untouched = from_lrnnx(meta["model"], meta["kwargs"], {**state_dict, "layer.kernel.l_kernel": np.array(0)})
    np.testing.assert_array_equal(untouched.C[...], state_dict["C"])


def test_step_gradients_reach_the_ssm_parameters(model):
    """lrnnx's step has no gradient to the SSM parameters; here the step loop and the forward have the same gradients."""
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 5, 6)), jnp.float32)
    weights = jnp.asarray(np.random.default_rng(5).standard_normal((2, 5, 6)), jnp.float32)
    graphdef, params = nnx.split(model, nnx.Param)

    def forward_loss(p):
        return jnp.sum(nnx.merge(graphdef, p)(x) * weights)

    def step_loss(p):
        m = nnx.merge(graphdef, p)

        def body(cache, x_t):
            y_t, cache = m.step(x_t, cache)
            return cache, y_t

        _, ys = jax.lax.scan(body, m.allocate_inference_cache(2), jnp.swapaxes(x, 0, 1))
        return jnp.sum(jnp.swapaxes(ys, 0, 1) * weights)

    with jax.default_matmul_precision("highest"):  # the block's linear layers (TF32 on a GPU otherwise)
        g_forward, g_step = jax.jit(jax.grad(forward_loss))(params), jax.jit(jax.grad(step_loss))(params)
    for name in ("A_real", "A_imag", "P", "B", "C", "inv_dt"):
        assert float(jnp.max(jnp.abs(g_forward[name][...]))) > 0, name
        assert relative_error(g_step[name][...], g_forward[name][...]) < 1e-4, name
