"""generate_tokens: greedy decoding against a Python loop over ``model.step``, speculative decoding (prompt lookup
and draft models) token-identical to greedy on every mixer type, the rejection rule's distribution, sampling
(top-k / top-p against NumPy, reproducibility, only real vocabulary ids), ragged prompts and EOS, one program
per bucket (compilations counted), and clear errors."""

from __future__ import annotations

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import compile_log, relative_error, same_through_capture
from lrnnx_jax import decoding
from lrnnx_jax.architectures import LRNNLMHeadModel
from lrnnx_jax.generation import GenerationStats, Speculative, generate_tokens
from lrnnx_jax.models.lti.lru import LRU
from test_language_model import STACKS, VOCAB, build


def greedy_loop(model, prompt, lengths, num_tokens, eos_id=None):
    """The reference: per row, the forward over its prompt, then a Python loop of ``model.step`` and argmax over
    the real vocabulary (rows stop at ``eos_id`` and then hold it)."""
    rows = []
    for b in range(prompt.shape[0]):
        ids = jnp.asarray(prompt[b : b + 1, : lengths[b]])
        logits, cache = model(ids, return_cache=True, max_seqlen=ids.shape[1] + num_tokens)
        token = jnp.argmax(logits[:, -1, :VOCAB], -1).astype(jnp.int32)
        row = [int(token[0])]
        while len(row) < num_tokens:
            if eos_id is not None and row[-1] == eos_id:
                row.append(eos_id)
                continue
            logits, cache = model.step(token, cache)
            token = jnp.argmax(logits[:, :VOCAB], -1).astype(jnp.int32)
            row.append(int(token[0]))
        rows.append(row)
    return np.asarray(rows, np.int32)


def prompts(seed, batch=2, length=6):
    rng = np.random.default_rng(seed)
    return rng.integers(0, VOCAB, (batch, length)).astype(np.int32)


MIXED = ["Mamba", "S5", "attn", "RGLRU"]


def test_greedy_decoding_equals_the_step_loop_with_ragged_prompts_and_eos():
    model = build(MIXED, seed=1)
    prompt = prompts(1, batch=3, length=7)
    lengths = np.asarray([7, 3, 5], np.int32)
    expected = greedy_loop(model, prompt, lengths, 9)
    tokens = generate_tokens(model, prompt, 9, prompt_lengths=lengths)
    chex.assert_shape(tokens, (3, 9))
    chex.assert_type(tokens, jnp.int32)
    np.testing.assert_array_equal(np.asarray(tokens), expected)
    eos = int(expected[1, 2])  # row 1 stops at its third token; rows stop independently
    with_eos = generate_tokens(model, prompt, 9, prompt_lengths=lengths, eos_id=eos)
    np.testing.assert_array_equal(np.asarray(with_eos), greedy_loop(model, prompt, lengths, 9, eos_id=eos))
    assert np.all(np.asarray(with_eos)[1, 2:] == eos)


@pytest.mark.parametrize("mixer", list(STACKS))
def test_greedy_speculative_decoding_returns_the_greedy_tokens(mixer):
    """Prompt lookup on a repetitive prompt (drafts are often accepted) gives exactly the greedy tokens."""
    model = build(STACKS[mixer], seed=2)
    prompt = np.tile(prompts(2, length=3), (1, 3))
    greedy = generate_tokens(model, prompt, 11)
    tokens, stats = generate_tokens(model, prompt, 11, speculative=Speculative(num_draft_tokens=3), return_stats=True)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(greedy))
    assert isinstance(stats, GenerationStats) and stats.drafted > 0 and 0 <= stats.acceptance_rate <= 1


