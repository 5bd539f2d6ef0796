"""Token generation for :class:`~lrnnx_jax.architectures.LRNNLMHeadModel`: one compiled program per call shape.

:func:`generate_tokens` prefills the prompt with the parallel forward and decodes inside the same program
(a ``lax.while_loop``): every token goes through embedding, every layer's step, the final norm, the LM head
and the sampler without returning to Python. With ``speculative=`` each loop iteration drafts tokens (from a
draft model, or by prompt lookup), verifies them in one ``verify_step`` of the target, and accepts a prefix.

Programs are cached by (model structure, batch size, prompt-length bucket, output-length bucket, the sampling
flags); buckets are powers of two, and ``max_new_tokens``, the prompt lengths, ``temperature``, ``top_k``,
``top_p``, ``eos_id`` and ``key`` are operands: a new value of any of them compiles nothing. The host pads the
prompt and slices the tokens with NumPy (which compiles nothing either; only ``return_logits`` slices on the
device, one small program per new ``max_new_tokens``).

The sampling math is in pure functions (:func:`sampling_probs`, :func:`sample`, :func:`prompt_lookup_drafts`,
:func:`greedy_tokens`, :func:`accept_greedy`, :func:`accept_sampled`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrnnx_jax import parallel
from lrnnx_jax.core import validation
from lrnnx_jax.core.base import LRNN
from lrnnx_jax.core.capture import ModelLeaves, Structure, as_model
from pallas_kernels import dispatch


@dataclasses.dataclass(frozen=True, eq=False)
class Speculative:
    """Speculative decoding: ``num_draft_tokens`` drafts per round, verified by the target in one call.

    Drafts come from ``draft_model`` (an ``LRNNLMHeadModel`` with the target's vocabulary) or, without one, from
    prompt lookup: the continuation of the latest earlier occurrence of the context's last ``ngram_size``
    tokens (shorter n-grams when it has none).
    """

    num_draft_tokens: int = 4
    draft_model: Any = None
    ngram_size: int = 3

    def __post_init__(self):
        validation.check_positive_int(self.num_draft_tokens, "num_draft_tokens")
        validation.check_positive_int(self.ngram_size, "ngram_size")


@dataclasses.dataclass(frozen=True)
class GenerationStats:
    """What a speculative run did: ``rounds`` loop iterations; ``drafted`` and ``accepted`` draft tokens summed over
    the rows still generating; ``acceptance_rate = accepted / drafted``."""

    rounds: int
    drafted: int
    accepted: int

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)


class CapturedModel:
    """A model whose module tree is walked once, at capture, instead of at every call of :func:`generate_tokens` (a
    language model) or of :func:`lrnnx_jax.generation.generate` (a layer model, any :class:`~lrnnx_jax.core.base.LRNN`).

    ``jax.jit`` flattens an nnx module tree at every call: flax walks every attribute of every module, about 130
    per Mamba layer (BENCHMARKS.md §10, on an H200's host: 4.6 ms of host time per call for 24 layers; one Mamba
    layer's ``generate`` spent 224-286 µs in its Python, mostly in this flattening). A captured model keeps the tree's
    structure and its ``nnx.Variable`` objects, and each call reads their current values (50 µs for 24 layers on the
    development CPU), as flax's ``nnx.cached_partial`` does. Pass a captured language model wherever
    :func:`generate_tokens` takes a model (also as ``Speculative.draft_model``), a captured layer wherever ``generate``
    and ``capture_graph`` take one. A capture also runs the model's eager calls with the model's arguments, e.g. for a
    decoding loop of one's own: ``captured.step(...)``, ``captured.verify_step(...)``, ``captured(...)`` (the
    forward) and a layer's ``captured.multi_step(...)`` (the model's checks, then its programs with the captured
    leaves).

    It sees every change of a Variable's value: optimizer updates, ``nnx.update``, ``variable.value = ...``. It does
    not see structural changes (a submodule or a Variable replaced, ``model.train()`` / ``model.eval()``, any other
    attribute set): capture the model again after those. ``model`` is the captured module.
    """

    def __init__(self, model):
        from lrnnx_jax.architectures import LRNNLMHeadModel

        if isinstance(model, LRNNLMHeadModel):
            model._require_decodable("CapturedModel")
        elif not isinstance(model, LRNN):
            raise TypeError(f"model must be an LRNNLMHeadModel or a layer model (an lrnnx_jax.core.base.LRNN), got "
                            f"{type(model).__name__}")
        leaves, treedef = jax.tree.flatten(model)
        variables = jax.tree.leaves(model, is_leaf=lambda node: isinstance(node, nnx.Variable))
        if len(variables) != len(leaves) or not all(
                isinstance(v, nnx.Variable) and v.get_raw_value() is leaf for v, leaf in zip(variables, leaves)):
            raise ValueError(f"{type(model).__name__} holds arrays outside nnx.Variable objects (or Variables of more "
                             "than one array), which a capture cannot read; pass the model itself")
        self.model, self.structure, self._variables = model, Structure(treedef), variables

    def values(self) -> list:
        """The current values of the captured Variables, in the order of ``jax.tree.leaves(model)``."""
        return [v.get_raw_value() for v in self._variables]

    def leaves(self) -> ModelLeaves:
        """:meth:`values` with the structure: what the decoding program receives."""
        return ModelLeaves(self.structure, self.values())

    # ---- the model's eager calls, with its own arguments: its checks, then its programs with the captured leaves
    def __call__(self, *args, **kwargs):
        """The captured model's forward (its ``__call__``, the same arguments) without walking its module tree."""
        return self.model._forward_call(self.leaves(), *args, **kwargs)

    def step(self, *args, **kwargs):
        """The captured model's ``step`` (the same arguments) without walking its module tree: for a decoding loop
        of one's own."""
        return self.model._step_call(self.leaves(), *args, **kwargs)

    def multi_step(self, *args, **kwargs):
        """The captured layer's ``multi_step`` (the same arguments) without walking its module tree."""
        if not isinstance(self.model, LRNN):
            raise TypeError(f"CapturedModel.multi_step runs a captured layer; a {type(self.model).__name__} has no "
                            "multi_step (its verify_step runs several tokens)")
        return self.model._multi_step_call(self.leaves(), *args, **kwargs)

    def verify_step(self, *args, **kwargs):
        """The captured model's ``verify_step`` (the same arguments) without walking its module tree."""
        return self.model._verify_call(self.leaves(), *args, **kwargs)

    def __repr__(self):
        return f"CapturedModel({type(self.model).__name__}, {len(self._variables)} variables)"


