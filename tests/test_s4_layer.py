"""The S4/S4D block: layout, gate/bottleneck/channels, dropout, initialisations and argument errors; the
forward from a cache (chunked prefill), ``step`` and ``multi_step`` against a float64 NumPy block, and the
block's cell on the fused Pallas kernel (interpret mode on the CPU)."""

from __future__ import annotations

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from conftest import load_fixture, relative_error, run_steps
from lrnnx_jax.models.lti import s4_layer
from lrnnx_jax.models.lti.s4 import S4
from lrnnx_jax.models.lti.s4d import S4D
from pallas_kernels import KernelConfig, cells
from pallas_kernels import fused_generation as fg
from zoo import ZOO

NEVER = KernelConfig(use_kernels="never")
INTERPRET = KernelConfig(use_kernels="always", interpret=True)
S4_ZOO = [e for e in ZOO if e.cls in ("S4", "S4D")]


def gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def linear(layer, x):
    return x @ np.asarray(layer.kernel[...], np.float64) + np.asarray(layer.bias[...], np.float64)


def float64_copy(model):
    """The model with float64 parameters (call inside ``jax.enable_x64(True)``)."""
    graphdef, state = nnx.split(model)
    widen = lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a  # noqa: E731
    return nnx.merge(graphdef, jax.tree.map(widen, state))


def dense_system(model):
    """The float64 dense ``(dA (H', S, S), dB (H', S), C (c, H', S))`` of the model's discrete SSM over its state
    ``S`` (S4: the full state, ``dA`` from ``s4.dplr_bilinear``, checked against dense solves in test_s4.py;
    S4D: ``diag(A_bar)`` over the half state, the factor 2 in ``C``)."""
    with jax.enable_x64(True):
        wide = float64_copy(model)
        if isinstance(model, S4):
            system = wide.discrete_system()
            return tuple(np.asarray(a, np.complex128) for a in (system.dA, system.dB, system.C))
        A_bar, B_bar, C = (np.asarray(a, np.complex128) for a in wide.discrete_system())
    return np.stack([np.diag(a) for a in A_bar]), B_bar, C


def numpy_block(model, x, h0=None, drop=None, system=None):
    """The block in float64 NumPy with the dense recurrence ``h_t = dA h_{t-1} + dB u_t`` from ``h0`` (zeros if None).

    ``x (B, L, H)`` -> ``(y (B, L, H), states (B, L, H', S))``; ``drop (B, L, F)`` multiplies the features where
    the dropout acts.
    """
    dA, dB, C = dense_system(model) if system is None else system
    x = np.asarray(x, np.float64)
    batch, length, _ = x.shape
    u = x if model.input_linear is None else linear(model.input_linear, x)
    h = np.zeros((batch,) + dB.shape, np.complex128) if h0 is None else np.asarray(h0, np.complex128)
    states, ssm = [], []
    for t in range(length):
        h = np.einsum("hnm,bhm->bhn", dA, h) + dB * u[:, t, :, None]
        states.append(h)
        ssm.append(np.einsum("chn,bhn->bch", C, h).real)
    z = np.stack(ssm, 1) + np.asarray(model.D[...], np.float64) * u[:, :, None, :]  # (B, L, c, H')
    if model.swap_channels:
        z = np.swapaxes(z, -1, -2)
    z = gelu(z.reshape(batch, length, -1))
    if model.input_gate is not None:
        z = (z if model.output_gate is None else linear(model.output_gate, z)) * gelu(linear(model.input_gate, x))
    z = gelu(z)
    if drop is not None:
        z = z * drop
    y = z if model.output_linear is None else gelu(linear(model.output_linear, z))
    return y, np.stack(states, 1)