def test_speculative_with_draft_models_and_mixed_stacks():
    target = build(MIXED, seed=3)
    prompt = prompts(3, batch=3)
    lengths = np.asarray([6, 2, 4], np.int32)
    greedy = np.asarray(generate_tokens(target, prompt, 10, prompt_lengths=lengths))
    itself = Speculative(num_draft_tokens=4, draft_model=target)  # a perfect draft: every draft is accepted
    tokens, stats = generate_tokens(target, prompt, 10, prompt_lengths=lengths, speculative=itself, return_stats=True)
    np.testing.assert_array_equal(np.asarray(tokens), greedy)
    assert stats.acceptance_rate == 1.0
    other = Speculative(num_draft_tokens=2, draft_model=build(["Mamba2", "attn"], seed=9))
    tokens, logits = generate_tokens(target, prompt, 10, prompt_lengths=lengths, speculative=other, return_logits=True)
    np.testing.assert_array_equal(np.asarray(tokens), greedy)
    plain_logits = generate_tokens(target, prompt, 10, prompt_lengths=lengths, return_logits=True)[1]
    assert relative_error(logits, plain_logits) < 1e-4  # each token's logits, from verify_step or from step


def test_rejection_rule_emits_the_target_distribution():
    """accept_sampled with one draft: P(first emitted token = x) = q(x) min(1, p/q) + rejection mass * residual
    = p(x). 400k rows sample it; the standard error of each probability is below 1e-3."""
    rng = np.random.default_rng(4)
    p = rng.dirichlet(np.ones(5))
    q = rng.dirichlet(np.ones(5) * 0.5)
    n = 400_000
    key_draft, key_accept = jax.random.split(jax.random.key(4))
    drafts = jax.random.categorical(key_draft, jnp.log(jnp.asarray(q, jnp.float32)), shape=(n, 1)).astype(jnp.int32)
    target = jnp.broadcast_to(jnp.asarray(p, jnp.float32), (n, 2, 5))
    draft_probs = jnp.broadcast_to(jnp.asarray(q, jnp.float32), (n, 1, 5))
    accepted, nxt = decoding.accept_sampled(target, draft_probs, drafts, key_accept)
    first = np.where(np.asarray(accepted) == 1, np.asarray(drafts[:, 0]), np.asarray(nxt))
    frequencies = np.bincount(first, minlength=5) / n
    np.testing.assert_allclose(frequencies, p, atol=4e-3)  # > 5 standard errors
    acceptance = np.minimum(p, q).sum()
    assert abs(float(np.mean(np.asarray(accepted))) - acceptance) < 4e-3


def test_sampled_speculative_decoding_keeps_the_target_distribution():
    """Two tokens sampled after a fixed prompt, 3000 rows: with speculative decoding (a different draft model) the
    empirical joint distribution matches the exact one computed from the target's logits (chi-square)."""
    target = build(["LRU", "attn"], seed=5, vocab_size=4, pad_vocab_size_multiple=4)
    draft = build(["S5"], seed=6, vocab_size=4, pad_vocab_size_multiple=4)
    rows = 3000
    prompt = np.tile(np.asarray([[1, 3, 0]], np.int32), (rows, 1))
    tokens = generate_tokens(target, prompt, 2, temperature=1.0, key=jax.random.key(7),
                             speculative=Speculative(num_draft_tokens=2, draft_model=draft))
    p1 = jax.nn.softmax(target(jnp.asarray(prompt[:1]))[0, -1])
    joint = np.zeros((4, 4))
    for a in range(4):
        p2 = jax.nn.softmax(target(jnp.asarray(np.concatenate([prompt[:1], [[a]]], 1)))[0, -1])
        joint[a] = float(p1[a]) * np.asarray(p2)
    observed = np.zeros((4, 4))
    np.add.at(observed, (np.asarray(tokens)[:, 0], np.asarray(tokens)[:, 1]), 1)
    expected = joint.ravel() * rows
    chi2 = float(np.sum((observed.ravel() - expected) ** 2 / expected))
    assert chi2 < 45.0  # 15 degrees of freedom: P(chi2 > 45) ~ 1e-4