def _module_and_argument(model) -> tuple:
    """``(the module, what the program receives)``: a model as it is (``jax.jit`` flattens it), a
    :class:`CapturedModel` as its :class:`ModelLeaves`."""
    return (model.model, model.leaves()) if isinstance(model, CapturedModel) else (model, model)


def flatten_model(model) -> tuple:
    """``(the module, its leaves, its treedef)``, the leaves and treedef as ``jax.tree.flatten(module)`` gives them: a
    model is flattened (which walks its module tree), a :class:`CapturedModel` gives its captured treedef and its
    Variables' current values."""
    if isinstance(model, CapturedModel):
        return model.model, model.values(), model.structure.treedef
    return (model, *jax.tree.flatten(model))


# ====================================================================== sampling math


@dataclasses.dataclass(frozen=True)
class Sampler:
    """The static shape of the sampler (part of the program key); its values are operands."""

    greedy: bool
    use_top_k: bool
    use_top_p: bool


def sampling_probs(logits, vocab_size: int, sampler: Sampler, temperature, top_k, top_p):
    """The distribution tokens are drawn from: ``logits (..., V)`` over the real vocabulary (padding ids get 0),
    divided by ``temperature``, then restricted to the ``top_k`` largest and to the smallest set whose mass reaches
    ``top_p`` (the most likely token always stays). Returns ``(..., V)`` float32."""
    logits = real_vocabulary(logits, vocab_size) / temperature
    ordered = -jnp.sort(-logits, axis=-1)  # descending
    if sampler.use_top_k:
        kth = jnp.take_along_axis(ordered, jnp.broadcast_to(top_k - 1, ordered.shape[:-1])[..., None], -1)
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
        ordered = jnp.where(jnp.arange(ordered.shape[-1]) < top_k, ordered, -jnp.inf)
    if sampler.use_top_p:
        mass = jax.nn.softmax(ordered, -1)
        before = jnp.cumsum(mass, -1) - mass  # mass of the strictly more likely tokens
        kept = (before < top_p) | (jnp.arange(ordered.shape[-1]) == 0)
        threshold = jnp.min(jnp.where(kept, ordered, jnp.inf), -1, keepdims=True)
        logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.nn.softmax(logits, -1)


