"""The interface contract, checked for every configuration in tests/zoo.py.

forward == step-by-step, prefill (``return_cache``) then decode, the forward continued from
a cache (chunked prefill, with ``lengths``), ``multi_step`` and its per-token states, ``lengths``,
gradients against finite differences (float64), bf16 inputs, JAX/NNX
transforms, and clear errors for bad input.
"""

from __future__ import annotations

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import relative_error, same_through_capture
from zoo import ZOO, H

ENTRIES = pytest.mark.parametrize("entry", ZOO, ids=[e.name for e in ZOO])


def make_inputs(entry, batch=3, length=11, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, length, H)).astype(dtype)
    tau = rng.uniform(0.05, 1.5, (batch, length)).astype(dtype) if entry.event else None
    return x, tau


def step_loop(model, x, tau, cache=None):
    if cache is None:
        cache = model.allocate_inference_cache(x.shape[0], max_seqlen=x.shape[1])
    step = nnx.jit(lambda m, x_t, c, tau_t: m.step(x_t, c, integration_timesteps=tau_t))
    ys = []
    for t in range(x.shape[1]):
        y_t, cache = step(model, x[:, t], cache, None if tau is None else tau[:, t : t + 1])
        chex.assert_shape(y_t, (x.shape[0], H))
        ys.append(y_t)
    return np.stack(ys, 1), cache


@ENTRIES
def test_forward_matches_step(entry):
    model = entry.build(seed=1)
    x, tau = make_inputs(entry)
    y_step, _ = step_loop(model, x, tau)
    for method in entry.methods or (None,):
        if method is not None:
            model.method = method
        y = model(x, integration_timesteps=tau)
        chex.assert_shape(y, x.shape)
        chex.assert_type(y, jnp.float32)
        assert relative_error(y, y_step) < entry.rtol, method


MULTI_PATH = [e for e in ZOO if len(e.methods) > 1]


@pytest.mark.parametrize("entry", MULTI_PATH, ids=[e.name for e in MULTI_PATH])
def test_methods_agree(entry):
    model = entry.build(seed=2)
    x, tau = make_inputs(entry, length=70, seed=2)  # long enough for 'auto' to choose FFT
    outs = {}
    for method in entry.methods:
        model.method = method
        outs[method] = np.asarray(model(x, integration_timesteps=tau))
    first = outs[entry.methods[0]]
    for method, y in outs.items():
        assert relative_error(y, first) < 1e-5, method


@ENTRIES
def test_prefill_then_step_continues_the_sequence(entry):
    model = entry.build(seed=3)
    x, tau = make_inputs(entry, length=13, seed=3)
    y_full = model(x, integration_timesteps=tau)
    split = 8
    for method in entry.methods or (None,):
        if method is not None:
            model.method = method
        y_head, cache = model(x[:, :split], integration_timesteps=None if tau is None else tau[:, :split], return_cache=True)
        y_tail, _ = step_loop(model, x[:, split:], None if tau is None else tau[:, split:], cache)
        assert relative_error(np.concatenate([y_head, y_tail], 1), y_full) < entry.rtol, method


def _rows(cache, rows):
    return {k: v[rows] for k, v in cache.items()}


def _assert_caches_close(ours, theirs, rtol=1e-4, atol=1e-5):
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        chex.assert_equal_shape([ours[key], theirs[key]])
        np.testing.assert_allclose(np.asarray(ours[key]), np.asarray(theirs[key]), rtol=rtol, atol=atol, err_msg=key)