def test_block_matches_numpy_reference_transposed_gated_bottleneck():
    """lrnnx's block on (B, H, L): gate, a working bottleneck, 2 channels flattened as (h c)."""
    H, L = 6, 7
    model = S4D(d_model=H, d_state=6, bottleneck=2, gate=3, channels=2, swap_channels=True, dt_min=0.1, dt_max=0.5, rngs=nnx.Rngs(0))
    assert model.transposed and model.d_inner == 3 and model.output_gate is not None
    x = np.random.default_rng(0).standard_normal((2, H, L)).astype(np.float32)
    y = model(x)
    chex.assert_shape(y, (2, H, L))

    xs = np.swapaxes(x, 1, 2).astype(np.float64)  # (B, L, H)
    v = gelu(linear(model.input_gate, xs))
    u = linear(model.input_linear, xs)  # (B, L, 3)
    A_bar, B_bar, C = (np.asarray(a, np.complex128) for a in model.discrete_system())
    h = np.zeros((2, 3, 3), np.complex128)
    ssm = []
    for t in range(L):
        h = A_bar * h + B_bar * u[:, t, :, None]
        ssm.append(np.einsum("chn,bhn->bch", C, h).real)
    z = np.stack(ssm, 1) + np.asarray(model.D[...]) * u[:, :, None, :]  # (B, L, c, H')
    z = gelu(np.swapaxes(z, -1, -2).reshape(2, L, 6))  # swap_channels: (h c)
    z = gelu(linear(model.output_gate, z) * v)
    expected = gelu(linear(model.output_linear, z))
    assert relative_error(np.swapaxes(y, 1, 2), expected) < 1e-5

    y_cache, cache = model(x, return_cache=True)
    np.testing.assert_allclose(y_cache, y, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(cache["lrnn_state"], h, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"x must have shape \(B, H, L\) with H=6 \(transposed=True\), got shape \(2, 7, 6\)"):
        model(np.swapaxes(x, 1, 2))


def test_dropout_is_off_until_enabled():
    x = np.random.default_rng(1).standard_normal((2, 5, 6)).astype(np.float32)
    entry = next(e for e in ZOO if e.name == "S4D-bilinear-lin-c2-gate2")
    reference = entry.build(seed=3)(x)
    model = entry.build(seed=3, dropout=0.5, tie_dropout=True)
    np.testing.assert_array_equal(model(x), reference)
    training = nnx.view(model, deterministic=False)
    first, second = np.asarray(training(x)), np.asarray(training(x))
    assert relative_error(first, reference) > 1e-3 and relative_error(second, first) > 1e-3


# ------------------------------------------------------- from a cache, step, multi_step
def _entry(name):
    return next(e for e in ZOO if e.name == name)


@pytest.mark.parametrize("method", ["fft", "scan"])
@pytest.mark.parametrize("entry", S4_ZOO, ids=lambda e: e.name)
def test_chunked_prefill_step_and_multi_step_match_numpy(entry, method):
    """For a random split a: ``model(x[:, :a])`` then ``model(x[:, a:], cache=...)`` (also with ``lengths``),
    ``step`` and ``multi_step`` from the prefill cache all continue the float64 NumPy block, with its states."""
    model = entry.build(seed=5, method=method)
    rng = np.random.default_rng(7)
    length = 9
    a = int(rng.integers(1, length))
    x = rng.standard_normal((3, length, model.d_model)).astype(np.float32)
    y_ref, states = numpy_block(model, x)
    assert np.abs(states).max() > 1e-2  # the state is not negligible

    y_full, c_full = model(x, return_cache=True)
    y_head, c_head = model(x[:, :a], return_cache=True)
    y_tail, c_tail = model(x[:, a:], cache=c_head, return_cache=True)
    assert relative_error(y_full, y_ref) < 1e-5
    assert relative_error(np.concatenate([y_head, y_tail], 1), y_ref) < 1e-5
    assert relative_error(np.concatenate([y_head, y_tail], 1), y_full) < 1e-5
    assert relative_error(c_head["lrnn_state"], states[:, a - 1]) < 1e-5
    chex.assert_trees_all_equal_shapes_and_dtypes(c_tail, c_full)
    assert relative_error(c_tail["lrnn_state"], states[:, -1]) < 1e-5
    assert relative_error(c_tail["lrnn_state"], c_full["lrnn_state"]) < 1e-5
    np.testing.assert_array_equal(model(x[:, a:], cache=c_head), y_tail)  # return_cache does not change y

    y_steps, c_steps = run_steps(model, x[:, a:], cache=c_head)
    assert relative_error(y_steps, y_ref[:, a:]) < 1e-5
    assert relative_error(c_steps["lrnn_state"], states[:, -1]) < 1e-5

    y_multi, c_multi, per_token = model.multi_step(x[:, a:], c_head, return_states=True)
    assert relative_error(y_multi, y_ref[:, a:]) < 1e-5
    assert relative_error(c_multi["lrnn_state"], states[:, -1]) < 1e-5
    chex.assert_shape(per_token["lrnn_state"], (3, length - a, *c_head["lrnn_state"].shape[1:]))
    chex.assert_type(per_token["lrnn_state"], c_head["lrnn_state"].dtype)
    assert relative_error(per_token["lrnn_state"], states[:, a:]) < 1e-5

    # lengths in the second chunk: each row as if alone, zeros after it, the cache after its last valid step
    lengths = np.array([length - a, min(2, length - a), 0])
    y_len, c_len = model(x[:, a:], cache=c_head, lengths=jnp.asarray(lengths), return_cache=True)
    for row, n in enumerate(lengths):
        if n:
            assert relative_error(y_len[row, :n], y_ref[row, a:a + n]) < 1e-5, row
        assert np.all(np.asarray(y_len[row, n:]) == 0), row
        assert relative_error(c_len["lrnn_state"][row], states[row, a + n - 1]) < 1e-5, row


def test_transposed_forward_takes_a_cache():
    entry = _entry("S4-legt-r2-c2-gate-bottleneck")
    model, transposed = entry.build(seed=1), entry.build(seed=1, transposed=True)
    x = np.random.default_rng(3).standard_normal((2, 7, 6)).astype(np.float32)
    y_ref, states = numpy_block(model, x)
    _, cache = transposed(np.swapaxes(x[:, :4], 1, 2), return_cache=True)
    y_t, cache_t = transposed(np.swapaxes(x[:, 4:], 1, 2), cache=cache, return_cache=True)
    chex.assert_shape(y_t, (2, 6, 3))
    assert relative_error(np.swapaxes(y_t, 1, 2), y_ref[:, 4:]) < 1e-5
    assert relative_error(np.swapaxes(transposed(np.swapaxes(x[:, 4:], 1, 2), cache=cache), 1, 2), y_ref[:, 4:]) < 1e-5
    assert relative_error(cache_t["lrnn_state"], states[:, -1]) < 1e-5
    with pytest.raises(ValueError, match="cache"):
        transposed(np.swapaxes(x, 1, 2), cache=transposed.allocate_inference_cache(3))


def test_training_step_draws_fresh_dropout_masks():
    """In training mode the step applies dropout as the forward does, with a fresh mask every step (the kernels
    refuse it: the XLA driver runs). The masks enter the cell as inputs; the cell's output with them equals the
    NumPy block with the same masks."""
    model = _entry("S4D-bilinear-lin-c2-gate2").build(seed=3, dropout=0.5)
    training = nnx.view(model, deterministic=False)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    cache = model(rng.standard_normal((4, 3, 6)).astype(np.float32), return_cache=True)[1]
    eval_y = np.asarray(model.step(x, cache)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "always" falls back for active dropout, with a warning
        first = np.asarray(training.step(x, cache, kernel_config=INTERPRET)[0])
    second = np.asarray(training.step(x, cache)[0])
    assert relative_error(first, eval_y) > 1e-3 and relative_error(second, first) > 1e-3
    np.testing.assert_allclose(training.step(x, cache)[1]["lrnn_state"], model.step(x, cache)[1]["lrnn_state"], rtol=1e-6)

    inputs = training.cell_inputs((4,))
    mask = np.zeros((4, 12))
    for j, index in enumerate(model._feature_blocks()):
        mask[:, index] = inputs[f"drop{j}"]
    assert set(np.unique(mask)) == {0.0, 2.0}
    y, _ = cells.xla_step(model.cell(), model.cell_state(cache), jnp.asarray(x), inputs)
    expected, _ = numpy_block(model, x[:, None], h0=cache["lrnn_state"], drop=mask[:, None])
    assert relative_error(y, expected[:, 0]) < 1e-5
    # tie_dropout: one mask per row for the tokens of a multi-token call
    tied = nnx.view(_entry("S4D-bilinear-lin-c2-gate2").build(seed=3, dropout=0.5, tie_dropout=True), deterministic=False)
    masks = tied.cell_inputs((4, 5))
    chex.assert_shape(masks["drop0"], (4, 5, 6))
    np.testing.assert_array_equal(masks["drop1"], np.broadcast_to(masks["drop1"][:, :1], (4, 5, 6)))
    assert relative_error(masks["drop0"][:, 0], tied.cell_inputs((4, 5))["drop0"][:, 0]) > 0  # fresh every call


# ------------------------------------------------------------- the cell on the kernels
KERNEL_MODELS = {
    "S4-legt-r2-c2-gate-bottleneck": lambda: _entry("S4-legt-r2-c2-gate-bottleneck").build(seed=2),
    "S4D-bilinear-lin-c2-gate2": lambda: _entry("S4D-bilinear-lin-c2-gate2").build(seed=2),
    # no output layer (one-hot output tiles), channels flattened as (h c), bottleneck, rank 1, one dt per channel
    "S4-swap-c2-no-output-layer": lambda: S4(d_model=6, d_state=4, channels=2, bottleneck=2, swap_channels=True,
                                             final_act=None, transposed=False, dt_min=0.05, dt_max=0.5, rngs=nnx.Rngs(2)),
    # no gate, no bottleneck, no output layer
    "S4D-zoh-no-output-layer": lambda: S4D(d_model=6, d_state=4, final_act=None, transposed=False, dt_min=0.05,
                                           dt_max=0.5, rngs=nnx.Rngs(2)),
}


@pytest.mark.parametrize("name", list(KERNEL_MODELS))
def test_cell_on_the_fused_kernel_matches_multi_step_and_forward(name):
    """The block's cell through ``fused_generation.run_cell`` (Pallas interpret mode) from a prefill cache equals
    ``multi_step`` on the XLA driver and the forward (itself checked against the float64 NumPy block)
    within 1e-5 relative in float32; ``model.step`` on the one-step kernel equals the XLA step."""
    model = KERNEL_MODELS[name]()
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 7, 6)).astype(np.float32)
    y_ref, states = numpy_block(model, x)
    y_full, c_full = model(x, return_cache=True)
    assert relative_error(y_full, y_ref) < 1e-5
    _, cache = model(x[:, :3], return_cache=True)
    cell = model.cell()
    assert not cell.blockable and cell.policy is type(model).kernel_policy and "H200" in cell.policy.evidence
    ys, state = fg.run_cell(cell, model.cell_state(cache), jnp.asarray(x[:, 3]), 4, config=INTERPRET,
                            xs=jnp.asarray(x[:, 3:]))
    y_multi, c_multi = model.multi_step(x[:, 3:], cache, kernel_config=NEVER)
    assert relative_error(ys, y_multi) < 1e-5 and relative_error(ys, y_full[:, 3:]) < 1e-5
    c_kernel = model.cell_cache(state, cache)
    chex.assert_trees_all_equal_shapes_and_dtypes(c_kernel, cache)
    assert relative_error(c_kernel["lrnn_state"], c_multi["lrnn_state"]) < 1e-5
    assert relative_error(c_kernel["lrnn_state"], states[:, -1]) < 1e-5
    assert relative_error(c_kernel["lrnn_state"], cache["lrnn_state"]) > 1e-2  # the kernel did update the state

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to the XLA driver would warn
        jaxpr = str(jax.make_jaxpr(lambda x_t, c: model.step(x_t, c, kernel_config=INTERPRET))(x[:, 3], cache))
        y_kernel, c_step_kernel = model.step(x[:, 3], cache, kernel_config=INTERPRET)
        y_m, c_m = model.multi_step(x[:, 3:], cache, kernel_config=INTERPRET)
    assert "pallas_call" in jaxpr
    y_xla, c_step_xla = model.step(x[:, 3], cache, kernel_config=NEVER)
    assert relative_error(y_kernel, y_xla) < 1e-5
    assert relative_error(c_step_kernel["lrnn_state"], c_step_xla["lrnn_state"]) < 1e-5
    assert relative_error(y_m, y_multi) < 1e-5 and relative_error(c_m["lrnn_state"], c_multi["lrnn_state"]) < 1e-5