def real_vocabulary(logits, vocab_size: int):
    """``logits (..., V)`` in float32 with the padding ids (``>= vocab_size``) at ``-inf``."""
    return jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits.astype(jnp.float32), -jnp.inf)


def greedy_tokens(logits, vocab_size: int):
    """The most likely real token of each row: ``logits (..., V)`` -> ``(...)`` int32."""
    return jnp.argmax(real_vocabulary(logits, vocab_size), -1).astype(jnp.int32)


def sample(probs, key):
    """One token per row from ``probs (B, V)``: ``(B,)`` int32."""
    return jax.random.categorical(key, jnp.log(probs), -1).astype(jnp.int32)


def accept_greedy(chosen, drafts):
    """Greedy verification: the target's greedy tokens ``chosen (B, k+1)`` after each prefix, ``drafts (B, k)`` ->
    ``(accepted (B,), next (B,))``: the number of leading drafts equal to the target's choice, and its token
    after them."""
    matches = jnp.cumprod(chosen[:, :-1] == drafts, axis=1)
    accepted = jnp.sum(matches, axis=1).astype(jnp.int32)
    return accepted, jnp.take_along_axis(chosen, accepted[:, None], 1)[:, 0]


def accept_sampled(target_probs, draft_probs, drafts, key):
    """The rejection rule of speculative sampling (Leviathan et al. 2023; Chen et al. 2023), which leaves the
    target's distribution unchanged. ``target_probs (B, k+1, V)``, ``draft_probs (B, k, V)`` (the distributions the
    drafts were drawn from; one-hot for deterministic drafts), ``drafts (B, k)``. Draft ``i`` is accepted with
    probability ``min(1, p_i(d) / q_i(d))``; at the first rejection the next token is drawn from
    ``max(0, p_i - q_i)`` renormalised; after ``k`` acceptances from ``p_k``. Returns ``(accepted (B,), next (B,))``."""
    batch, k = drafts.shape
    accept_key, next_key = jax.random.split(key)
    p_d = jnp.take_along_axis(target_probs[:, :k], drafts[..., None], -1)[..., 0]
    q_d = jnp.take_along_axis(draft_probs, drafts[..., None], -1)[..., 0]
    u = jax.random.uniform(accept_key, (batch, k))
    ok = u * q_d < p_d  # u < p/q without dividing by q = 0
    accepted = jnp.sum(jnp.cumprod(ok, axis=1), axis=1).astype(jnp.int32)
    padded_q = jnp.concatenate([draft_probs, jnp.zeros_like(draft_probs[:, :1])], 1)  # q_k = 0: p_k itself
    p_a = jnp.take_along_axis(target_probs, accepted[:, None, None], 1)[:, 0]
    q_a = jnp.take_along_axis(padded_q, accepted[:, None, None], 1)[:, 0]
    residual = jnp.maximum(p_a - q_a, 0)
    total = jnp.sum(residual, -1, keepdims=True)
    residual = jnp.where(total > 0, residual / jnp.where(total > 0, total, 1), p_a)
    return accepted, sample(residual, next_key)


def prompt_lookup_drafts(context, length, num_drafts: int, ngram_size: int):
    """Drafts by prompt lookup: ``context (B, S)`` int32 whose first ``length (B,)`` tokens are the sequence so far.

    For n = ``ngram_size`` down to 1, find the latest position ``p < length - 1`` where the ``n`` tokens ending at
    ``p`` equal the last ``n`` tokens; the drafts are the tokens after ``p`` (up to the end of the sequence, then
    its last token repeated). Without any match, the last token repeated. Returns ``(B, num_drafts)`` int32.
    """
    batch, size = context.shape
    positions = jnp.arange(size)
    last = length - 1

    def token_at(index):  # (B, ...) -> tokens, clamped into the row
        return jnp.take_along_axis(context, jnp.clip(index, 0, size - 1), 1)

    found = jnp.full((batch,), -1, jnp.int32)
    for n in range(ngram_size, 0, -1):
        match = (positions[None, :] < last[:, None]) & (positions[None, :] >= n - 1)
        for i in range(n):
            tail = token_at((last - i)[:, None])
            match &= token_at(positions[None, :] - i) == tail
        latest = jnp.max(jnp.where(match, positions[None, :], -1), axis=1)
        found = jnp.where((found < 0) & (last >= n), latest, found)
    start = jnp.where(found >= 0, found + 1, last)
    index = jnp.minimum(start[:, None] + jnp.arange(num_drafts), last[:, None])
    return token_at(index).astype(jnp.int32)