@ENTRIES
def test_forward_continues_from_a_cache(entry):
    """model(x) == model(x[:, :a]) then model(x[:, a:], cache=...), for a random split a, every path (fft/scan),
    also with lengths on the second part: each row as if continued alone, and the state after its last valid step."""
    model = entry.build(seed=12)
    length = 14
    x, tau = make_inputs(entry, length=length, seed=12)
    split = int(np.random.default_rng(entry.name.__len__()).integers(1, length - 1))
    head = lambda a: None if a is None else a[:, :split]  # noqa: E731
    tail = lambda a: None if a is None else a[:, split:]  # noqa: E731
    for method in entry.methods or (None,):
        if method is not None:
            model.method = method
        y_full, cache_full = model(x, integration_timesteps=tau, return_cache=True)
        y_head, cache = model(x[:, :split], integration_timesteps=head(tau), return_cache=True)
        y_tail, cache_end = model(x[:, split:], integration_timesteps=tail(tau), cache=cache, return_cache=True)
        assert relative_error(np.concatenate([y_head, y_tail], 1), y_full) < entry.rtol, method
        _assert_caches_close(cache_end, cache_full)
        assert relative_error(model(x[:, split:], integration_timesteps=tail(tau), cache=cache), y_tail) < 1e-6

        lengths = np.array([length - split, 2, 0])
        x_garbage = np.array(x[:, split:])
        for b, n in enumerate(lengths):
            x_garbage[b, n:] = 1e4  # must not influence anything
        y_len, cache_len = model(x_garbage, integration_timesteps=tail(tau), lengths=jnp.asarray(lengths), cache=cache,
                                 return_cache=True)
        for b, n in enumerate(lengths):
            assert np.all(np.asarray(y_len[b, n:]) == 0)
            if n:
                tau_b = None if tau is None else tau[b : b + 1, split : split + n]
                y_b, cache_b = model(x[b : b + 1, split : split + n], integration_timesteps=tau_b, cache=_rows(cache, slice(b, b + 1)),
                                     return_cache=True)
                assert relative_error(y_len[b, :n], y_b[0]) < 1e-5, (method, b)
            else:
                cache_b = _rows(cache, slice(b, b + 1))  # no valid step: the state it started from
            _assert_caches_close(_rows(cache_len, slice(b, b + 1)), cache_b)


@ENTRIES
def test_multi_step_equals_the_forward_and_returns_every_state(entry):
    model = entry.build(seed=13)
    x, tau = make_inputs(entry, length=9, seed=13)
    split = 4
    y_full, cache_full = model(x, integration_timesteps=tau, return_cache=True)
    _, cache = model(x[:, :split], integration_timesteps=None if tau is None else tau[:, :split], return_cache=True)
    y, cache_end, states = model.multi_step(x[:, split:], cache, integration_timesteps=None if tau is None else tau[:, split:],
                                            return_states=True)
    chex.assert_shape(y, (3, 9 - split, H))
    assert relative_error(y, y_full[:, split:]) < entry.rtol
    _assert_caches_close(cache_end, cache_full)
    for t in range(9 - split):  # the state after token t is the prefill's cache of the first split + t + 1 tokens
        _, cache_t = model(x[:, : split + t + 1], integration_timesteps=None if tau is None else tau[:, : split + t + 1],
                           return_cache=True)
        _assert_caches_close({k: v[:, t] for k, v in states.items()}, cache_t)
    y_only, cache_only = model.multi_step(x[:, split:], cache, integration_timesteps=None if tau is None else tau[:, split:])
    np.testing.assert_allclose(np.asarray(y_only), np.asarray(y), rtol=1e-6, atol=1e-6)


@ENTRIES
def test_lengths_equal_running_each_row_alone(entry):
    model = entry.build(seed=4)
    x, tau = make_inputs(entry, batch=3, length=12, seed=4)
    lengths = np.array([12, 7, 1])
    x_garbage = x.copy()
    for b, n in enumerate(lengths):
        x_garbage[b, n:] = 1e4  # must not influence anything
    y, cache = model(x_garbage, integration_timesteps=tau, lengths=jnp.asarray(lengths), return_cache=True)
    for b, n in enumerate(lengths):
        tau_b = None if tau is None else tau[b : b + 1, :n]
        y_b, cache_b = model(x[b : b + 1, :n], integration_timesteps=tau_b, return_cache=True)
        assert relative_error(y[b, :n], y_b[0]) < 1e-5
        assert np.all(np.asarray(y[b, n:]) == 0)
        for key, value in cache_b.items():
            np.testing.assert_allclose(np.asarray(cache[key][b]), np.asarray(value[0]), rtol=1e-4, atol=1e-5)


def _to_float64(tree):
    def cast(a):
        if not hasattr(a, "dtype"):
            return a
        if jnp.issubdtype(a.dtype, jnp.complexfloating):
            return a.astype(jnp.complex128)
        if jnp.issubdtype(a.dtype, jnp.floating):
            return a.astype(jnp.float64)
        return a

    return jax.tree.map(cast, tree)


GRAD_CHECKED = [e for e in ZOO if e.grad_check]