def test_sampling_probs_match_numpy():
    rng = np.random.default_rng(8)
    logits = rng.standard_normal((3, 12)).astype(np.float32)
    sampler = decoding.Sampler(greedy=False, use_top_k=True, use_top_p=True)
    probs = np.asarray(decoding.sampling_probs(jnp.asarray(logits), 10, sampler, 0.7, 4, 0.8))
    for row, out in zip(logits, probs):
        z = row[:10] / 0.7
        top = np.argsort(-z)[:4]
        w = np.exp(z[top] - z[top].max())
        w /= w.sum()
        keep = top[: int(np.searchsorted(np.cumsum(w), 0.8) + 1)]  # smallest prefix of mass >= 0.8
        ref = np.zeros(12)
        ref[keep] = np.exp(z[keep] - z[keep].max())
        np.testing.assert_allclose(out, ref / ref.sum(), rtol=1e-5, atol=1e-7)


def test_prompt_lookup_drafts_match_a_python_search():
    rng = np.random.default_rng(9)
    context = rng.integers(0, 3, (6, 20)).astype(np.int32)
    lengths = rng.integers(1, 21, 6).astype(np.int32)
    drafts = np.asarray(decoding.prompt_lookup_drafts(jnp.asarray(context), jnp.asarray(lengths), 4, 3))
    for row, length, got in zip(context, lengths, drafts):
        seq = list(row[:length])
        start = length - 1
        for n in (3, 2, 1):
            hits = [p for p in range(n - 1, length - 1) if length >= n + 1 and seq[p - n + 1 : p + 1] == seq[length - n :]]
            if hits:
                start = hits[-1] + 1
                break
        expected = [seq[min(start + i, length - 1)] for i in range(4)]
        np.testing.assert_array_equal(got, expected)


def test_sampling_is_reproducible_and_uses_only_the_real_vocabulary():
    model = build(["S4D", "attn"], seed=10)
    prompt = prompts(10, batch=4)
    hot = dict(temperature=50.0, key=jax.random.key(3))  # nearly uniform over the real vocabulary
    a = np.asarray(generate_tokens(model, prompt, 40, **hot))
    np.testing.assert_array_equal(a, np.asarray(generate_tokens(model, prompt, 40, **hot)))
    b = np.asarray(generate_tokens(model, prompt, 40, temperature=50.0, key=jax.random.key(4)))
    assert np.any(a != b)
    assert a.max() < VOCAB <= model.padded_vocab_size - 1 and len(np.unique(a)) > VOCAB // 2
    greedy = np.asarray(generate_tokens(model, prompt, 8))
    np.testing.assert_array_equal(np.asarray(generate_tokens(model, prompt, 8, temperature=1.0, top_k=1, key=jax.random.key(1))), greedy)
    np.testing.assert_array_equal(np.asarray(generate_tokens(model, prompt, 8, temperature=1.0, top_p=1e-6, key=jax.random.key(1))), greedy)


def test_one_program_per_bucket():
    """Another prompt length in the same bucket, another max_new_tokens in the same bucket, another key or
    temperature: nothing compiles."""
    model = build(["Mamba", "attn"], seed=11)
    prompt = prompts(11, batch=2, length=12)
    generate_tokens(model, prompt, 20, temperature=1.0, key=jax.random.key(0))
    with compile_log() as compiled:
        generate_tokens(model, prompt[:, :10], 20, temperature=1.0, key=jax.random.key(1))
        generate_tokens(model, prompt, 29, temperature=0.5, key=jax.random.key(2), prompt_lengths=np.asarray([12, 9]))
        generate_tokens(model, prompt, 17, temperature=2.0, top_k=None, key=jax.random.key(3), eos_id=3)
    assert compiled == []
    with compile_log() as compiled:
        generate_tokens(model, prompt, 33, temperature=1.0, key=jax.random.key(0))  # the next output bucket
    assert compiled.count("_decode_program") == 1