# ====================================================================== the program


def _placed_on(model, argument, mesh):
    """The program's ``argument`` for ``model`` (the model or its :class:`ModelLeaves`) with a copy of its parameters
    on every device of ``mesh`` (a new pytree; the caller's model stays where it is), or as it is when the model is
    split over ``mesh`` (model parallelism: a data x model mesh, the batch split over its data axis)."""
    if model.model_parallel is None:
        return jax.device_put(argument, parallel.replicated(mesh))
    if model.model_parallel.mesh != mesh:
        raise ValueError(f"the prompt is split over {mesh}, the model over {model.model_parallel.mesh}: split both over "
                         "one mesh (a data axis for the batch, a model axis for the parameters)")
    return argument


def _kv_free(cache, model):
    """The cache without the attention layers' key/value buffers (what a per-step snapshot needs)."""
    return {i: ({k: v for k, v in c.items() if k not in ("k", "v")} if model.layers[i].is_attention else c)
            for i, c in cache.items()}


def _with_kv(small, full, model):
    return {i: ({**full[i], **small[i]} if model.layers[i].is_attention else small[i]) for i in full}


def _pick_rows(stacked, index):
    """``stacked`` leaves ``(steps, B, ...)`` -> ``(B, ...)`` at step ``index[b]`` for each row."""
    return jax.tree.map(lambda a: jnp.take_along_axis(a, index.reshape(1, -1, *([1] * (a.ndim - 2))), 0)[0], stacked)