@pytest.mark.parametrize("entry", GRAD_CHECKED, ids=[e.name for e in GRAD_CHECKED])
def test_gradients_match_finite_differences(entry):
    model = entry.build(seed=5)
    x, tau = make_inputs(entry, batch=2, length=6, seed=5, dtype=np.float64)
    graphdef, params = nnx.split(model, nnx.Param)
    with jax.enable_x64(True):
        params = _to_float64(params)
        x64 = jnp.asarray(x, jnp.float64)
        tau64 = None if tau is None else jnp.asarray(tau, jnp.float64)
        weights = jnp.asarray(np.random.default_rng(6).standard_normal(x.shape))

        @jax.jit
        def loss(p, xx):
            return jnp.sum(nnx.merge(graphdef, p)(xx, integration_timesteps=tau64) * weights)

        g_params, g_x = jax.grad(loss, argnums=(0, 1))(params, x64)
        for leaf in jax.tree.leaves((g_params, g_x)):
            assert np.all(np.isfinite(np.asarray(leaf)))
        rng = np.random.default_rng(7)
        direction = jax.tree.map(
            lambda a: jnp.asarray(rng.standard_normal(a.shape) + (1j * rng.standard_normal(a.shape) if jnp.iscomplexobj(a) else 0), a.dtype),
            params,
        )
        dx = jnp.asarray(rng.standard_normal(x.shape))
        analytic = sum(float(jnp.real(jnp.sum(g * v))) for g, v in zip(jax.tree.leaves(g_params), jax.tree.leaves(direction)))
        analytic += float(jnp.sum(g_x * dx))
        eps = 1e-6
        shift = lambda s: (jax.tree.map(lambda p, v: p + s * v, params, direction), x64 + s * dx)
        numeric = (loss(*shift(eps)) - loss(*shift(-eps))) / (2 * eps)
        assert abs(analytic - float(numeric)) <= 1e-6 * max(1.0, abs(analytic)), (analytic, float(numeric))


@ENTRIES
def test_bfloat16_input_runs_with_float32_state(entry):
    model = entry.build(seed=8)
    x, tau = make_inputs(entry, seed=8)
    y32 = model(x, integration_timesteps=tau)
    x16 = jnp.asarray(x, jnp.bfloat16)
    y16 = model(x16, integration_timesteps=tau)
    chex.assert_type(y16, jnp.bfloat16)
    y32_from_rounded = model(x16.astype(jnp.float32), integration_timesteps=tau)
    assert relative_error(y16.astype(jnp.float32), y32_from_rounded) < 1e-2
    assert relative_error(y16.astype(jnp.float32), y32) < 3e-2
    cache = model.allocate_inference_cache(x.shape[0])
    y_t, new_cache = model.step(x16[:, 0], cache, integration_timesteps=None if tau is None else tau[:, :1])
    chex.assert_type(y_t, jnp.bfloat16)
    for key, value in new_cache.items():
        assert value.dtype == cache[key].dtype, key


@ENTRIES
def test_jit_vmap_and_scan(entry):
    model = entry.build(seed=9)
    x, tau = make_inputs(entry, seed=9)
    y = np.asarray(model(x, integration_timesteps=tau))
    y_jit = nnx.jit(lambda m, xx, tt: m(xx, integration_timesteps=tt))(model, x, tau)
    np.testing.assert_allclose(y_jit, y, rtol=1e-5, atol=1e-5)
    # vmap over an extra leading axis of independent batches
    y_vmap = jax.vmap(lambda xx, tt: model(xx, integration_timesteps=tt))(x[:, None], None if tau is None else tau[:, None])
    np.testing.assert_allclose(y_vmap[:, 0], y, rtol=1e-4, atol=1e-5)
    # nnx.scan over time with the pure step
    cache = model.allocate_inference_cache(x.shape[0])

    @nnx.scan(in_axes=(None, nnx.Carry, 1, 1), out_axes=(nnx.Carry, 1))
    def run(m, c, x_t, tau_t):
        y_t, c = m.step(x_t, c, integration_timesteps=tau_t if entry.event else None)
        return c, y_t

    _, y_scan = run(model, cache, x, tau if entry.event else np.ones(x.shape[:2], np.float32))
    np.testing.assert_allclose(y_scan, y, rtol=1e-4, atol=1e-5)