def test_a_captured_model_decodes_as_the_model_and_sees_parameter_updates():
    """A CapturedModel gives the model's tokens (greedy, sampled, speculative with a captured draft), captures of one
    structure share their programs, and it reads the Variables' values at every call: an in-place update of every
    parameter is seen."""
    model = build(["Mamba", "attn"], seed=21)
    prompt = prompts(21, batch=2, length=5)
    captured = decoding.CapturedModel(model)
    assert captured.model is model and "variables" in repr(captured)
    greedy = np.asarray(generate_tokens(model, prompt, 7))
    np.testing.assert_array_equal(np.asarray(generate_tokens(captured, prompt, 7)), greedy)
    with compile_log() as compiled:  # another capture of the same structure: the first capture's program serves it
        np.testing.assert_array_equal(np.asarray(generate_tokens(decoding.CapturedModel(model), prompt, 7)), greedy)
    assert compiled == []
    sampled = generate_tokens(captured, prompt, 7, temperature=0.8, key=jax.random.key(4))
    np.testing.assert_array_equal(np.asarray(sampled),
                                  np.asarray(generate_tokens(model, prompt, 7, temperature=0.8, key=jax.random.key(4))))
    draft = build(["Mamba2"], seed=22)
    speculative = Speculative(num_draft_tokens=2, draft_model=decoding.CapturedModel(draft))
    np.testing.assert_array_equal(np.asarray(generate_tokens(captured, prompt, 7, speculative=speculative)),
                                  np.asarray(generate_tokens(model, prompt, 7)))
    # an in-place update of every parameter (what an optimizer step does): the capture reads the new values
    before = np.asarray(generate_tokens(captured, prompt, 7, return_logits=True)[1])
    rng = np.random.default_rng(23)
    for variable in jax.tree.leaves(model, is_leaf=lambda node: isinstance(node, nnx.Param)):
        if isinstance(variable, nnx.Param):
            value = variable.get_value()
            variable.set_value(value + 0.1 * jnp.asarray(rng.standard_normal(value.shape), value.dtype))
    after = generate_tokens(captured, prompt, 7, return_logits=True)
    np.testing.assert_array_equal(np.asarray(after[0]), np.asarray(generate_tokens(model, prompt, 7)))
    np.testing.assert_allclose(after[1], generate_tokens(model, prompt, 7, return_logits=True)[1], rtol=1e-6, atol=1e-6)
    assert relative_error(after[1], before) > 1e-2


def test_a_captured_language_models_eager_calls_equal_the_models():
    """``captured.step`` / ``verify_step`` / ``captured(ids)`` run the model's programs with the captured leaves: the
    model's logits and caches exactly, the second call compiling nothing, an in-place parameter update seen, and the
    model's own checks (bad ids, a cache of another batch) raised as the model raises them."""
    model = build(["Mamba", "attn"], seed=25)
    captured = decoding.CapturedModel(model)
    rng = np.random.default_rng(25)
    ids = jnp.asarray(rng.integers(0, VOCAB, (2, 6)), jnp.int32)

    both = functools.partial(same_through_capture, model, captured)

    logits, cache = both(lambda m: m(ids[:, :5], return_cache=True, max_seqlen=16))
    assert np.all(np.isfinite(np.asarray(logits))) and np.abs(np.asarray(logits)).max() > 1e-3
    step_logits, _ = both(lambda m: m.step(ids[:, 5], cache))
    with compile_log() as compiled:
        captured.step(ids[:, 5], cache)
    assert compiled == []
    verify_cache = model.to_verify_cache(cache, 2)
    both(lambda m: m.verify_step(ids[:, 4:6], verify_cache))
    # an in-place update of every parameter: the capture reads the new values
    for variable in jax.tree.leaves(model, is_leaf=lambda node: isinstance(node, nnx.Param)):
        if isinstance(variable, nnx.Param):
            value = variable.get_value()
            variable.set_value(value + 0.1 * jnp.asarray(rng.standard_normal(value.shape), value.dtype))
    updated, _ = both(lambda m: m.step(ids[:, 5], cache))
    assert relative_error(updated, step_logits) > 1e-2
    # a Variable replaced is a structural change: the capture keeps reading its own leaves
    model.embedding.embedding = nnx.Param(2.0 * model.embedding.embedding.get_value())
    np.testing.assert_array_equal(np.asarray(captured.step(ids[:, 5], cache)[0]), np.asarray(updated))
    assert relative_error(model.step(ids[:, 5], cache)[0], updated) > 1e-2
    for call in (lambda m: m.step(ids[:, :2], cache), lambda m: m.step(ids[:1, 5], cache)):
        with pytest.raises(ValueError) as from_model:
            call(model)
        with pytest.raises(ValueError, match=re.escape(str(from_model.value))):
            call(captured)