def _decode_program(target, draft, prompt, prompt_lengths, max_new, temperature, top_k, top_p, eos_id, key, *,
                    out_size: int, sampler: Sampler, num_drafts: int, ngram_size: int, return_logits: bool, config):
    """The whole generation (see :func:`generate_tokens`) as one traced function. The models (``draft`` None
    without a draft model) come in as the pytrees they are: ``jax.jit`` flattens them, where ``nnx.split`` walked
    their graphs (11 ms a call for 24 layers on the CPU), or as a :class:`CapturedModel`'s :class:`ModelLeaves`.
    Tracing checks that both can decode, once per structure."""
    target, draft = as_model(target), as_model(draft)
    target._require_decodable("generate_tokens")
    if draft is not None:
        draft._require_decodable("generate_tokens (draft model)")
    batch, prompt_size = prompt.shape
    speculative = num_drafts > 0
    width = num_drafts + 1  # tokens per verify call
    max_seqlen = prompt_size + out_size + width  # the KV caches' positions and the prompt-lookup context
    vocab = target.padded_vocab_size
    probs_of = functools.partial(sampling_probs, vocab_size=target.vocab_size, sampler=sampler, temperature=temperature,
                                 top_k=top_k, top_p=top_p)

    def choose(logits, key):  # the next token: the argmax when greedy (no random draw), else a sample
        return greedy_tokens(logits, target.vocab_size) if sampler.greedy else sample(probs_of(logits), key)

    rows = jnp.arange(batch)

    logits, cache = target.forward_logits(prompt, prompt_lengths, target.allocate_inference_cache(batch, max_seqlen))
    first_logits = logits[rows, prompt_lengths - 1]
    key, sub = jax.random.split(key)
    token = choose(first_logits, sub)
    has_eos = eos_id >= 0
    fill = jnp.where(has_eos, eos_id, 0)
    out = jnp.full((batch, out_size + width), fill, jnp.int32).at[:, 0].set(token)
    out_logits = jnp.zeros((batch, out_size + width, vocab) if return_logits else (0,), jnp.float32)
    if return_logits:
        out_logits = out_logits.at[:, 0].set(first_logits)
    count = jnp.ones((batch,), jnp.int32)
    done = has_eos & (token == eos_id)
    stats = jnp.zeros((3,), jnp.int32)  # rounds, drafted, accepted

    if not speculative:
        def body(carry):
            token, cache, out, out_logits, count, done, key, stats = carry
            logits, cache = target.step_logits(token, cache, config)
            key, sub = jax.random.split(key)
            nxt = jnp.where(done, fill, choose(logits, sub))
            out = out.at[rows, count].set(nxt)
            if return_logits:
                out_logits = out_logits.at[rows, count].set(logits)
            done = done | (has_eos & (nxt == eos_id))
            return nxt, cache, out, out_logits, count + 1, done, key, stats + jnp.array([1, 0, 0], jnp.int32)

        state = (token, cache, out, out_logits, count, done, key, stats)
    else:
        context = jnp.zeros((batch, max_seqlen), jnp.int32).at[:, :prompt_size].set(prompt)
        context = context.at[rows, prompt_lengths].set(token)
        verify_cache = target.to_verify_cache(cache, width)
        num_accepted = jnp.zeros((batch,), jnp.int32)
        if draft is not None:
            _, draft_cache = draft.forward_logits(prompt, prompt_lengths, draft.allocate_inference_cache(batch, max_seqlen))
        else:
            draft_cache = None

        def body(carry):
            token, verify_cache, draft_cache, num_accepted, context, out, out_logits, count, done, key, stats = carry
            key, draft_key, accept_key = jax.random.split(key, 3)
            length = prompt_lengths + count  # the sequence so far, `token` included
            if draft is not None:
                def draft_step(c, step_key):
                    tok, dcache = c
                    logits, dcache = draft.step_logits(tok, dcache, config)
                    if sampler.greedy:  # greedy acceptance needs no draft distribution
                        nxt, q = greedy_tokens(logits, target.vocab_size), jnp.zeros((tok.shape[0], 0), jnp.float32)
                    else:
                        q = probs_of(logits)
                        nxt = sample(q, step_key)
                    return (nxt, dcache), (nxt, q, _kv_free(dcache, draft))

                (_, last_cache), (drafted, q_probs, snapshots) = jax.lax.scan(
                    draft_step, (token, draft_cache), jax.random.split(draft_key, width))
                drafts = jnp.moveaxis(drafted[:num_drafts], 0, 1)
                q_probs = jnp.moveaxis(q_probs[:num_drafts], 0, 1)
            else:
                drafts = prompt_lookup_drafts(context, length, num_drafts, ngram_size)
                q_probs = None if sampler.greedy else jax.nn.one_hot(drafts, vocab, dtype=jnp.float32)
            tokens = jnp.concatenate([token[:, None], drafts], 1)  # (B, k+1)
            logits, verify_cache = target.verify_logits(tokens, verify_cache, num_accepted, config)
            if sampler.greedy:
                accepted, nxt = accept_greedy(greedy_tokens(logits, target.vocab_size), drafts)
            else:
                accepted, nxt = accept_sampled(probs_of(logits), q_probs, drafts, accept_key)
            if draft is not None:  # the draft's state after the accepted tokens and the token before them
                draft_cache = _with_kv(_pick_rows(snapshots, accepted), last_cache, draft)
            emitted = jnp.concatenate([drafts, jnp.zeros_like(drafts[:, :1])], 1)
            emitted = jnp.where(jnp.arange(width) == accepted[:, None], nxt[:, None], emitted)  # d_1..d_a, next
            valid = jnp.arange(width)[None, :] <= accepted[:, None]
            is_eos = valid & has_eos & (emitted == eos_id)
            after_eos = (jnp.cumsum(is_eos, 1) - is_eos) > 0
            written = valid & ~done[:, None]
            emitted = jnp.where(after_eos, fill, emitted)
            slots = jnp.where(written, count[:, None] + jnp.arange(width), out.shape[1])
            out = out.at[rows[:, None], slots].set(emitted, mode="drop")
            if return_logits:
                out_logits = out_logits.at[rows[:, None], slots].set(logits, mode="drop")
            context_slots = jnp.where(written, length[:, None] + jnp.arange(width), max_seqlen)
            context = context.at[rows[:, None], context_slots].set(emitted, mode="drop")
            active = ~done & (count < max_new)
            stats = stats + jnp.stack([jnp.int32(1), jnp.sum(jnp.where(active, num_drafts, 0)),
                                       jnp.sum(jnp.where(active, accepted, 0))]).astype(jnp.int32)
            done = done | jnp.any(is_eos, 1)
            count = count + accepted + 1
            return (nxt, verify_cache, draft_cache, accepted + 1, context, out, out_logits, count, done, key, stats)

        state = (token, verify_cache, draft_cache, num_accepted, context, out, out_logits, count, done, key, stats)

    def cond(carry):
        count, done = carry[-4], carry[-3]
        return jnp.any(~done & (count < max_new))

    state = jax.lax.while_loop(cond, body, state)
    out, out_logits, stats = state[-6], state[-5], state[-1]
    return out, out_logits, stats


