"""Mamba (S6): a float64 NumPy reference of lrnnx's math for every discretization with and
without event mode (forward, step and prefill), the forward, ``step`` and ``multi_step`` from a
prefill's cache (with ``lengths``), the cell on the fused kernels (interpret mode, and lowered
to Triton), chunked vs unchunked vs sequential scans (values and gradients), the scan's memory,
the initialisation, and constructor errors.

The generic checks (lengths, finite-difference gradients, bf16, transforms, bad input) run on the
Mamba entries of tests/zoo.py; the lrnnx fixtures 16-20 run in tests/test_convert.py.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import relative_error, run_steps
from lrnnx_jax.convert import load_lrnnx_state_dict
from lrnnx_jax.models.ltv.mamba import DISCRETIZATIONS, Mamba, selective_scan
from pallas_kernels import KernelConfig
from pallas_kernels import fused_generation as fg

#: the Pallas kernels in interpret mode (how they run on a CPU), and the XLA drivers
INTERPRET = KernelConfig(use_kernels="always", interpret=True)
NEVER = KernelConfig(use_kernels="never")


# --------------------------------------------------------------------------- reference
def _softplus(v):
    return np.logaddexp(0.0, v)


def _silu(v):
    return v / (1 + np.exp(-v))


def reference_mamba(sd, x, tau, discretization, *, lrnnx_bilinear_step=False):
    """lrnnx's Mamba in float64, token by token, from an lrnnx ``state_dict``.

    ``lrnnx_bilinear_step`` reproduces lrnnx's step for ``"bilinear"``, which uses
    ``A_bar = exp(delta_A A)``: the tests show that ours does not.

    Returns ``(y (B, L, H), conv_state (B, D, K), h (B, D, N))`` after the last token.
    """
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    x = np.asarray(x, np.float64)
    batch, length, _ = x.shape
    W_in, W_x, W_dt, W_out = sd["in_proj.weight"], sd["x_proj.weight"], sd["dt_proj.weight"], sd["out_proj.weight"]
    D, R = W_dt.shape
    N = (W_x.shape[0] - R) // 2
    conv_w = sd["conv1d.weight"][:, 0, :]  # (D, K), oldest tap first
    K = conv_w.shape[1]
    A = -np.exp(sd["A_log"])  # (D, N)
    history = np.zeros((batch, D, K))  # raw conv inputs, newest last
    h = np.zeros((batch, D, N))
    ys = []
    for t in range(length):
        xz = x[:, t] @ W_in.T + sd.get("in_proj.bias", 0.0)
        x_in, z = xz[:, :D], xz[:, D:]
        history = np.concatenate([history[:, :, 1:], x_in[:, :, None]], axis=2)
        u = _silu(np.einsum("bdk,dk->bd", history, conv_w) + sd.get("conv1d.bias", 0.0))
        proj = u @ W_x.T
        r, B_t, C_t = proj[:, :R], proj[:, R : R + N], proj[:, R + N :]
        delta = _softplus(r @ W_dt.T + sd["dt_proj.bias"])[:, :, None]  # (B, D, 1)
        dA = delta if tau is None else tau[:, t, None, None] * _softplus(sd["dtA_proj.bias"])[None, :, None]
        if discretization == "mamba":
            A_bar, gamma = np.exp(dA * A), delta
        elif discretization == "zoh":
            A_bar, gamma = np.exp(dA * A), np.expm1(delta * A) / A
        elif discretization == "bilinear":
            A_bar = np.exp(dA * A) if lrnnx_bilinear_step else (1 + dA * A / 2) / (1 - dA * A / 2)
            gamma = delta / (1 - delta * A / 2)
        else:  # dirac
            A_bar, gamma = np.exp(dA * A), 1.0
        h = A_bar * h + gamma * B_t[:, None, :] * u[:, :, None]
        y = (np.einsum("bdn,bn->bd", h, C_t) + sd["D"] * u) * _silu(z)
        ys.append(y @ W_out.T + sd.get("out_proj.bias", 0.0))
    return np.stack(ys, 1), history, h


def random_state_dict(model, seed, delta_range=(0.05, 1.0)):
    """A random lrnnx ``state_dict`` for ``model``'s layout with realistic steps.

    ``softplus(b_dt)`` is uniform in ``delta_range`` and ``-A`` in ``[0.5, 4]``, so ``delta * A``
    reaches O(1), where the discretizations (and lrnnx's bilinear step) differ visibly.
    """
    rng = np.random.default_rng(seed)
    sd = {}
    for name, entry in model.lrnnx_entries().items():
        fan_in = entry.shape[-1]
        sd[name] = (rng.standard_normal(entry.shape) / math.sqrt(fan_in)).astype(np.float32)
    D = model.d_inner
    sd["dt_proj.bias"] = np.log(np.expm1(rng.uniform(*delta_range, D))).astype(np.float32)
    sd["dtA_proj.bias"] = rng.standard_normal(D).astype(np.float32)
    sd["A_log"] = np.log(rng.uniform(0.5, 4.0, (D, model.d_state))).astype(np.float32)
    sd["D"] = rng.standard_normal(D).astype(np.float32)
    return sd


@nnx.jit
def forward_steps_and_prefill(model, x, tau, split):
    """Forward; the step loop from a fresh cache; the prefill cache after ``split`` tokens.

    One forward call over the batch stacked twice, with lengths ``L`` for the first copy
    and ``split`` for the second, serves both the full forward and the prefill.
    """
    batch, length, _ = x.shape
    lengths = jnp.concatenate([jnp.full((batch,), length), jnp.full((batch,), split)])
    y_both, prefill_cache = model(
        jnp.concatenate([x, x]), integration_timesteps=None if tau is None else jnp.concatenate([tau, tau]),
        lengths=lengths, return_cache=True,
    )

    def body(cache, inputs):
        x_t, tau_t = inputs
        y_t, cache = model.step(x_t, cache, integration_timesteps=tau_t)
        return cache, y_t

    cache, y_steps = jax.lax.scan(
        body, model.allocate_inference_cache(batch), (jnp.moveaxis(x, 1, 0), None if tau is None else tau.T)
    )
    prefill_cache = jax.tree.map(lambda a: a[batch:], prefill_cache)
    return y_both[:batch], jnp.moveaxis(y_steps, 0, 1), cache, y_both[batch:], prefill_cache


CASES = [(d, e) for d in DISCRETIZATIONS for e in (False, True)]


@pytest.mark.parametrize("discretization,event", CASES, ids=[f"{d}-{'event' if e else 'plain'}" for d, e in CASES])
def test_forward_step_and_prefill_match_float64_reference(discretization, event):
    # one size for every case (sizes vary in the zoo entries); chunking and biases vary here
    i = DISCRETIZATIONS.index(discretization)
    chunk_size = (None, 4, 1, 3)[i]
    model = Mamba(d_model=6, d_state=4, bias=event, conv_bias=not event, discretization=discretization,
                  chunk_size=chunk_size, rngs=nnx.Rngs(i))
    sd = random_state_dict(model, seed=10 + i)
    load_lrnnx_state_dict(model, sd)
    rng = np.random.default_rng(20 + i)
    batch, length, split = 2, 9, 5
    x = rng.standard_normal((batch, length, 6)).astype(np.float32)
    tau = rng.uniform(0.05, 2.0, (batch, length)).astype(np.float32) if event else None

    with jax.default_matmul_precision("highest"):
        y, y_steps, cache, y_head, prefill_cache = forward_steps_and_prefill(model, x, tau, split)
    y_ref, conv_ref, h_ref = reference_mamba(sd, x, tau, discretization)
    chex.assert_shape([y, y_steps], (batch, length, 6))
    chex.assert_type([y, y_steps], jnp.float32)
    assert relative_error(y, y_ref) < 1e-5
    assert relative_error(y_steps, y_ref) < 1e-5
    np.testing.assert_allclose(cache["conv_state"], conv_ref, rtol=1e-5, atol=1e-6)
    assert relative_error(cache["lrnn_state"], h_ref) < 1e-5

    # the prefill cache is the reference state after `split` tokens
    y_ref_head, conv_head, h_head = reference_mamba(sd, x[:, :split], None if tau is None else tau[:, :split], discretization)
    assert relative_error(y_head[:, :split], y_ref_head) < 1e-5
    assert np.all(np.asarray(y_head[:, split:]) == 0)
    chex.assert_shape(prefill_cache["lrnn_state"], (batch, model.d_inner, model.d_state))
    np.testing.assert_allclose(prefill_cache["conv_state"], conv_head, rtol=1e-5, atol=1e-6)
    assert relative_error(prefill_cache["lrnn_state"], h_head) < 1e-5

    if discretization == "bilinear":
        # lrnnx's bilinear step (exp(delta_A A)) is far outside our tolerance: the test would catch it
        y_lrnnx_step, _, _ = reference_mamba(sd, x, tau, discretization, lrnnx_bilinear_step=True)
        assert relative_error(y_lrnnx_step, y_ref) > 1e-3


# ------------------------------------------------------------ from a cache (shared)
def _cols(a, columns):
    return None if a is None else a[:, columns]


def assert_caches_close(ours, theirs, err_msg=""):
    assert set(ours) == set(theirs), err_msg
    for key in theirs:
        chex.assert_equal_shape([ours[key], theirs[key]])
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-5, atol=1e-6, err_msg=f"{err_msg} {key}")


def check_forward_from_cache(model, x, tau, split, y_ref, tol=1e-5):
    """Everything that continues from the cache of a prefill of ``x[:, :split]`` continues the sequence.

    ``y_ref (B, L, H)`` is a float64 reference of the whole sequence. The forward of the tail from
    the prefill's cache, ``step`` after ``step`` and ``multi_step`` (the XLA driver, with every
    token's cache) must give the reference's tail and the full forward's caches; the tail with
    ``lengths`` the cache after each row's last valid token (a zero length: the prefill's own).
    Shared with tests/test_rglru.py. Returns the prefill's cache.
    """
    batch, length, _ = x.shape
    y_full, cache_full = model(x, integration_timesteps=tau, return_cache=True)
    assert relative_error(y_full, y_ref) < tol
    y_head, cache = model(x[:, :split], integration_timesteps=_cols(tau, slice(None, split)), return_cache=True)
    tail_x, tail_tau = x[:, split:], _cols(tau, slice(split, None))
    y_tail, cache_tail = model(tail_x, integration_timesteps=tail_tau, cache=cache, return_cache=True)
    assert relative_error(np.concatenate([y_head, y_tail], 1), y_ref) < tol
    assert_caches_close(cache_tail, cache_full, "forward from the cache")
    np.testing.assert_allclose(model(tail_x, integration_timesteps=tail_tau, cache=cache), y_tail, rtol=1e-6, atol=1e-7)

    y_steps, cache_steps = run_steps(model, tail_x, tail_tau, cache)
    assert relative_error(y_steps, y_ref[:, split:]) < tol
    assert_caches_close(cache_steps, cache_full, "step")

    y_multi, cache_multi, states = model.multi_step(tail_x, cache, tail_tau, return_states=True, kernel_config=NEVER)
    assert relative_error(y_multi, y_ref[:, split:]) < tol
    assert_caches_close(cache_multi, cache_full, "multi_step")
    for key, value in states.items():
        chex.assert_shape(value, (batch, length - split, *cache[key].shape[1:]))
        assert value.dtype == cache[key].dtype
    assert_caches_close(jax.tree.map(lambda a: a[:, -1], states), cache_multi, "the last of multi_step's states")
    middle = (length - split) // 2  # the state after split + middle + 1 tokens
    _, cache_middle = model(x[:, :split + middle + 1], integration_timesteps=_cols(tau, slice(None, split + middle + 1)),
                            return_cache=True)
    assert_caches_close(jax.tree.map(lambda a: a[:, middle], states), cache_middle, "a middle state of multi_step")

    # the tail with lengths: row 0 whole, row 1 two tokens, the other rows none
    lengths = np.zeros(batch, np.int32)
    lengths[:2] = length - split, 2
    y_len, cache_len = model(tail_x, integration_timesteps=tail_tau, lengths=jnp.asarray(lengths), cache=cache,
                             return_cache=True)
    assert relative_error(y_len[0], y_ref[0, split:]) < tol
    assert relative_error(y_len[1, :2], y_ref[1, split:split + 2]) < tol
    assert np.all(np.asarray(y_len[1, 2:]) == 0) and np.all(np.asarray(y_len[2:]) == 0)
    _, cache_two = model(x[:, :split + 2], integration_timesteps=_cols(tau, slice(None, split + 2)), return_cache=True)
    row = lambda tree, i: jax.tree.map(lambda a: a[i], tree)  # noqa: E731
    assert_caches_close(row(cache_len, 0), row(cache_full, 0), "lengths, whole row")
    assert_caches_close(row(cache_len, 1), row(cache_two, 1), "lengths, two tokens")
    for i in range(2, batch):
        for key in cache:
            np.testing.assert_array_equal(cache_len[key][i], cache[key][i])  # a zero length keeps the cache
    return cache


@pytest.mark.parametrize("discretization,event,split", [("zoh", True, 4), ("mamba", False, 7), ("bilinear", True, 1)])
def test_forward_step_and_multi_step_from_a_cache_continue_the_reference(discretization, event, split):
    model = Mamba(d_model=5, d_state=3, d_conv=3, bias=event, discretization=discretization, chunk_size=3,
                  rngs=nnx.Rngs(3))
    sd = random_state_dict(model, seed=31)
    load_lrnnx_state_dict(model, sd)
    rng = np.random.default_rng(32)
    x = rng.standard_normal((3, 9, 5)).astype(np.float32)
    tau = rng.uniform(0.05, 2.0, (3, 9)).astype(np.float32) if event else None
    y_ref, conv_ref, h_ref = reference_mamba(sd, x, tau, discretization)
    with jax.default_matmul_precision("highest"):
        cache = check_forward_from_cache(model, x, tau, split, y_ref)
    _, conv_head, h_head = reference_mamba(sd, x[:, :split], _cols(tau, slice(None, split)), discretization)
    np.testing.assert_allclose(cache["conv_state"], conv_head, rtol=1e-5, atol=1e-6)
    assert relative_error(cache["lrnn_state"], h_head) < 1e-5


# ---------------------------------------------------------------------------- the cell
@pytest.mark.parametrize("discretization,event", [("zoh", "step"), ("dirac", "row"), ("mamba", None)])
def test_cell_on_the_fused_kernels_equals_multi_step_and_the_forward(discretization, event):
    """The cell in one Pallas kernel (interpret mode; padded lanes: D=7, N=3, R=2, K=2) from a prefill's cache:
    given tokens (the multi-token kernel), the closed loop and the one-step kernel of ``model.step``."""
    model = Mamba(d_model=5, d_state=3, d_conv=2, expand=1.5, dt_rank=2, bias=event == "step",
                  conv_bias=event != "step", discretization=discretization, rngs=nnx.Rngs(4))
    load_lrnnx_state_dict(model, random_state_dict(model, seed=41))
    rng = np.random.default_rng(42)
    batch, length, split = 2, 6, 2
    T = length - split
    x = rng.standard_normal((batch, length, 5)).astype(np.float32)
    tau = {"step": rng.uniform(0.05, 2.0, (batch, length)), "row": np.tile(rng.uniform(0.05, 2.0, (batch, 1)), length),
           None: None}[event]
    tau = None if tau is None else tau.astype(np.float32)
    with jax.default_matmul_precision("highest"):
        y_full = model(x, integration_timesteps=tau)
    _, cache = model(x[:, :split], integration_timesteps=_cols(tau, slice(None, split)), return_cache=True)
    tail_tau = _cols(tau, slice(split, None))
    y_multi, cache_multi = model.multi_step(x[:, split:], cache, tail_tau, kernel_config=NEVER)

    cell = model.cell()
    assert fg.unsupported_reason(cell, batch, jnp.float32) is None
    state = model.cell_state(cache)
    if event == "row":  # a (B,) tau for every step, as generate passes it
        row_inputs, step_inputs = model.cell_inputs((batch,), jnp.asarray(tau[:, 0])), {}
    else:
        row_inputs, step_inputs = {}, model.cell_inputs((batch, T), tail_tau)
    ys, final = fg.run_cell(cell, state, x[:, split], T, row_inputs, step_inputs, config=INTERPRET, xs=x[:, split:])
    assert relative_error(ys, y_multi) < 1e-5
    assert relative_error(ys, y_full[:, split:]) < 1e-5
    assert_caches_close(model.cell_cache(final, cache), cache_multi, "run_cell")
    y_kernel, cache_kernel = model.multi_step(x[:, split:], cache, tail_tau, kernel_config=INTERPRET)
    assert relative_error(y_kernel, y_multi) < 1e-5
    assert_caches_close(cache_kernel, cache_multi, "multi_step on the kernel")

    # one step: the one-step kernel and the XLA driver
    tau_t = _cols(tau, split)
    y_t, cache_t = model.step(x[:, split], cache, tau_t, kernel_config=INTERPRET)
    y_ref_t, cache_ref_t = model.step(x[:, split], cache, tau_t, kernel_config=NEVER)
    assert relative_error(y_t, y_ref_t) < 1e-5
    assert_caches_close(cache_t, cache_ref_t, "step on the kernel")

    if event != "step":  # the closed loop (each output the next input) against model.step
        ys_loop, _ = fg.run_cell(cell, state, x[:, split], 3, row_inputs, config=INTERPRET)
        x_t, c = x[:, split], cache
        for t in range(3):
            x_t, c = model.step(x_t, c, None if tau is None else tau[:, 0], kernel_config=NEVER)
            assert relative_error(ys_loop[:, t], x_t) < 1e-5, t


def test_cell_layout_dtypes_and_policy():
    model = Mamba(d_model=4, d_state=2, bias=True, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    cell = model.cell()
    D, N, R, H = model.d_inner, model.d_state, model.dt_rank, model.d_model
    shapes = {name: value.shape for name, value in cell.params.items()}
    assert shapes == {
        "Win_x": (D, H), "Win_z": (D, H), "Win_x_b": (D,), "Win_z_b": (D,), "conv_w0": (D,), "conv_w1": (D,),
        "conv_w2": (D,), "conv_w3": (D,), "conv_b": (D,), "Wx_r": (R, D), "Wx_B": (N, D), "Wx_C": (N, D),
        "Wdt": (R, D), "Wdt_b": (D,), "A": (D, N), "Dskip": (D,), "dtA": (D,), "Wout": (D, H), "Wout_b": (H,),
    }
    assert all(value.dtype == jnp.float32 for value in cell.params.values())
    np.testing.assert_array_equal(cell.params["A"], -np.exp(np.asarray(model.A_log[...])))
    np.testing.assert_allclose(cell.params["dtA"], jax.nn.softplus(np.asarray(model.dtA_proj.bias[...], np.float32)),
                               rtol=1e-2)
    assert cell.pad_values == {"A": -1.0} and cell.blockable  # a split run may take blocks of rows
    # the padded lanes of A: a finite nonzero value, so that zoh's expm1(delta A) / A stays finite there
    assert np.all(np.asarray(fg.padded_params(cell)["A"])[D:, :] == -1.0)
    cache = model.allocate_inference_cache(3)
    state = model.cell_state(cache)
    assert set(state) == {"conv0", "conv1", "conv2", "conv3", "h"}
    chex.assert_shape([state["conv0"], state["h"]], [(3, D), (3, D, N)])
    assert_caches_close(model.cell_cache(state, cache), cache)
    # measured on an H200: the split rollout faster than the XLA program up to B=32 (no split fits above); the
    # XLA step kept
    assert cell.policy.slower_reason("rollout", 512) is None and "H200" in cell.policy.evidence
    assert cell.policy.slower_reason("rollout", 513) is not None
    assert cell.policy.slower_reason("step", 1) is not None
    assert cell.split.channels == D and cell.split.params["Wx_B"] == 1 and "Wout_b" not in cell.split.params


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
def test_cell_lowers_to_triton(lower_for_h100):
    """Interpret mode cannot see an operation without a Triton lowering; lowering for an H100 does."""
    model = Mamba(d_model=5, d_state=3, d_conv=3, bias=True, discretization="zoh", rngs=nnx.Rngs(0))
    leaves, treedef = jax.tree.flatten(model)
    config = KernelConfig(use_kernels="always", interpret=False)

    def given_tokens(leaves, xs, cache, taus):
        m = jax.tree.unflatten(treedef, leaves)
        return fg.run_cell(m.cell(), m.cell_state(cache), xs[:, 0], xs.shape[1],
                           step_inputs=m.cell_inputs(taus.shape, taus), config=config, xs=xs)

    def one_step(leaves, x, cache, tau):
        m = jax.tree.unflatten(treedef, leaves)
        return fg.run_cell(m.cell(), m.cell_state(cache), x, 1, m.cell_inputs(tau.shape, tau), config=config)

    cache = model.allocate_inference_cache(2)
    lower_for_h100(given_tokens, leaves, jnp.ones((2, 4, 5)), cache, jnp.ones((2, 4)))
    lower_for_h100(one_step, leaves, jnp.ones((2, 5)), cache, jnp.ones((2,)))


def test_float64_tokens_with_a_float32_cache_keep_the_cache_dtype():
    """The cell's state keeps the cache's dtype: float64 tokens from a float32 cache give a float32 cache (the
    state rounded to float32 after every token) and float64 outputs close to those from a float64 cache."""
    with jax.enable_x64(True):
        model = Mamba(d_model=4, d_state=2, d_conv=2, rngs=nnx.Rngs(0))
        x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 4)))
        tau = jnp.full((2, 3), 0.5)
        y32, cache32, states = model.multi_step(x, model.allocate_inference_cache(2), tau, return_states=True)
        y64, cache64 = model.multi_step(x, model.allocate_inference_cache(2, dtype=jnp.float64), tau)
        assert y32.dtype == y64.dtype == jnp.float64
        for key in cache32:
            assert cache32[key].dtype == states[key].dtype == jnp.float32 and cache64[key].dtype == jnp.float64
            np.testing.assert_allclose(cache32[key], cache64[key], rtol=1e-6, atol=1e-7)
        assert relative_error(y32, y64) < 1e-6


# ------------------------------------------------------------------- scan variants
def test_chunked_unchunked_and_sequential_agree_in_values_and_gradients():
    model = Mamba(d_model=6, d_state=4, discretization="bilinear", rngs=nnx.Rngs(0))
    load_lrnnx_state_dict(model, random_state_dict(model, seed=1))
    rng = np.random.default_rng(2)
    batch, length = 3, 10
    lengths = jnp.array([10, 6, 1])
    weights = rng.standard_normal((batch, length, 6))
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((batch, length, 6)))
        tau = jnp.asarray(rng.uniform(0.05, 2.0, (batch, length)))
        graphdef, params = nnx.split(model, nnx.Param)
        params = jax.tree.map(lambda a: a.astype(jnp.float64), params)

        results = {}
        for chunk_size in (None, 1, 3):  # unchunked, sequential, chunked (10 = 3 + 3 + 3 + 1: padded)
            model_c = nnx.merge(graphdef, params)
            model_c.chunk_size = chunk_size
            graphdef_c, _ = nnx.split(model_c, nnx.Param)

            def loss(p, xx):
                y, cache = nnx.merge(graphdef_c, p)(xx, integration_timesteps=tau, lengths=lengths, return_cache=True)
                return jnp.sum(y * weights) + jnp.sum(cache["lrnn_state"] ** 2), (y, cache)

            (_, aux), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
            results[chunk_size] = (aux, grads)

    ref_aux, ref_grads = results[None]
    assert np.all(np.asarray(ref_aux[0][1, 6:]) == 0)
    for chunk_size, (aux, grads) in results.items():
        for ours, theirs in zip(jax.tree.leaves((aux, grads)), jax.tree.leaves((ref_aux, ref_grads))):
            chex.assert_type(ours, jnp.float64)
            np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12, err_msg=f"chunk_size={chunk_size}")


def _scan_train_temp_bytes(chunk_size, length, D, N):
    """XLA's temporary memory of forward + backward of :func:`selective_scan` (B=1, float32)."""
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    inputs = {"u": f32(1, length, D), "z": f32(1, length, D), "delta": f32(1, length, D), "B": f32(1, length, N), "C": f32(1, length, N)}

    def loss(inputs, A, dtA_bias, D_skip):
        y, _ = selective_scan(inputs, A, dtA_bias, D_skip, jnp.zeros((1, D, N)), chunk_size=chunk_size)
        return jnp.sum(y**2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    return grad.lower(inputs, f32(D, N), f32(D), f32(D)).compile().memory_analysis().temp_size_in_bytes


def test_chunked_scan_memory_grows_as_length_times_channels_not_times_state():
    D = N = 64
    chunked = {L: _scan_train_temp_bytes(32, L, D, N) for L in (256, 512)}
    per_token = (chunked[512] - chunked[256]) / 256
    # the per-token inputs and their gradients, O(D + N), and no per-token (D, N) state (the unchunked
    # scan keeps about 17 float32 (L, D, N) tensors: benchmarks/benchmark_scan_memory.py)
    assert per_token <= 8 * (D + N) * 4
    assert per_token <= D * N * 4 / 4


# ------------------------------------------------------------- init and interface
def test_parameters_have_lrnnx_names_shapes_and_initialisation():
    H, N, R = 64, 8, 4  # dt_rank "auto" = ceil(64 / 16) = 4
    model = Mamba(d_model=H, d_state=N, dt_min=0.01, dt_max=0.1, rngs=nnx.Rngs(0))
    D, K = 2 * H, 4
    shapes = {name: entry.shape for name, entry in model.lrnnx_entries().items()}
    assert shapes == {
        "in_proj.weight": (2 * D, H), "conv1d.weight": (D, 1, K), "conv1d.bias": (D,),
        "x_proj.weight": (R + 2 * N, D), "dt_proj.weight": (D, R), "dt_proj.bias": (D,),
        "dtA_proj.weight": (D, R), "dtA_proj.bias": (D,), "A_log": (D, N), "D": (D,), "out_proj.weight": (H, D),
    }
    assert model.dt_rank == R and model.d_inner == D
    np.testing.assert_allclose(model.A_log[...], np.log(np.tile(np.arange(1, N + 1), (D, 1))), rtol=1e-6)
    np.testing.assert_array_equal(model.D[...], np.ones(D))
    dt = np.asarray(jax.nn.softplus(model.dt_proj.bias[...]))
    assert dt.min() >= 0.01 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert dt.min() < 0.02 and dt.max() > 0.05  # log-uniform over the range
    for kernel, bound in ((model.dt_proj.kernel, R**-0.5), (model.in_proj.kernel, H**-0.5), (model.conv_weight, K**-0.5)):
        values = np.abs(np.asarray(kernel[...]))
        assert values.max() <= bound and values.max() > 0.8 * bound
    constant = Mamba(d_model=H, dt_init="constant", dt_scale=2.0, dt_rank=16, dt_init_floor=0.05, bias=True, conv_bias=False,
                     dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(np.asarray(constant.dt_proj.kernel[...], np.float32), np.float32(2.0 / 4))
    assert float(jnp.min(jax.nn.softplus(constant.dt_proj.bias[...].astype(jnp.float32)))) >= 0.05 * 0.99
    assert {"in_proj.bias", "out_proj.bias"} <= set(constant.lrnnx_entries()) and "conv1d.bias" not in constant.lrnnx_entries()
    assert constant.in_proj.kernel[...].dtype == jnp.bfloat16 and constant.A_log[...].dtype == jnp.float32
    cache = model.allocate_inference_cache(batch_size=3)
    chex.assert_shape([cache["conv_state"], cache["lrnn_state"]], [(3, D, K), (3, D, N)])
    chex.assert_type([cache["conv_state"], cache["lrnn_state"]], jnp.float32)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(dt_rank=0), r"dt_rank must be a positive integer or 'auto', got 0"),
        (dict(dt_rank=2.5), r"dt_rank must be a positive integer or 'auto', got 2.5"),
        (dict(dt_rank="full"), r"dt_rank must be a positive integer or 'auto', got 'full'"),
        (dict(dt_rank=True), r"dt_rank must be a positive integer or 'auto', got True"),
        (dict(discretization="async"), r"unknown discretization 'async'; expected one of \['bilinear', 'dirac', 'mamba', 'zoh'\]"),
        (dict(discretization="s7"), r"unknown discretization 's7'"),
        (dict(dt_init="normal"), r"dt_init must be one of \['random', 'constant'\], got 'normal'"),
        (dict(dt_min=0.2, dt_max=0.1), r"need 0 < dt_min <= dt_max, got dt_min=0.2, dt_max=0.1"),
        (dict(expand=0), r"expand must be a positive number"),
        (dict(d_state=0), r"d_state must be a positive integer, got 0"),
        (dict(chunk_size=0), r"chunk_size must be a positive integer or None, got 0"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Mamba(d_model=4, **kwargs, rngs=nnx.Rngs(0))


def test_bad_integration_timesteps_raise_in_forward_and_step():
    model = Mamba(d_model=4, d_state=2, rngs=nnx.Rngs(0))
    x = np.ones((2, 3, 4), np.float32)
    tau = np.full((2, 3), 0.5, np.float32)
    # (B, L, 1) is accepted as (B, L)
    np.testing.assert_array_equal(model(x, integration_timesteps=tau[..., None]), model(x, integration_timesteps=tau))
    with pytest.raises(ValueError, match=r"integration_timesteps must have shape \(2, 3\), got \(3, 2\)"):
        model(x, integration_timesteps=tau.T)
    with pytest.raises(TypeError, match="integration_timesteps must have a floating dtype"):
        model(x, integration_timesteps=np.ones((2, 3), np.int32))
    cache = model.allocate_inference_cache(2)
    with pytest.raises(ValueError, match=r"integration_timesteps must have shape \(2,\), got \(2, 3\)"):
        model.step(x[:, 0], cache, integration_timesteps=tau)
    with pytest.raises(ValueError, match="integration_timesteps must be > 0"):
        model.step(x[:, 0], cache, integration_timesteps=-tau[:, :1])


def test_verify_step_on_the_checkpointed_ssu_kernel_and_its_layouts():
    """The "mamba" discretization verifies through the checkpointed SSU (per-channel variant): its Pallas kernel
    (interpret mode) equals the op's reference over three calls with random acceptance, and both equal plain
    step over the accepted tokens; event mode needs (and gets, with checkpointed_ssu=False) the generic cache."""
    model = Mamba(d_model=6, d_state=4, d_conv=3, dt_min=0.05, dt_max=0.5, rngs=nnx.Rngs(21))
    rng = np.random.default_rng(21)
    batch, T = 2, 3
    assert "old_conv_in" in model.allocate_verify_cache(batch, T)
    caches = {mode: model.allocate_verify_cache(batch, T) for mode in ("always", "never")}
    committed, accepted, previous = model.allocate_inference_cache(batch), None, None
    for call in range(3):
        x = rng.standard_normal((batch, T, 6)).astype(np.float32)
        if previous is not None:
            rows = []
            for b in range(batch):
                row = jax.tree.map(lambda a: a[b : b + 1], committed)
                for t in range(int(accepted[b])):
                    _, row = model.step(previous[b : b + 1, t], row)
                rows.append(row)
            committed = jax.tree.map(lambda *r: jnp.concatenate(r), *rows)
        expected, _ = run_steps(model, x, cache=committed)
        for mode in caches:
            y, caches[mode] = model.verify_step(x, caches[mode], None if accepted is None else jnp.asarray(accepted),
                                                kernel_config=KernelConfig(use_kernels=mode))
            assert relative_error(y, expected) < 1e-5, (mode, call)
            np.testing.assert_allclose(caches[mode]["checkpoint"]["lrnn_state"], committed["lrnn_state"], rtol=1e-5, atol=1e-6)
        previous, accepted = x, jnp.asarray(rng.integers(0, T + 1, batch), jnp.int32)
    tau = np.ones((batch, T), np.float32)
    with pytest.raises(ValueError, match=r"event mode\) need the generic verify cache"):
        model.verify_step(x, caches["never"], accepted, integration_timesteps=tau)
    generic = model.allocate_verify_cache(batch, T, checkpointed_ssu=False)
    assert "old_tau" in generic and "old_conv_in" not in generic
    model.verify_step(x, generic, None, integration_timesteps=tau)
    with pytest.raises(ValueError, match="checkpointed_ssu=True needs discretization='mamba'"):
        Mamba(d_model=6, d_state=4, discretization="zoh", rngs=nnx.Rngs(0)).allocate_verify_cache(2, 3, checkpointed_ssu=True)