def test_a_captured_model_is_refused_clearly():
    for bad in (3, nnx.Linear(2, 2, rngs=nnx.Rngs(0))):
        refused = r"model must be an LRNNLMHeadModel or a layer model \(an lrnnx_jax.core.base.LRNN\), got "
        with pytest.raises(TypeError, match=refused + type(bad).__name__):
            decoding.CapturedModel(bad)
    layer = decoding.CapturedModel(LRU(d_model=8, d_state=4, rngs=nnx.Rngs(0)))  # for generate, not generate_tokens
    with pytest.raises(TypeError, match="CapturedModel.multi_step runs a captured layer; a LRNNLMHeadModel has no"):
        decoding.CapturedModel(build(["Mamba"], seed=24)).multi_step(prompts(24), {})
    with pytest.raises(TypeError, match=r"model must be an LRNNLMHeadModel or a CapturedModel of one, got a "
                                        r"CapturedModel of LRU \(a layer model: lrnnx_jax.generation.generate runs it"):
        generate_tokens(layer, prompts(24), 4)
    model = build(["Mamba", "attn"], seed=24)
    with pytest.raises(ValueError, match="speculative.draft_model must be an LRNNLMHeadModel \\(or a CapturedModel"):
        generate_tokens(model, prompts(24), 4, speculative=Speculative(draft_model=layer))
    with pytest.raises(ValueError, match="speculative.draft_model must be an LRNNLMHeadModel \\(or a CapturedModel"):
        generate_tokens(decoding.CapturedModel(model), prompts(24), 4,
                        speculative=Speculative(draft_model=decoding.CapturedModel(build(["Mamba"], vocab_size=VOCAB + 40))))


def test_bad_arguments_are_refused_clearly():
    model = build(["LRU", "attn"])
    prompt = prompts(12)
    with pytest.raises(TypeError, match="model must be an LRNNLMHeadModel"):
        generate_tokens(object(), prompt, 4)
    with pytest.raises(ValueError, match=r"prompt_ids must lie in \[0, vocab_size=37\)"):
        generate_tokens(model, np.full((1, 3), 37), 4)
    with pytest.raises(ValueError, match=r"prompt_lengths must lie in \[1, P=6\]"):
        generate_tokens(model, prompt, 4, prompt_lengths=np.asarray([0, 6]))
    with pytest.raises(ValueError, match="key is required when temperature > 0"):
        generate_tokens(model, prompt, 4, temperature=1.0)
    with pytest.raises(ValueError, match="top_p must lie in"):
        generate_tokens(model, prompt, 4, temperature=1.0, top_p=1.5, key=jax.random.key(0))
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        generate_tokens(model, prompt, 0)
    with pytest.raises(ValueError, match=r"draft_model must be an LRNNLMHeadModel \(or a CapturedModel of one\) with the target.s"):
        generate_tokens(model, prompt, 4, speculative=Speculative(2, draft_model=build(["LRU"], vocab_size=100)))
    noncausal = build(["LRU", "attn"], mixer_kwargs={"attn": dict(num_heads=2)})
    with pytest.raises(ValueError, match="causal=False"):
        generate_tokens(noncausal, prompt, 4)