@ENTRIES
def test_bad_input_raises_clear_errors(entry):
    model = entry.build()
    x, tau = make_inputs(entry, batch=2, length=5)
    with pytest.raises(ValueError, match=r"x must have shape \(B, L, H\).*got rank 2"):
        model(x[0])
    with pytest.raises(ValueError, match=rf"H={H}.*got shape \(2, 5, {H + 1}\)"):
        model(np.zeros((2, 5, H + 1), np.float32))
    with pytest.raises(TypeError, match="x must have a floating dtype.*int32"):
        model(np.zeros((2, 5, H), np.int32))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, L=5\]"):
        model(x, integration_timesteps=tau, lengths=jnp.array([6, 2]))
    with pytest.raises(ValueError, match=r"lengths must have shape \(B,\)"):
        model(x, integration_timesteps=tau, lengths=jnp.array([5, 2, 1]))
    cache = model.allocate_inference_cache(batch_size=3)
    with pytest.raises(ValueError, match="x_t has batch size 2 but the cache was allocated for batch size 3"):
        model.step(x[:, 0], cache, integration_timesteps=None if tau is None else tau[:, :1])
    with pytest.raises(ValueError, match=r"x_t must have shape \(B, H\)"):
        model.step(x, model.allocate_inference_cache(2))
    with pytest.raises(ValueError, match="x_t has batch size 2 but the cache was allocated for batch size 3"):
        model(x, integration_timesteps=tau, cache=cache)
    good = model.allocate_inference_cache(2)
    key = sorted(good)[0]
    bad_shape = {**good, key: good[key][..., :1] if good[key].shape[-1] > 1 else jnp.concatenate([good[key]] * 2, -1)}
    with pytest.raises(ValueError, match=rf"cache\['{key}'\] must have shape"):
        model(x, integration_timesteps=tau, cache=bad_shape)
    with pytest.raises(ValueError, match="cache must have the keys"):
        model(x, integration_timesteps=tau, cache={**good, "extra": good[key]})
    if model.supports_integration_timesteps:
        tau = np.random.default_rng(1).uniform(0.1, 1.0, (2, 5)).astype(np.float32)
        for bad, message in ((-tau, "must be > 0"), (tau * 0, "must be > 0"), (tau * np.nan, "must be finite")):
            with pytest.raises(ValueError, match=f"integration_timesteps {message}"):
                model(x, integration_timesteps=bad)
        with pytest.raises(ValueError, match=r"integration_timesteps must have shape \(2, 5\)"):
            model(x, integration_timesteps=tau[:, :3])
    else:
        with pytest.raises(ValueError, match="does not use integration_timesteps"):
            model(x, integration_timesteps=np.ones((2, 5), np.float32))


VERIFIED = [e for e in ZOO if e.name in ("LRU", "S5-async-event", "Mamba", "Mamba-bilinear-event-c4", "RGLRU-e2-k2-bias",
                                         "Mamba2", "Mamba2-g3-bias-hdim-normfirst", "S4-legt-r2-c2-gate-bottleneck", "S7-J1")]


@pytest.mark.parametrize("entry", VERIFIED, ids=[e.name for e in VERIFIED])
def test_verify_step_equals_steps_over_exactly_the_accepted_tokens(entry):
    """Ten verify_step calls of 4 drafted tokens with random acceptance: every call's outputs and the committed
    state equal plain ``step`` over exactly the accepted tokens (the drafts of a call run from the state after
    the previous calls' accepted prefixes)."""
    model = entry.build(seed=14)
    rng = np.random.default_rng(14)
    batch, T = 3, 4
    cache = model.allocate_verify_cache(batch, T)
    committed = model.allocate_inference_cache(batch)
    previous, previous_tau, accepted = None, None, None
    for call in range(10):
        x = rng.standard_normal((batch, T, H)).astype(np.float32)
        tau = rng.uniform(0.05, 1.5, (batch, T)).astype(np.float32) if entry.event else None
        if previous is not None:  # commit each row's accepted prefix of the previous call, one step at a time
            rows = []
            for b in range(batch):
                row = _rows(committed, slice(b, b + 1))
                for t in range(int(accepted[b])):
                    _, row = model.step(previous[b : b + 1, t], row,
                                        None if previous_tau is None else previous_tau[b : b + 1, t])
                rows.append(row)
            committed = {k: jnp.concatenate([r[k] for r in rows]) for k in committed}
        y, cache = model.verify_step(x, cache, None if accepted is None else jnp.asarray(accepted), tau)
        chex.assert_shape(y, (batch, T, H))
        expected, _ = step_loop(model, x, tau, committed)
        assert relative_error(y, expected) < 1e-4, call
        _assert_caches_close(cache["checkpoint"], committed)
        previous, previous_tau, accepted = x, tau, rng.integers(0, T + 1, batch)