_PROGRAM_STATICS = ("out_size", "sampler", "num_drafts", "ngram_size", "return_logits", "config")
decode_program = jax.jit(_decode_program, static_argnames=_PROGRAM_STATICS)


@functools.cache
def _greedy_key():
    """The key greedy decoding passes (it draws nothing), made once: ``jax.random.key`` is a dispatch of its own,
    130 µs a call on an H200's host (BENCHMARKS.md §10)."""
    return jax.random.key(0)


def bucket(n: int, minimum: int = 8) -> int:
    """The power-of-two bucket of a length (at least ``minimum``)."""
    return max(minimum, dispatch.next_power_of_two(n))


def generate_tokens(model, prompt_ids, max_new_tokens: int, *, prompt_lengths=None, temperature: float = 0.0,
                    top_k: Optional[int] = None, top_p: Optional[float] = None, eos_id: Optional[int] = None, key=None,
                    speculative: Optional[Speculative] = None, return_logits: bool = False, return_stats: bool = False,
                    kernel_config=None):
    """Generate ``max_new_tokens`` tokens per row after ``prompt_ids``, in one compiled program.

    Args:
      model: an :class:`~lrnnx_jax.architectures.LRNNLMHeadModel` (attention layers must be causal); split over a
        mesh by ``lrnnx_jax.parallel.shard_model``, the program runs over that mesh (model parallelism). Or a
        :class:`CapturedModel` of one, whose module tree is not walked again at each call.
      prompt_ids: ``(B, P)`` integer token ids. Sharded over devices along the batch
        (``lrnnx_jax.parallel.shard_batch``), each device decodes its rows and the tokens keep the sharding (for a
        split model: over another axis of the model's mesh).
      max_new_tokens: how many tokens to generate per row.
      prompt_lengths: ``(B,)`` ragged prompt lengths in ``[1, P]`` (row ``b`` uses ``prompt_ids[b, :len]``);
        None: all ``P``.
      temperature: 0 is greedy; otherwise the logits are divided by it before sampling.
      top_k, top_p: restrict sampling to the ``top_k`` most likely tokens and/or the nucleus of mass ``top_p``.
      eos_id: a row stops after producing it; its later positions hold ``eos_id``. The loop ends when every
        row is done.
      key: a ``jax.random`` key (required to sample; a fixed key gives reproducible tokens).
      speculative: a :class:`Speculative` for speculative decoding (greedy: exactly the tokens of greedy
        decoding; sampled: the target's distribution, by the rejection rule).
      return_logits: also return the logits each token was chosen from, ``(B, max_new_tokens, padded_vocab)``.
      return_stats: also return a :class:`GenerationStats` (the acceptance rate of speculative decoding).
      kernel_config: the ``pallas_kernels.KernelConfig`` of the layers' steps (the default when None).

    Returns:
      ``tokens (B, max_new_tokens)`` int32 (ids below ``model.vocab_size``), then the logits and/or the stats
      when asked, as a tuple.
    """
    from lrnnx_jax.architectures import LRNNLMHeadModel

    module, target = _module_and_argument(model)
    if not isinstance(module, LRNNLMHeadModel):
        got = type(model).__name__ if module is model else f"a CapturedModel of {type(module).__name__}"
        raise TypeError(f"model must be an LRNNLMHeadModel or a CapturedModel of one, got {got}"
                        + ("" if not isinstance(module, LRNN) else
                           " (a layer model: lrnnx_jax.generation.generate runs it, fed its own outputs)"))
    model = module
    sharding = parallel.batch_sharding_of(prompt_ids)  # a batch over devices: each device decodes its rows
    prompt = np.asarray(prompt_ids)
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt_ids must have shape (B, P) with P >= 1, got {prompt.shape}")
    if not np.issubdtype(prompt.dtype, np.integer):
        raise TypeError(f"prompt_ids must be integer token ids, got dtype {prompt.dtype}")
    if prompt.min() < 0 or prompt.max() >= model.vocab_size:
        raise ValueError(f"prompt_ids must lie in [0, vocab_size={model.vocab_size}), got min {prompt.min()} and max {prompt.max()}")
    batch, length = prompt.shape
    max_new_tokens = validation.check_positive_int(max_new_tokens, "max_new_tokens")
    lengths = np.full((batch,), length, np.int32) if prompt_lengths is None else np.asarray(prompt_lengths)
    if lengths.shape != (batch,) or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"prompt_lengths must be integers of shape (B,) = ({batch},), got {lengths.dtype}{lengths.shape}")
    if lengths.min() < 1 or lengths.max() > length:
        raise ValueError(f"prompt_lengths must lie in [1, P={length}], got min {lengths.min()} and max {lengths.max()}")
    temperature = float(temperature)
    if temperature < 0 or not np.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    greedy = temperature == 0.0
    if top_k is not None and (int(top_k) != top_k or not 1 <= top_k):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1] or be None, got {top_p!r}")
    if eos_id is not None and not 0 <= int(eos_id) < model.vocab_size:
        raise ValueError(f"eos_id must lie in [0, vocab_size={model.vocab_size}) or be None, got {eos_id!r}")
    if not greedy and key is None:
        raise ValueError("key is required when temperature > 0 (sampling); pass jax.random.key(seed)")
    if key is None:
        key = _greedy_key()
    num_drafts, ngram, draft, drafting = 0, 1, None, None  # drafting: the draft model as the program receives it
    if speculative is not None:
        if not isinstance(speculative, Speculative):
            raise TypeError(f"speculative must be a lrnnx_jax.generation.Speculative, got {type(speculative).__name__}")
        num_drafts, ngram, draft = speculative.num_draft_tokens, speculative.ngram_size, speculative.draft_model
        if draft is not None:
            draft, drafting = _module_and_argument(draft)
            if not isinstance(draft, LRNNLMHeadModel) or draft.padded_vocab_size != model.padded_vocab_size:
                raise ValueError("speculative.draft_model must be an LRNNLMHeadModel (or a CapturedModel of one) with "
                                 "the target's (padded) vocabulary")

    prompt_size, out_size = bucket(length), bucket(max_new_tokens)
    padded = np.zeros((batch, prompt_size), np.int32)
    padded[:, :length] = prompt
    sampler = Sampler(greedy=greedy, use_top_k=top_k is not None and not greedy, use_top_p=top_p is not None and not greedy)
    rows, scalars = padded, (np.int32(max_new_tokens), np.float32(temperature if not greedy else 1.0),
                             np.int32(top_k or 1), np.float32(top_p or 1.0), np.int32(-1 if eos_id is None else eos_id), key)
    lengths = lengths.astype(np.int32)
    if sharding is not None:  # the rows split as the prompt was, everything else on every device (no-ops when so)
        rows, lengths = parallel.shard_batch((rows, lengths), sharding.mesh, sharding.spec[0])
        scalars = parallel.replicate(scalars, sharding.mesh)
        target = _placed_on(model, target, sharding.mesh)
        if draft is not None:
            drafting = _placed_on(draft, drafting, sharding.mesh)
    with parallel.mesh_context(sharding):
        out, out_logits, stats = decode_program(
            target, drafting, rows, lengths, *scalars, out_size=out_size, sampler=sampler,
            num_drafts=num_drafts, ngram_size=ngram, return_logits=bool(return_logits),
            config=dispatch.resolve(kernel_config))
    # the tokens are small: sliced on the host and put back (jnp.asarray of a new shape would compile a program)
    results = [jax.device_put(np.ascontiguousarray(np.asarray(out)[:, :max_new_tokens]), sharding)]
    if return_logits:  # large: sliced on the device (a new max_new_tokens compiles this slice once)
        results.append(out_logits[:, :max_new_tokens])
    if return_stats:
        rounds, drafted, accepted = (int(v) for v in np.asarray(stats))
        results.append(GenerationStats(rounds, drafted, accepted))
    return results[0] if len(results) == 1 else tuple(results)
