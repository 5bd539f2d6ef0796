"""S7: a float64 NumPy reference of the math, the initialisation, prefill and ``lengths`` on the lrnnx
fixtures, forward == step on random configurations, the forward from a cache (chunked prefill), the cell on
every driver (XLA step and multi-step, the fused kernel in interpret mode, one row and a block), errors."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from conftest import check_prefill_then_decode, relative_error, run_steps
from lrnnx_jax.models.ltv import s7 as s7_module
from lrnnx_jax.models.ltv.s7 import S7
from pallas_kernels import cells
from pallas_kernels import fused_generation as fg
from pallas_kernels.dispatch import KernelConfig
from zoo import ZOO

ZOO_S7 = [entry for entry in ZOO if entry.cls == "S7"]
S7_ENTRIES = pytest.mark.parametrize("entry", ZOO_S7, ids=[entry.name for entry in ZOO_S7])
INTERPRET = KernelConfig(use_kernels="always", interpret=True)


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


def _model_and_inputs(entry, seed, batch=3, length=11):
    """A zoo model with larger projections (the 0.02 init makes B_t, C_t tiny), inputs and a split point."""
    model = entry.build(seed=seed)
    model.x_proj.kernel.set_value(0.3 * jax.random.normal(jax.random.key(seed), model.x_proj.kernel[...].shape))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, length, model.d_model)).astype(np.float32)
    return model, x, int(rng.integers(1, length))


@S7_ENTRIES
def test_forward_from_a_cache_continues_the_forward(entry):
    model, x, a = _model_and_inputs(entry, seed=10)
    y, cache = model(x, return_cache=True)
    y_head, c = model(x[:, :a], return_cache=True)
    y_tail, c_tail = model(x[:, a:], cache=c, return_cache=True)
    assert relative_error(np.concatenate([y_head, y_tail], 1), y) < 1e-5, a
    np.testing.assert_allclose(c_tail["lrnn_state"], cache["lrnn_state"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(model(x[:, a:], cache=c), y_tail)  # without return_cache
    # with lengths: each part gets its share of every row's length (rows shorter than the head: none of the tail)
    lengths = np.asarray([x.shape[1], max(1, a // 2), a + (x.shape[1] - a) // 2], np.int32)
    y_len, cache_len = model(x, lengths=jnp.asarray(lengths), return_cache=True)
    head_len = np.minimum(lengths, a)
    y_head, c = model(x[:, :a], lengths=jnp.asarray(head_len), return_cache=True)
    y_tail, c_tail = model(x[:, a:], lengths=jnp.asarray(lengths - head_len), cache=c, return_cache=True)
    assert relative_error(np.concatenate([y_head, y_tail], 1), y_len) < 1e-5, (a, lengths)
    np.testing.assert_allclose(c_tail["lrnn_state"], cache_len["lrnn_state"], rtol=1e-5, atol=1e-6)
    # a row's cache is the state after its own last valid step
    for b, length in enumerate(lengths):
        _, alone = model(x[b:b + 1, :length], return_cache=True)
        np.testing.assert_allclose(cache_len["lrnn_state"][b], alone["lrnn_state"][0], rtol=1e-5, atol=1e-6)


@S7_ENTRIES
def test_prefill_then_step_and_multi_step_equal_the_forward(entry):
    model, x, a = _model_and_inputs(entry, seed=11)
    y = model(x)
    _, c = model(x[:, :a], return_cache=True)
    y_steps, _ = run_steps(model, x[:, a:], cache=c)
    assert relative_error(y_steps, y[:, a:]) < 1e-5
    y_multi, c_multi = model.multi_step(x[:, a:], c)
    chex.assert_shape(y_multi, y[:, a:].shape)
    assert relative_error(y_multi, y[:, a:]) < 1e-5
    y_again, c_again, states = model.multi_step(x[:, a:], c, return_states=True)
    np.testing.assert_array_equal(y_again, y_multi)
    np.testing.assert_array_equal(c_again["lrnn_state"], c_multi["lrnn_state"])
    T = x.shape[1] - a
    chex.assert_shape(states["lrnn_state"], (x.shape[0], T, model.d_state))
    for t in range(T):  # the cache after token t is the forward's cache after a + t + 1 tokens
        _, expected = model(x[:, :a + t + 1], return_cache=True)
        np.testing.assert_allclose(states["lrnn_state"][:, t], expected["lrnn_state"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(states["lrnn_state"][:, -1], c_multi["lrnn_state"])


@S7_ENTRIES
def test_cell_on_the_fused_kernel_equals_multi_step(entry):
    model, x, a = _model_and_inputs(entry, seed=12, batch=2, length=6)
    _, c = model(x[:, :a], return_cache=True)
    xs = jnp.asarray(x[:, a:])
    y_multi, c_multi = model.multi_step(xs, c, kernel_config=KernelConfig(use_kernels="never"))
    cell = model.cell()
    ys, state = fg.run_cell(cell, model.cell_state(c), xs[:, 0], xs.shape[1], config=INTERPRET, xs=xs)
    assert relative_error(ys, y_multi) < 1e-5
    assert relative_error(model.cell_cache(state, c)["lrnn_state"], c_multi["lrnn_state"]) < 1e-5
    # and through the driver of model.multi_step
    y_kernel, c_kernel = model.multi_step(xs, c, kernel_config=INTERPRET)
    assert relative_error(y_kernel, y_multi) < 1e-5
    assert relative_error(c_kernel["lrnn_state"], c_multi["lrnn_state"]) < 1e-5


@S7_ENTRIES
def test_step_on_the_kernel_equals_the_xla_step(entry):
    model, x, a = _model_and_inputs(entry, seed=13, batch=2, length=4)
    _, c = model(x[:, :a], return_cache=True)
    y_never, c_never = model.step(x[:, a], c, kernel_config=KernelConfig(use_kernels="never"))
    y_always, c_always = model.step(x[:, a], c, kernel_config=KernelConfig(use_kernels="always"))
    for mode, kernel in (("always", True), ("never", False)):
        jaxpr = jax.make_jaxpr(lambda x_t, c: model.step(x_t, c, kernel_config=KernelConfig(use_kernels=mode)))(x[:, a], c)
        assert ("pallas_call" in str(jaxpr)) == kernel, mode
    assert relative_error(y_always, y_never) < 1e-5
    assert relative_error(c_always["lrnn_state"], c_never["lrnn_state"]) < 1e-5


def test_cell_one_row_equals_the_block():
    """The step takes one row (no leading axis: a kernel program) or a block of rows, in float64 too."""
    model, x, _ = _model_and_inputs(ZOO_S7[1], seed=14, batch=3, length=2)
    cell = model.cell()
    chex.assert_trees_all_equal_dtypes(cell.params, {k: jnp.zeros((), jnp.float32) for k in cell.params})
    assert cell.policy.rollout_max_batch == 512 and cell.policy.step_max_batch == 0
    s = jnp.asarray(np.random.default_rng(14).standard_normal((3, model.d_state)), jnp.float32)
    y_block, state_block = cells.xla_step(cell, {"s": s}, jnp.asarray(x[:, 0]), {})
    for b in range(3):
        y_row, state_row = cell.step(cell.params, {"s": s[b]}, jnp.asarray(x[b, 0]), {}, cells.XLA_PRECISION)
        chex.assert_shape(y_row, (model.d_model,))
        np.testing.assert_allclose(y_row, y_block[b], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state_row["s"], state_block["s"][b], rtol=1e-5, atol=1e-6)
    with jax.enable_x64(True):  # float64 rows: the step keeps the state's dtype
        y64, state64 = cells.xla_step(cell, {"s": s.astype(jnp.float64)}, jnp.asarray(x[:, 0], jnp.float64), {})
        chex.assert_type([y64, state64["s"]], jnp.float64)
        assert relative_error(y64, y_block) < 1e-5


def test_one_transition_for_the_forward_and_the_cell(monkeypatch):
    a = np.linspace(-3.0, 3.0, 61)
    with jax.enable_x64(True):
        np.testing.assert_allclose(s7_module.s7_transition(jnp.asarray(a)), 1 - 1 / (a**2 + 0.5), rtol=1e-14)
    jaxpr = jax.make_jaxpr(s7_module.s7_transition)(jnp.ones(4))
    assert {eqn.primitive.name for eqn in jaxpr.eqns} <= {"mul", "add", "div", "sub"}  # lowers in Triton
    # the forward's coefficients and the cell both call the module's s7_transition
    model, x, _ = _model_and_inputs(ZOO_S7[0], seed=15, batch=2, length=2)
    monkeypatch.setattr(s7_module, "s7_transition", lambda a: jnp.zeros_like(a))
    x_in = model.in_proj(jnp.asarray(x[:, 0]))
    assert not np.any(np.asarray(model.coefficients(x_in)[0]))
    cell = model.cell()
    state = {"s": jnp.ones((2, model.d_state))}
    _, zero_transition = cell.step(cell.params, state, jnp.asarray(x[:, 0]), {}, cells.XLA_PRECISION)
    _, no_state = cell.step(cell.params, {"s": jnp.zeros((2, model.d_state))}, jnp.asarray(x[:, 0]), {},
                            cells.XLA_PRECISION)
    np.testing.assert_array_equal(zero_transition["s"], no_state["s"])


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
def test_cell_lowers_to_triton(lower_for_h100):
    model = ZOO_S7[2].build(seed=0)
    cache = model.allocate_inference_cache(2)
    lower_for_h100(lambda x, c: fg.run_cell(model.cell(), model.cell_state(c), x, 3,
                                            config=KernelConfig(use_kernels="always", interpret=False)),
                   jnp.ones((2, model.d_model)), cache)


@pytest.mark.parametrize("H,N,blocks", [(8, 4, 4), (6, 3, 2), (5, 3, 1)])
def test_quadratic_and_bilinear_forms_equal_the_per_token_projections(H, N, blocks):
    """The drive ``B_t^T x`` as block-symmetric features of ``x`` and the readout ``C_t s`` as features of ``x`` and
    ``s`` equal the definitions (``B_t[h, n] = sum_i x_i WB[i, h, n]``) in float64, for 4, 2 and 1 blocks."""
    rng = np.random.default_rng(H)
    WB, WC = rng.standard_normal((2, H, H, N))
    x, s = rng.standard_normal((3, 7, H)), rng.standard_normal((3, 7, N))
    with jax.enable_x64(True):
        drive = s7_module.drive_features(jnp.asarray(x)) @ s7_module.drive_weights(jnp.asarray(WB))
        readout = s7_module.readout_features(jnp.asarray(x), jnp.asarray(s)) @ s7_module.readout_weights(jnp.asarray(WC))
    B_t, C_t = np.einsum("bti,ihn->bthn", x, WB), np.einsum("bti,ihn->bthn", x, WC)
    np.testing.assert_allclose(drive, np.einsum("bthn,bth->btn", B_t, x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(readout, np.einsum("bthn,btn->bth", C_t, s), rtol=1e-12, atol=1e-12)
    assert s7_module.drive_blocks(H) == blocks
    # k (k + 1) / 2 block pairs of (H / k)^2 products: 5/8 of H^2 for 4 blocks, 3/4 for 2
    features = blocks * (blocks + 1) // 2 * (H // blocks) ** 2
    chex.assert_shape(s7_module.drive_features(jnp.asarray(x, jnp.float32)), (3, 7, features))