def test_closed_loop_rollout_on_the_kernel():
    """The fused closed loop (each output the next input) equals ``step`` fed back, from a prefill cache."""
    model = KERNEL_MODELS["S4-legt-r2-c2-gate-bottleneck"]()
    x = np.random.default_rng(9).standard_normal((2, 4, 6)).astype(np.float32)
    _, cache = model(x, return_cache=True)
    x_t, c, outputs = jnp.asarray(x[:, -1]), cache, []
    for _ in range(5):
        x_t, c = model.step(x_t, c, kernel_config=NEVER)
        outputs.append(x_t)
    ys, state = fg.run_cell(model.cell(), model.cell_state(cache), jnp.asarray(x[:, -1]), 5, config=INTERPRET)
    assert relative_error(ys, np.stack(outputs, 1)) < 1e-5
    assert relative_error(model.cell_cache(state, cache)["lrnn_state"], c["lrnn_state"]) < 1e-5


# ------------------------------------------------------------------------ inits
def test_legs_init_matches_lrnnx():
    _, _, state_dict = load_fixture("07_lti_S4")
    model = S4(d_model=16, d_state=8, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(model.A_real[...], state_dict["A_real"], rtol=1e-6)
    np.testing.assert_allclose(model.A_imag[...], state_dict["A_imag"], rtol=1e-6)
    ours_B, theirs_B = s4_layer.as_complex(model.B[...]), s4_layer.as_complex(jnp.asarray(state_dict["B"]))
    ours_P, theirs_P = s4_layer.as_complex(model.P[...]), s4_layer.as_complex(jnp.asarray(state_dict["P"]))
    # eigenvectors are defined up to a phase: compare |P| and B conj(P) where Im B is not clipped
    np.testing.assert_allclose(jnp.abs(ours_P), jnp.abs(theirs_P), rtol=1e-5)
    free = np.abs(np.imag(theirs_B)) < 2
    np.testing.assert_allclose((ours_B * jnp.conj(ours_P[0]))[free], (theirs_B * jnp.conj(theirs_P[0]))[free], rtol=1e-5)


@pytest.mark.parametrize("measure, rank", [("legs", 1), ("legt", 2), ("fourier", 1)])
def test_nplr_is_unitarily_equivalent_to_hippo(measure, rank):
    N = 8
    W, P, B, V = s4_layer.nplr(measure, N, rank, B_clip=None)
    full = lambda z: np.concatenate([z, np.conj(z)], axis=-1)
    A = np.diag(full(W)) - full(P).T @ np.conj(full(P))
    A_hippo, B_hippo = s4_layer.hippo_transition(measure, N)
    np.testing.assert_allclose(full(V) @ A @ full(V).conj().T, A_hippo, atol=1e-12)
    np.testing.assert_allclose(full(V) @ full(B), B_hippo, atol=1e-12)


def test_direct_inits_and_combinations():
    n = np.arange(4)
    cases = {
        "diag-lin": -0.5 - 1j * np.pi * n,
        "diag-inv": -0.5 - 1j * 8 / np.pi * (8 / (1 + 2 * n) - 1),
        "diag-quad": -0.5 - 1j * (1 + 2 * n) ** 2 / np.pi,
        "diag-real": -(1.0 + n) + 0j,
    }
    for init, A in cases.items():
        params = S4(d_model=6, d_state=8, init=init, rngs=nnx.Rngs(0)).ssm_params()
        np.testing.assert_allclose(params.A, np.broadcast_to(A, (6, 4)), rtol=1e-6, atol=1e-4, err_msg=init)
        np.testing.assert_array_equal(params.P, 0)  # diag-*: no low-rank term
    params = S4D(d_model=6, d_state=8, init="hippo", rngs=nnx.Rngs(0)).ssm_params()  # 3 legs copies, 3 fourier
    np.testing.assert_allclose(params.A[:3], np.broadcast_to(s4_layer.nplr("legs", 8)[0], (3, 4)), rtol=1e-6)
    np.testing.assert_allclose(params.A[3:].imag, np.broadcast_to(s4_layer.nplr("fourier", 8)[0].imag, (3, 4)), atol=1e-4)
    model = S4D(d_model=6, d_state=8, init="dplr-lin", B_init="alternating", normalize=True, rngs=nnx.Rngs(0))
    B = model.ssm_params().B
    np.testing.assert_allclose(2 * jnp.sum(jnp.abs(B / model.ssm_params().A) ** 2, -1), 1, rtol=1e-5)
    np.testing.assert_allclose(jnp.sign(B.real), np.broadcast_to([1, -1, 1, -1], (6, 4)))


def test_deterministic_init_and_transforms():
    model = S4D(d_model=6, d_state=8, init="diag-lin", deterministic=True, dt_min=0.01, dt_max=0.1, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(model.inv_dt[...][:, 0], np.linspace(np.log(0.01), np.log(0.1), 6), rtol=1e-6)
    np.testing.assert_allclose(model.ssm_params().C, np.broadcast_to([1, 0, 0, 0], (1, 6, 4)), atol=0)
    for transform in s4_layer.TRANSFORMS:
        value = jnp.array([1e-3, 0.3, 0.9])  # below 1 so that "sigmoid" can represent it
        expected = value + (1e-4 if transform == "relu" else 0)  # lrnnx's relu transform adds 1e-4
        stored = s4_layer.inv_transform(value, transform)
        np.testing.assert_allclose(s4_layer.param_transform(stored, transform), expected, rtol=2e-3, err_msg=transform)
    transforms = dict(dt_transform="softplus", real_transform="softplus", imag_transform="exp")
    fast = S4D(d_model=6, d_state=8, dt_fast=True, dt_tie=False, **transforms, rngs=nnx.Rngs(0))
    params = fast.ssm_params()
    chex.assert_shape(params.dt, (6, 4))
    assert np.all((params.dt > 1e-3 * 0.99) & (params.dt < 0.1 * 1.01))
    np.testing.assert_allclose(params.A.real, -0.5, rtol=1e-6)


def test_is_real():
    model = S4D(d_model=6, d_state=8, init="diag-real", is_real=True, transposed=False, rngs=nnx.Rngs(0))
    chex.assert_shape(model.B[...], (1, 6, 4))
    assert not hasattr(model, "A_imag") and "A_imag" not in model.lrnnx_entries()
    np.testing.assert_array_equal(model.ssm_params().A.imag, 0)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(d_state=5), ValueError, "d_state must be a positive even number"),
        (dict(drop_kernel=0.1), ValueError, "drop_kernel"),
        (dict(real_random=True), TypeError, r"init='legs' does not take \['real_random'\]"),
        (dict(init="diag-lin", B_clip=1.0), TypeError, r"init='diag-lin' does not take \['B_clip'\]"),
        (dict(init="nope"), ValueError, "unknown init 'nope'"),
        (dict(init="diag-nope"), ValueError, "not 'diag-<x>' or 'dplr-<x>'"),
        (dict(init="legt"), ValueError, "init='legt' needs rank >= 2"),
        (dict(channels=2, final_act=None), ValueError, "final_act=None leaves 12 output features"),
        (dict(postact="glu"), ValueError, "postact is the deprecated name of final_act"),
        (dict(deterministic=True, dt_tie=False), ValueError, "deterministic=True needs dt_tie=True"),
        (dict(n_ssm=4), ValueError, "n_ssm=4 must divide the SSM width 6"),
        (dict(init="hippo", n_ssm=1), ValueError, "n_ssm=1 SSM copies must be a multiple of the 2 inits"),
        (dict(dt_transform="log"), ValueError, "dt_transform must be one of"),
        (dict(method="cuda"), ValueError, "method must be one of"),
        (dict(dropout=1.0), ValueError, r"dropout must lie in \[0, 1\)"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        S4(**{"d_model": 6, "d_state": 8, **kwargs}, rngs=nnx.Rngs(0))


def test_final_act_none_and_postact():
    x = np.random.default_rng(2).standard_normal((1, 3, 6)).astype(np.float32)
    model = S4D(d_model=6, d_state=8, final_act=None, transposed=False, rngs=nnx.Rngs(0))
    assert model.output_linear is None and "output_linear.0.weight" not in model.lrnnx_entries()
    assert S4D(d_model=6, d_state=8, final_act=None, postact="glu", rngs=nnx.Rngs(0)).output_linear is not None
    chex.assert_shape(model(x), (1, 3, 6))
