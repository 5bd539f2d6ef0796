"""``lrnnx_jax.checked``: every value check raised inside ``jit`` with the eager message, the plain ``jit`` path
unchanged (no checks, no retraces, no stale programs), and constructor / ``allocate_inference_cache`` errors for
every model of the zoo."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lrnnx_jax
from lrnnx_jax.architectures import LRNNLMHeadModel
from lrnnx_jax.generation import capture_graph
from zoo import ZOO, H

checked = lrnnx_jax.checked
B, L = 2, 5


def entry(name):
    return next(e for e in ZOO if e.name == name)


def error(call) -> str:
    """The message of the ValueError that ``call()`` raises."""
    with pytest.raises(ValueError) as info:
        call()
    return str(info.value)


_CHECKED = {}


def checked_once(fn):
    """``checked(fn)``, built once per function (each ``checked(fn)`` compiles its own program)."""
    if fn not in _CHECKED:
        _CHECKED[fn] = checked(fn)
    return _CHECKED[fn]


def assert_same_error(expected, eager, jitted, *args):
    """``eager()`` and ``checked(jitted)(*args)`` raise ``ValueError(expected)``; plain ``jitted(*args)`` runs."""
    assert error(eager) == expected
    assert error(lambda: checked_once(jitted)(*args)) == expected
    jax.block_until_ready(jitted(*args))  # outside checked, the traced checks are skipped, as before


# the jitted functions under test, shared by the tests (one compiled program per shape, plain and checked)
forward = jax.jit(lambda m, x, tau, lengths: m(x, tau, lengths))
step = jax.jit(lambda m, x_t, cache, tau_t: m.step(x_t, cache, tau_t))
multi_step = jax.jit(lambda m, x, cache, tau: m.multi_step(x, cache, tau))
verify_step = jax.jit(lambda m, x, cache, accepted, tau: m.verify_step(x, cache, accepted, tau))


@pytest.fixture(scope="module")
def lru():
    return entry("LRU").build()


@pytest.fixture(scope="module")
def event_model():
    return entry("S5-async-event").build()


X = np.random.default_rng(0).standard_normal((B, L, H)).astype(np.float32)
TAU = np.full((B, L), 0.5, np.float32)


# ------------------------------------------------------------------------------------ every value check


def test_lengths(lru):
    bad = np.array([6, -1], np.int32)
    assert_same_error("lengths must lie in [0, L=5], got min -1 and max 6", lambda: lru(X, lengths=bad),
                      forward, lru, X, None, bad)
    good = np.array([5, 2], np.int32)
    np.testing.assert_allclose(checked_once(forward)(lru, X, None, good), lru(X, lengths=good), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("column, value, expected", [
    (3, -0.1, "integration_timesteps must be > 0 (time between events), got min -0.10000000149011612"),
    (3, 0.0, "integration_timesteps must be > 0 (time between events), got min 0.0"),
    (1, np.nan, "integration_timesteps must be finite, got NaN or inf"),
    (1, -np.inf, "integration_timesteps must be finite, got NaN or inf"),
], ids=["negative", "zero", "nan", "inf"])
def test_integration_timesteps_of_forward_step_multi_step_and_verify(event_model, column, value, expected):
    m = event_model
    bad = TAU.copy()
    bad[:, column] = value
    if np.isnan(value):
        bad[0, 0] = -1.0  # finiteness is checked first, as eagerly
    assert_same_error(expected, lambda: m(X, integration_timesteps=bad), forward, m, X, bad, None)
    assert error(lambda: checked_once(forward)(m, X, bad[..., None], None)) == expected  # (B, L, 1), as lrnnx's
    cache = m.allocate_inference_cache(B)
    tau_t = bad[:, column]
    assert_same_error(expected, lambda: m.step(X[:, 0], cache, tau_t), step, m, X[:, 0], cache, tau_t)
    assert_same_error(expected, lambda: m.multi_step(X, cache, bad), multi_step, m, X, cache, bad)
    verify_cache = m.allocate_verify_cache(B, L)
    assert_same_error(expected, lambda: m.verify_step(X, verify_cache, None, bad), verify_step, m, X, verify_cache, None, bad)


def test_num_accepted_of_verify_step(event_model):
    m = event_model
    cache = m.allocate_verify_cache(B, L)
    bad = np.array([2, 6], np.int32)
    assert_same_error("num_accepted must lie in [0, L=5], got min 2 and max 6", lambda: m.verify_step(X, cache, bad, TAU),
                      verify_step, m, X, cache, bad, TAU)
    good = np.array([0, 5], np.int32)
    y, _ = checked_once(verify_step)(m, X, cache, good, TAU)
    np.testing.assert_allclose(y, m.verify_step(X, cache, good, TAU)[0], rtol=1e-6, atol=1e-6)


def test_token_ids_lengths_and_num_accepted_of_the_language_model():
    lm = LRNNLMHeadModel(d_model=8, d_state=4, n_layer=1, vocab_size=37, mixer_types=["LRU"],
                         mixer_kwargs={"LRU": dict(r_min=0.4, r_max=0.95)}, rngs=nnx.Rngs(0))
    assert lm.padded_vocab_size == 40
    bad, good = np.array([[1, 2, 3], [4, 40, 5]], np.int32), np.array([[1, 2, 3], [4, 36, 5]], np.int32)
    lm_forward = jax.jit(lambda lm, ids, lengths: lm(ids, lengths))
    assert_same_error("input_ids must lie in [0, 40), got min 1 and max 40", lambda: lm(bad), lm_forward, lm, bad, None)
    lengths = np.array([3, 4], np.int32)
    assert_same_error("lengths must lie in [0, L=3], got min 3 and max 4", lambda: lm(good, lengths),
                      lm_forward, lm, good, lengths)
    cache = lm.allocate_inference_cache(B)
    lm_step = jax.jit(lambda lm, ids, cache: lm.step(ids, cache))
    ids_t = np.array([-3, 1], np.int32)
    assert_same_error("ids must lie in [0, 40), got min -3 and max 1", lambda: lm.step(ids_t, cache), lm_step, lm, ids_t, cache)
    verify_cache = lm.allocate_verify_cache(B, 3)
    lm_verify = jax.jit(lambda lm, ids, cache, accepted: lm.verify_step(ids, cache, accepted))
    assert_same_error("ids must lie in [0, 40), got min 1 and max 40", lambda: lm.verify_step(bad, verify_cache),
                      lm_verify, lm, bad, verify_cache, None)
    accepted = np.array([-1, 0], np.int32)
    assert_same_error("num_accepted must lie in [0, L=3], got min -1 and max 0",
                      lambda: lm.verify_step(good, verify_cache, accepted), lm_verify, lm, good, verify_cache, accepted)
    np.testing.assert_allclose(checked_once(lm_forward)(lm, good, None), lm(good), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------ how checked composes


def test_plain_jit_is_unchanged_and_never_reuses_a_checked_trace(lru, monkeypatch):
    """The same jitted function called plainly, under checked, then plainly again: the plain calls skip the checks
    and share one trace; the checked call traces once more (a jit-cache-sensitive context), so it never reuses the
    check-free program, and the model's own jitted forward (core.base._jit_forward) behaves the same."""
    traces = []

    @jax.jit
    def forward(m, x, lengths):
        traces.append(1)
        return m(x, lengths=lengths)

    bad, good = np.array([9, 1], np.int32), np.array([5, 1], np.int32)
    y_plain = forward(lru, X, good)
    forward(lru, X, bad)  # no error outside checked
    assert len(traces) == 1
    assert error(lambda: checked(forward)(lru, X, bad)) == "lengths must lie in [0, L=5], got min 1 and max 9"
    assert len(traces) == 2
    np.testing.assert_array_equal(checked(forward)(lru, X, good), y_plain)
    np.testing.assert_array_equal(forward(lru, X, good), y_plain)
    forward(lru, X, bad)
    assert len(traces) == 2

    # the model's own jitted forward (core.base._jit_forward, called by eager model calls): eager, checked (which
    # traces it again, with the checks around it), eager again (the plain program, not traced again)
    model = entry("LRU").build(seed=1)
    x7 = np.ones((B, 7, H), np.float32)  # a shape no other test compiles: the first eager call traces
    inner_traces = []
    masked_forward = type(model).masked_forward
    monkeypatch.setattr(type(model), "masked_forward",
                        lambda *a, **k: inner_traces.append(1) or masked_forward(*a, **k))
    y_eager = model(x7, lengths=good)
    model(x7, lengths=good)
    assert len(inner_traces) == 1
    call = checked(lambda m, x, lengths: m(x, lengths=lengths))
    assert error(lambda: call(model, x7, bad)) == "lengths must lie in [0, L=7], got min 1 and max 9"
    assert len(inner_traces) == 2
    np.testing.assert_array_equal(call(model, x7, good), y_eager)
    np.testing.assert_array_equal(model(x7, lengths=good), y_eager)
    assert len(inner_traces) == 2
    assert error(lambda: model(x7, lengths=bad)) == "lengths must lie in [0, L=7], got min 1 and max 9"