def test_verify_step_errors():
    model = next(e for e in ZOO if e.name == "Mamba").build()
    cache = model.allocate_verify_cache(2, 3)
    x = np.zeros((2, 3, H), np.float32)
    with pytest.raises(ValueError, match=r"num_accepted must lie in \[0, L=3\], got min 0 and max 4"):
        model.verify_step(x, cache, jnp.asarray([0, 4]))
    with pytest.raises(ValueError, match=r"num_accepted must have shape \(B,\) = \(2,\)"):
        model.verify_step(x, cache, jnp.asarray([1, 1, 1]))
    with pytest.raises(ValueError, match=r"x_tokens must have the verify cache's \(B, T\) = \(2, 3\), got \(2, 4\)"):
        model.verify_step(np.zeros((2, 4, H), np.float32), cache)
    with pytest.raises(TypeError, match="cache must be the dict from allocate_verify_cache"):
        model.verify_step(x, model.allocate_inference_cache(2))
    with pytest.raises(ValueError, match="num_tokens must be a positive integer"):
        model.allocate_verify_cache(2, 0)


CAPTURED_NAMES = ("LRU", "Mamba-dirac-event", "S4-legt-r2-c2-gate-bottleneck", "S4D-bilinear-lin-c2-gate2")
CAPTURED_CASES = [(e, transposed) for e in ZOO if e.name in CAPTURED_NAMES
                  for transposed in ((False, True) if "transposed" in e.kwargs else (False,))]


@pytest.mark.parametrize("entry,transposed", CAPTURED_CASES,
                         ids=[e.name + ("-transposed" if t else "") for e, t in CAPTURED_CASES])
def test_a_captured_layers_eager_calls_equal_the_layers(entry, transposed):
    """A ``decoding.CapturedModel`` of a layer runs its forward, ``step``, ``multi_step`` and ``verify_step`` with the
    layer's arguments and checks and the captured leaves: the layer's outputs and caches exactly (the S4 blocks also
    in their transposed layout, whose forward overrides the base's), an in-place parameter update seen."""
    from lrnnx_jax.decoding import CapturedModel

    model = entry.build(seed=41, **({"transposed": True} if transposed else {}))
    captured = CapturedModel(model)
    x, tau = make_inputs(entry, batch=2, length=5, seed=41)
    sequence = np.swapaxes(x, 1, 2) if transposed else x
    step_tau = None if tau is None else tau[:, :1]
    cache = model.allocate_inference_cache(2)
    verify_cache = model.allocate_verify_cache(2, 3)

    both = functools.partial(same_through_capture, model, captured)

    y = both(lambda m: m(sequence, tau, return_cache=True))[0]
    assert np.abs(np.asarray(y)).max() > 1e-3
    y_t = both(lambda m: m.step(x[:, 0], cache, step_tau))[0]
    both(lambda m: m.multi_step(x[:, :3], cache, None if tau is None else tau[:, :3], return_states=True))
    both(lambda m: m.verify_step(x[:, :3], verify_cache, None, None if tau is None else tau[:, :3]))
    params = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(42)
    nnx.update(model, jax.tree.map(lambda p: p * jnp.asarray(rng.uniform(0.5, 1.5, p.shape), p.dtype), params))
    updated = both(lambda m: m.step(x[:, 0], cache, step_tau))[0]
    assert relative_error(updated, y_t) > 1e-3
    # a Variable replaced is a structural change: the capture keeps reading the one it captured (so it does read its
    # own leaves, not the module)
    model.D = nnx.Param(2.0 * model.D.get_value())
    np.testing.assert_array_equal(np.asarray(captured.step(x[:, 0], cache, step_tau)[0]), np.asarray(updated))
    assert relative_error(model.step(x[:, 0], cache, step_tau)[0], updated) > 1e-3
    with pytest.raises(ValueError) as from_model:
        model.step(x[:, :2], cache, step_tau)
    with pytest.raises(ValueError, match=re.escape(str(from_model.value))):
        captured.step(x[:, :2], cache, step_tau)