def test_unjitted_and_nnx_jit_functions_and_state_updates(lru):
    bad = np.array([0, 6], np.int32)
    expected = "lengths must lie in [0, L=5], got min 0 and max 6"
    assert error(lambda: checked(lambda m, x, lengths: m(x, lengths=lengths))(lru, X, bad)) == expected
    assert error(lambda: checked(nnx.jit(lambda m, x, lengths: m(x, lengths=lengths)))(lru, X, bad)) == expected
    assert error(lambda: checked(lambda x: lru(x, lengths=bad))(X)) == expected  # concrete values: the eager check

    model = entry("LRU").build(seed=3)

    @nnx.jit
    def update(m, x, lengths):  # writes a parameter, as a training step does
        m.D.set_value(m.D[...] + jnp.sum(m(x, lengths=lengths)) * 0 + 1)

    before = np.asarray(model.D[...])
    checked(update)(model, X, np.array([5, 5], np.int32))
    np.testing.assert_allclose(model.D[...], before + 1)
    assert error(lambda: checked(update)(model, X, bad)) == expected
    np.testing.assert_allclose(model.D[...], before + 1)  # a failed call changes nothing


def test_grad_nested_checked_and_misuse(lru):
    bad = np.array([-2, 3], np.int32)
    expected = "lengths must lie in [0, L=5], got min -2 and max 3"
    loss = lambda x, lengths: jnp.sum(lru(x, lengths=lengths) ** 2)  # noqa: E731
    assert error(lambda: checked(jax.jit(jax.grad(loss)))(X, bad)) == expected
    inner = checked(jax.jit(loss))
    assert error(lambda: checked(lambda x, lengths: inner(x, lengths) * 2)(X, bad)) == expected
    with pytest.raises(TypeError, match=r"checked\(fn\) must be the outermost transformation"):
        jax.jit(inner)(X, np.array([5, 5], np.int32))


# ------------------------------------------------------------------------------------ constructors


#: the integer arguments of each model class (Centaurus: the factory's and CentaurusBase's)
INT_ARGS = {
    "LRU": ("d_model", "d_state", "chunk_size"),
    "S5": ("d_model", "d_state", "chunk_size"),
    "Centaurus": ("d_model", "d_state", "sub_state_dim", "chunk_size"),
    "S7": ("d_model", "d_state", "J", "chunk_size"),
    "RGLRU": ("d_model", "d_conv", "expand", "chunk_size"),
    "Mamba": ("d_model", "d_state", "d_conv", "expand", "dt_rank", "chunk_size"),
    "Mamba2": ("d_model", "d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size"),
    "S4": ("d_model", "d_state", "channels", "rank", "n_ssm", "bottleneck", "gate", "chunk_size"),
    "S4D": ("d_model", "d_state", "channels", "rank", "n_ssm", "bottleneck", "gate", "chunk_size"),
}
BAD_ARGS = [(e, name, value) for e in ZOO for name in INT_ARGS[e.cls] for value in (0, -5, 2.5)
            if not (e.cls == "Mamba" and name == "expand" and value == 2.5)]  # Mamba's expand may be a float


@pytest.mark.parametrize("e, name, value", BAD_ARGS, ids=[f"{e.name}-{n}={v}" for e, n, v in BAD_ARGS])
def test_constructors_reject_bad_integer_arguments(e, name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be a positive (integer|number).*, got {re.escape(repr(value))}$"):
        e.build(**{name: value})


def test_alias_and_even_state_errors():
    with pytest.raises(ValueError, match="^state_dim must be a positive integer, got 0$"):
        entry("S5-zoh").build(d_state=None, state_dim=0)
    with pytest.raises(ValueError, match="^d_state must be a positive even number"):
        entry("S4D-bilinear-lin-c2-gate2").build(d_state=5)


@pytest.mark.parametrize("e", ZOO, ids=[e.name for e in ZOO])
def test_allocate_inference_cache_rejects_batch_zero_like_capture_graph(e):
    model = e.build(chunk_size=None)  # None (one chunk) is a valid chunk_size of every model
    assert model.chunk_size is None
    for batch in (0, -1):
        expected = f"^batch_size must be a positive integer, got {batch}$"
        with pytest.raises(ValueError, match=expected):
            model.allocate_inference_cache(batch)
        with pytest.raises(ValueError, match=expected):
            capture_graph(model, batch)
    with pytest.raises(ValueError, match="^max_seqlen must be a positive integer, got 0$"):
        model.allocate_inference_cache(2, max_seqlen=0)
    cache = model.allocate_inference_cache(np.int64(2))
    assert all(leaf.shape[0] == 2 for leaf in jax.tree.leaves(cache))
