"""``LRNNLMHeadModel``: lrnnx's language model (mamba_ssm's structure) with any mix of LRNN and attention layers.

``Embedding(padded_vocab, d_model)`` -> ``n_layer`` blocks (add -> norm -> mixer, then optionally add -> norm2 ->
gated MLP, with a prenorm residual stream) -> add -> ``norm_f`` -> LM head (tied to the embedding by default).
Each layer's mixer is a zoo model (``"LRU"``, ``"S4"``, ``"S4D"``, ``"S5"`` (LTI), ``"Centaurus"``, ``"Mamba"``,
``"Mamba2"``, ``"RGLRU"``, ``"S7"``) or ``"attn"`` (:class:`~lrnnx_jax.architectures.attention.MHA`).

Every path is one compiled program over the whole stack:

* ``model(input_ids)``: the parallel forward; with ``return_cache=True`` (prefill) or ``cache=`` (chunked
  prefill, or continuing after decoding) it hands over and continues the per-layer caches.
* ``model.step(ids, cache)``: one token through every layer's step (the LRNN cells; attention over its
  preallocated KV cache), the final norm and the head.
* ``model.verify_step(ids, cache, num_accepted)``: T drafted tokens in one call (speculative decoding):
  each LRNN layer replays the accepted prefix onto its checkpoint and runs the new tokens
  (:meth:`lrnnx_jax.core.base.LRNN.verify`); attention rolls its KV length forward by the accepted count.

The pure methods :meth:`LRNNLMHeadModel.forward_logits`, :meth:`~LRNNLMHeadModel.step_logits` and
:meth:`~LRNNLMHeadModel.verify_logits` take validated arrays and run inside other programs
(``lrnnx_jax.generation.generate_tokens``); the public methods validate, then call them under one ``jax.jit``.

The inference cache is ``{layer_index: cache}``: an LRNN layer's inference cache, or an attention layer's KV cache
``{"k", "v", "length"}``. The verify cache has, for an LRNN layer, ``{"checkpoint", "old_x"}`` (its input
tokens of the previous call) and, for attention, the KV cache whose ``length`` counts committed tokens only.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import json
import math
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrnnx_jax.architectures.attention import MHA
from lrnnx_jax.core import validation
from lrnnx_jax.core.base import LRNN, LrnnxEntry, lrnnx_entry, lrnnx_linear_entries, torch_linear
from lrnnx_jax.core.capture import as_model
from pallas_kernels import dispatch

#: mixer names -> (module, class or factory); "attn" is :class:`MHA`.
MIXERS: dict[str, tuple[str, str]] = {
    "LRU": ("lrnnx_jax.models.lti.lru", "LRU"),
    "S4": ("lrnnx_jax.models.lti.s4", "S4"),
    "S4D": ("lrnnx_jax.models.lti.s4d", "S4D"),
    "S5": ("lrnnx_jax.models.lti.s5", "S5"),
    "Centaurus": ("lrnnx_jax.models.lti.centaurus", "Centaurus"),
    "Mamba": ("lrnnx_jax.models.ltv.mamba", "Mamba"),
    "Mamba2": ("lrnnx_jax.models.ltv.mamba2", "Mamba2"),
    "RGLRU": ("lrnnx_jax.models.ltv.rglru", "RGLRU"),
    "S7": ("lrnnx_jax.models.ltv.s7", "S7"),
}
ATTENTION = "attn"
MIXER_TYPES = tuple(MIXERS) + (ATTENTION,)
#: Linear layers whose bias keeps its own initialisation (mamba_ssm's ``_no_reinit``: Mamba's dt bias)
KEEP_BIAS_INIT = ("dt_proj",)
#: Linear layers re-drawn with the GPT-2 residual rescaling
RESIDUAL_PROJECTIONS = ("out_proj", "fc2")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def mixer_factory(mixer_type: str):
    if mixer_type not in MIXERS:
        raise ValueError(f"unknown mixer type {mixer_type!r}; expected one of {list(MIXER_TYPES)}")
    module, name = MIXERS[mixer_type]
    return getattr(importlib.import_module(module), name)


def linear_columns(linear: nnx.Linear, x, columns: slice):
    """``linear(x)[..., columns]`` from those columns of its kernel and bias alone: ``x (..., in) -> (..., out')``."""
    kernel = linear.kernel[...][:, columns]
    bias = None if linear.bias is None else linear.bias[...][columns]
    x, kernel, bias = linear.promote_dtype((x, kernel, bias), dtype=linear.dtype)
    y = jnp.dot(x, kernel, precision=linear.precision)
    return y if bias is None else y + bias


class GatedMLP(nnx.Module):
    """``fc2(a * silu(g))`` with ``a, g = fc1(x)`` split in halves; hidden width rounded up to ``multiple_of``
    (lrnnx's and mamba_ssm's ``GatedMLP``; no biases by default). ``x (..., in) -> (..., out)``."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 bias: bool = False, multiple_of: int = 128, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        out_features = in_features if out_features is None else out_features
        hidden = int(8 * in_features / 3) if hidden_features is None else hidden_features
        self.hidden_features = (hidden + multiple_of - 1) // multiple_of * multiple_of
        self.fc1 = torch_linear(in_features, 2 * self.hidden_features, use_bias=bias, rngs=rngs, param_dtype=param_dtype)
        self.fc2 = torch_linear(self.hidden_features, out_features, use_bias=bias, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x):
        # each half from its own columns of fc1 (not one product split afterwards): split over a model axis along
        # its input rows (lrnnx_jax.parallel.model), each half is its own partial product, reduced onto the devices'
        # shares of the hidden width
        hidden = self.hidden_features
        a, gate = (linear_columns(self.fc1, x, columns) for columns in (slice(None, hidden), slice(hidden, None)))
        return self.fc2(a * jax.nn.silu(gate))

    def lrnnx_entries(self) -> dict[str, LrnnxEntry]:
        return {**lrnnx_linear_entries("fc1", self.fc1), **lrnnx_linear_entries("fc2", self.fc2)}


def make_norm(d_model: int, rms_norm: bool, eps: float, rngs: nnx.Rngs):
    """torch's ``RMSNorm`` (weight) or ``LayerNorm`` (weight and bias) over the last axis."""
    if rms_norm:
        return nnx.RMSNorm(d_model, epsilon=eps, rngs=rngs)
    return nnx.LayerNorm(d_model, epsilon=eps, use_fast_variance=False, rngs=rngs)


def norm_entries(name: str, norm) -> dict[str, LrnnxEntry]:
    entries = {f"{name}.weight": lrnnx_entry(norm.scale)}
    if getattr(norm, "bias", None) is not None:
        entries[f"{name}.bias"] = lrnnx_entry(norm.bias)
    return entries


class Block(nnx.Module):
    """Add -> norm -> mixer (then add -> norm2 -> MLP when there is one), on the prenorm residual stream."""

    def __init__(self, mixer, mlp: Optional[GatedMLP], d_model: int, rms_norm: bool, eps: float, residual_in_fp32: bool,
                 *, rngs: nnx.Rngs):
        self.norm = make_norm(d_model, rms_norm, eps, rngs)
        self.mixer = mixer
        self.norm2 = make_norm(d_model, rms_norm, eps, rngs) if mlp is not None else None
        self.mlp = mlp
        self.residual_in_fp32 = residual_in_fp32

    @property
    def is_attention(self) -> bool:
        return isinstance(self.mixer, MHA)

    def run(self, hidden, residual, mixer_fn):
        """``(hidden, residual) -> (hidden, residual)`` with ``mixer_fn(normed) -> (out, aux)``; returns aux too."""
        residual = hidden if residual is None else hidden + residual
        if self.residual_in_fp32:
            residual = residual.astype(jnp.promote_types(residual.dtype, jnp.float32))
        hidden, aux = mixer_fn(self.norm(residual))
        if self.mlp is not None:
            residual = hidden + residual
            hidden = self.mlp(self.norm2(residual))
        return hidden, residual, aux


class LRNNLMHeadModel(nnx.Module):
    """A language model over LRNN and attention layers (see the module docstring).

    Args:
      d_model, d_state: widths; ``d_state`` goes to every mixer whose constructor takes it.
      n_layer: the number of blocks; ``len(mixer_types)`` must equal it.
      vocab_size: the real vocabulary; the embedding and head have ``padded_vocab_size`` rows (a multiple of
        ``pad_vocab_size_multiple``), and generation never produces the padding ids.
      mixer_types: one of :data:`MIXER_TYPES` per layer.
      d_intermediate: the gated MLP's hidden width (rounded up to 128); 0: no MLP.
      mixer_kwargs: ``{mixer_type: kwargs}`` for that type's constructor (``"attn"``: :class:`MHA`'s, which needs
        ``num_heads``; decoding needs ``causal=True``).
      norm_epsilon, rms_norm: the norms (RMSNorm, else LayerNorm).
      residual_in_fp32: keep the residual stream in float32 (it already is for float32 models).
      tie_embeddings: the head is the embedding matrix.
    """

    def __init__(self, d_model: int, d_state: int, n_layer: int, vocab_size: int, mixer_types: Sequence[str],
                 d_intermediate: int = 0, mixer_kwargs: Optional[Mapping[str, Mapping[str, Any]]] = None,
                 norm_epsilon: float = 1e-5, rms_norm: bool = True, residual_in_fp32: bool = False,
                 tie_embeddings: bool = True, pad_vocab_size_multiple: int = 8, *, rngs: nnx.Rngs):
        self.d_model = validation.check_positive_int(d_model, "d_model")
        self.d_state = validation.check_positive_int(d_state, "d_state")
        self.n_layer = validation.check_positive_int(n_layer, "n_layer")
        self.vocab_size = validation.check_positive_int(vocab_size, "vocab_size")
        pad = validation.check_positive_int(pad_vocab_size_multiple, "pad_vocab_size_multiple")
        if isinstance(mixer_types, str) or len(mixer_types) != n_layer:
            raise ValueError(f"mixer_types must be a list of n_layer={n_layer} names, got {mixer_types!r}")
        for name in mixer_types:
            if name not in MIXER_TYPES:
                raise ValueError(f"unknown mixer type {name!r} in mixer_types; expected one of {list(MIXER_TYPES)}")
        mixer_kwargs = {k: dict(v) for k, v in (mixer_kwargs or {}).items()}
        unknown = sorted(set(mixer_kwargs) - set(MIXER_TYPES))
        if unknown:
            raise ValueError(f"mixer_kwargs has unknown mixer types {unknown}; expected keys among {list(MIXER_TYPES)}")
        if d_intermediate < 0:
            raise ValueError(f"d_intermediate must be >= 0, got {d_intermediate}")
        self.config_json = json.dumps(dict(d_model=d_model, d_state=d_state, n_layer=n_layer, vocab_size=vocab_size,
                           mixer_types=list(mixer_types), d_intermediate=d_intermediate, mixer_kwargs=mixer_kwargs,
                           norm_epsilon=norm_epsilon, rms_norm=rms_norm, residual_in_fp32=residual_in_fp32,
                           tie_embeddings=tie_embeddings, pad_vocab_size_multiple=pad), sort_keys=True)
        self.mixer_types = tuple(mixer_types)
        self.padded_vocab_size = math.ceil(vocab_size / pad) * pad
        self.tie_embeddings = bool(tie_embeddings)
        self.embedding = nnx.Embed(self.padded_vocab_size, d_model, embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        blocks = []
        for index, name in enumerate(mixer_types):
            kwargs = dict(mixer_kwargs.get(name, {}))
            if name == ATTENTION:
                mixer = MHA(d_model, layer_idx=index, **kwargs, rngs=rngs)
            else:
                factory = mixer_factory(name)
                if "d_state" in inspect.signature(factory.__init__ if inspect.isclass(factory) else factory).parameters:
                    kwargs.setdefault("d_state", d_state)
                mixer = factory(d_model=d_model, **kwargs, rngs=rngs)
            mlp = GatedMLP(d_model, d_intermediate, rngs=rngs) if d_intermediate > 0 else None
            blocks.append(Block(mixer, mlp, d_model, rms_norm, norm_epsilon, residual_in_fp32, rngs=rngs))
        self.layers = nnx.List(blocks)
        self.norm_f = make_norm(d_model, rms_norm, norm_epsilon, rngs)
        self.lm_head = None if tie_embeddings else torch_linear(d_model, self.padded_vocab_size, use_bias=False, rngs=rngs)
        self.model_parallel = None  # lrnnx_jax.parallel.shard_model sets its ModelParallel (mesh and axis)
        self._init_weights(rngs)

    @property
    def config(self) -> dict:
        """The constructor arguments (what :meth:`save_pretrained` writes)."""
        return json.loads(self.config_json)

    def _init_weights(self, rngs: nnx.Rngs):
        """GPT-2-style initialisation as lrnnx's ``_init_weights`` leaves it: Linear biases zeroed (except
        :data:`KEEP_BIAS_INIT`), ``out_proj``/``fc2`` weights redrawn ``U(+-1/sqrt(fan_in)) / sqrt(n_layer)``."""
        for path, module in nnx.iter_modules(self):
            if not isinstance(module, nnx.Linear) or not path:
                continue
            name = str(path[-1])
            if module.bias is not None and name not in KEEP_BIAS_INIT:
                module.bias.set_value(jnp.zeros_like(module.bias.get_value()))
            if name in RESIDUAL_PROJECTIONS:
                kernel = module.kernel.get_value()
                bound = 1 / math.sqrt(kernel.shape[0])
                drawn = jax.random.uniform(rngs.params(), kernel.shape, kernel.dtype, -bound, bound)
                module.kernel.set_value(drawn / math.sqrt(self.n_layer))

    # ================================================================ pure math (inside programs)
    def logits(self, hidden, residual):
        """The final add, norm and head: ``(B, ..., d_model) -> (B, ..., padded_vocab)`` float32."""
        hidden = self.norm_f(hidden + residual)
        if self.tie_embeddings:
            return self.embedding.attend(hidden).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)

    def forward_logits(self, input_ids, lengths=None, cache=None, return_cache: bool = False, max_seqlen: int = 0):
        """The parallel forward on validated ids ``(B, L)``: ``(logits (B, L, V), cache or None)``.

        ``cache``: continue from it (every layer). ``return_cache`` without ``cache``: the caches after the
        sequence, attention's sized ``max(L, max_seqlen)``. ``lengths (B,)``: rows end there (outputs past the
        end are not meaningful; the caches are those after ``lengths`` tokens).
        """
        batch, length = input_ids.shape
        mask = None if lengths is None else jnp.arange(length)[None, :] < lengths[:, None]
        if return_cache and cache is None:
            cache = self.allocate_inference_cache(batch, max(length, max_seqlen))

        def run_mixer(block, x, layer_cache):
            if block.is_attention:
                return block.mixer(x, layer_cache, num_valid=lengths)
            return block.mixer.masked_forward(x, None, mask, lengths, layer_cache is not None, layer_cache)

        logits, new_cache = self._through_layers(input_ids, cache, run_mixer)
        return logits, (new_cache if cache is not None else None)

    def step_logits(self, ids, cache, config=None):
        """One token per row: ``ids (B,)`` -> ``(logits (B, V), new cache)``."""
        config = dispatch.resolve(config)

        def run_mixer(block, x, layer_cache):
            if block.is_attention:
                y, c = block.mixer(x[:, None], layer_cache)
                return y[:, 0], c
            return block.mixer._step(x, layer_cache, None, config)

        return self._through_layers(ids, cache, run_mixer)

    def verify_logits(self, ids, verify_cache, num_accepted, config=None):
        """T drafted tokens: ``ids (B, T)``, ``num_accepted (B,)`` int32 (of the previous call) ->
        ``(logits (B, T, V), new verify cache)``; see the module docstring."""
        config = dispatch.resolve(config)

        def run_mixer(block, x, layer_cache):
            if block.is_attention:
                return block.mixer.verify(x, layer_cache, num_accepted)
            return block.mixer.verify(x, layer_cache, num_accepted, None, None, config)

        return self._through_layers(ids, verify_cache, run_mixer)

    def _through_layers(self, ids, caches, run_mixer):
        """Embedding -> every block, its mixer run as ``run_mixer(block, normed (B, ..., d_model), layer cache or None)
        -> (out, new layer cache)`` -> the head. Returns ``(logits (B, ..., V), {layer: new cache})``."""
        layout = self.model_parallel  # model parallel: traced for its mesh (the kernels refuse), the split states pinned
        with contextlib.nullcontext() if layout is None else layout.tracing():
            hidden, residual, new_cache = self.embedding(ids), None, {}
            for index, block in enumerate(self.layers):
                layer_cache = None if caches is None else self._pinned(index, caches[index])
                mixer_fn = functools.partial(run_mixer, block, layer_cache=layer_cache)
                hidden, residual, layer_cache = block.run(hidden, residual, mixer_fn)
                new_cache[index] = self._pinned(index, layer_cache)
            return self.logits(hidden, residual), new_cache

    def _pinned(self, index: int, cache):
        """Layer ``index``'s cache, its split states pinned to their sharding when the model is model-parallel."""
        if cache is None or self.model_parallel is None:
            return cache
        return self.model_parallel.constrain_cache(self, index, cache)

    # ================================================================ public API
    def __call__(self, input_ids, lengths=None, *, cache=None, return_cache: bool = False, max_seqlen: Optional[int] = None):
        """``input_ids (B, L)`` int -> ``logits (B, L, padded_vocab)`` float32 (and the cache with ``return_cache``).

        ``cache``: an inference cache to continue from (chunked prefill, or after decoding); ``lengths (B,)``:
        ragged rows (caches after ``lengths[b]`` tokens). ``max_seqlen``: the attention caches' size when
        ``return_cache`` creates them (default L); pass it, or a cache from :meth:`allocate_inference_cache`, to
        decode afterwards.
        """
        return self._forward_call(self, input_ids, lengths, cache=cache, return_cache=return_cache,
                                  max_seqlen=max_seqlen)

    def _forward_call(self, argument, input_ids, lengths=None, *, cache=None, return_cache: bool = False,
                      max_seqlen: Optional[int] = None):
        """:meth:`__call__`, its program receiving ``argument``: this model, or a capture's leaves of it
        (``decoding.CapturedModel``; so are :meth:`_step_call` and :meth:`_verify_call`)."""
        input_ids = self._check_ids(input_ids, 2, "input_ids", "(B, L)")
        batch, length = input_ids.shape
        validation.check_lengths(lengths, batch, length)
        if cache is not None:
            self._check_cache(cache, batch, needed=length)
        max_seqlen = 0 if max_seqlen is None else validation.check_positive_int(max_seqlen, "max_seqlen")
        lengths = None if lengths is None else jnp.asarray(lengths, jnp.int32)
        logits, cache = _jit_forward(argument, input_ids, lengths, cache, bool(return_cache or cache is not None),
                                     max_seqlen)
        return (logits, cache) if return_cache else logits

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int = 1, dtype=None) -> dict:
        """``{layer: cache}``: LRNN layers' zero states; attention layers' empty KV caches of ``max_seqlen``."""
        batch_size = validation.check_positive_int(batch_size, "batch_size")
        max_seqlen = validation.check_positive_int(max_seqlen, "max_seqlen")
        return {i: block.mixer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype) for i, block in enumerate(self.layers)}

    def allocate_verify_cache(self, batch_size: int, num_tokens: int, max_seqlen: int = 1, dtype=None) -> dict:
        """An empty verify cache for calls of ``num_tokens`` tokens (see :meth:`to_verify_cache`)."""
        return self.to_verify_cache(self.allocate_inference_cache(batch_size, max_seqlen, dtype), num_tokens)

    def to_verify_cache(self, cache: dict, num_tokens: int) -> dict:
        """The verify cache that continues an inference ``cache`` (after a prefill): the LRNN layers' states
        become checkpoints with no previous tokens; the KV caches carry over."""
        num_tokens = validation.check_positive_int(num_tokens, "num_tokens")
        out = {}
        for i, block in enumerate(self.layers):
            out[i] = block.mixer.verify_cache_from(cache[i], num_tokens)
        return out

    def step(self, ids, cache: dict, *, kernel_config=None):
        """One token per row through the whole model: ``ids (B,)`` int -> ``(logits (B, padded_vocab), new cache)``."""
        return self._step_call(self, ids, cache, kernel_config=kernel_config)

    def _step_call(self, argument, ids, cache: dict, *, kernel_config=None):
        ids = self._check_ids(ids, 1, "ids", "(B,)")
        self._check_cache(cache, ids.shape[0], needed=1)
        return _jit_step(argument, ids, cache, dispatch.resolve(kernel_config))

    def verify_step(self, ids, cache: dict, num_accepted=None, *, kernel_config=None):
        """Speculative verification of ``ids (B, T)`` drafted tokens: ``-> (logits (B, T, padded_vocab), new cache)``.

        ``cache``: from :meth:`allocate_verify_cache` / :meth:`to_verify_cache`, or the previous call; an
        inference cache is converted (then ``num_accepted`` must be None). ``num_accepted (B,)``: how many of
        the previous call's tokens were accepted (None: 0). ``logits[:, t]`` follow the committed state and
        tokens ``0..t``; nothing of this call is committed until the next call accepts it.
        """
        return self._verify_call(self, ids, cache, num_accepted, kernel_config=kernel_config)

    def _verify_call(self, argument, ids, cache: dict, num_accepted=None, *, kernel_config=None):
        ids = self._check_ids(ids, 2, "ids", "(B, T)")
        batch, num_tokens = ids.shape
        if not self._is_verify_cache(cache):
            if num_accepted is not None:
                raise ValueError("num_accepted must be None when cache is an inference cache (the first verify_step call)")
            cache = self.to_verify_cache(cache, num_tokens)
        self._check_verify_cache(cache, batch, num_tokens)
        if num_accepted is None:
            num_accepted = jnp.zeros((batch,), jnp.int32)
        validation.check_lengths(num_accepted, batch, num_tokens, name="num_accepted")
        return _jit_verify(argument, ids, cache, jnp.asarray(num_accepted, jnp.int32), dispatch.resolve(kernel_config))

    # ================================================================ checks
    def _require_decodable(self, what: str):
        """``ValueError`` naming ``what`` unless every layer can decode (attention causal, no active dropout).

        The jitted programs that decode call it while they are traced: both properties are static, part of the
        treedef that keys their cache, so it runs once per model structure, not at every call (walking every layer's
        modules cost milliseconds a token for deep models)."""
        for block in self.layers:
            if block.is_attention:
                block.mixer.require_causal(what)
            elif block.mixer.dropout_active():
                raise ValueError(f"{what}: layer {type(block.mixer).__name__} is in training mode with active dropout; "
                                 "call model.eval() first")

    def _check_ids(self, ids, ndim: int, name: str, layout: str):
        ids = jnp.asarray(ids) if not isinstance(ids, jax.Array) else ids
        if ids.ndim != ndim:
            raise ValueError(f"{name} must have shape {layout}, got {tuple(ids.shape)}")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(f"{name} must be integer token ids, got dtype {ids.dtype}")
        validation.check_id_values(ids, self.padded_vocab_size, name)  # traced under lrnnx_jax.checked
        return ids.astype(jnp.int32)

    def _check_cache(self, cache, batch: int, needed: int):
        if not isinstance(cache, dict) or set(cache) != set(range(self.n_layer)) or self._is_verify_cache(cache):
            raise TypeError("cache must be the inference cache of this model ({layer: cache} from allocate_inference_cache "
                            "or a forward with return_cache=True)")
        for i, block in enumerate(self.layers):
            leaves = jax.tree.leaves(cache[i])
            if leaves[0].shape[0] != batch:
                raise ValueError(f"cache[{i}] has batch {leaves[0].shape[0]}, the input has batch {batch}")
            if block.is_attention:
                _check_room(i, cache[i], needed)

    def _is_verify_cache(self, cache) -> bool:
        return isinstance(cache, dict) and any(isinstance(c, dict) and ("checkpoint" in c or "pending" in c)
                                               for c in cache.values())

    def _check_verify_cache(self, cache, batch: int, num_tokens: int):
        if not isinstance(cache, dict) or set(cache) != set(range(self.n_layer)):
            raise TypeError("cache must be this model's verify cache (from allocate_verify_cache or to_verify_cache)")
        for i, block in enumerate(self.layers):
            if block.is_attention:
                kv = cache[i]
                if kv["k"].shape[0] != batch:
                    raise ValueError(f"cache[{i}] has batch {kv['k'].shape[0]}, the input has batch {batch}")
                _check_room(i, kv, 2 * num_tokens)  # the accepted tokens of the last call, then this call's
            else:
                old_x = cache[i]["old_x"]
                if tuple(old_x.shape[:2]) != (batch, num_tokens):
                    raise ValueError(f"ids must have the shape (B, T) = {tuple(old_x.shape[:2])} of the verify cache, got "
                                     f"{(batch, num_tokens)}; build the cache with num_tokens={num_tokens}")

    # ================================================================ checkpoints
    @property
    def lrnnx_ignored_entries(self) -> tuple[str, ...]:
        ignored = ["lm_head.weight"] if self.tie_embeddings else []  # the embedding, tied
        for i, block in enumerate(self.layers):
            ignored += [f"backbone.layers.{i}.mixer.{name}" for name in getattr(block.mixer, "lrnnx_ignored_entries", ())]
        return tuple(ignored)

    def lrnnx_entries(self) -> dict[str, LrnnxEntry]:
        """lrnnx's ``state_dict`` layout (see :meth:`checkpoint_entries`)."""
        return self.checkpoint_entries()

    def checkpoint_entries(self, mixer_entries=lambda mixer: mixer.lrnnx_entries()) -> dict[str, LrnnxEntry]:
        """The ``state_dict`` layout of lrnnx's and mamba_ssm's LM (``backbone.embedding.weight``,
        ``backbone.layers.<i>.{norm,mixer.*,norm2,mlp.*}``, ``backbone.norm_f.weight``, ``lm_head.weight`` when
        untied), with each mixer's own names from ``mixer_entries(mixer)`` (lrnnx's by default)."""
        entries = {"backbone.embedding.weight": lrnnx_entry(self.embedding.embedding)}
        for i, block in enumerate(self.layers):
            prefix = f"backbone.layers.{i}"
            entries.update(norm_entries(f"{prefix}.norm", block.norm))
            entries.update({f"{prefix}.mixer.{k}": v for k, v in mixer_entries(block.mixer).items()})
            if block.mlp is not None:
                entries.update(norm_entries(f"{prefix}.norm2", block.norm2))
                entries.update({f"{prefix}.mlp.{k}": v for k, v in block.mlp.lrnnx_entries().items()})
        entries.update(norm_entries("backbone.norm_f", self.norm_f))
        if not self.tie_embeddings:
            entries.update(lrnnx_linear_entries("lm_head", self.lm_head))
        return entries

    @staticmethod
    def translate_lrnnx_kwargs(kwargs: dict) -> dict:
        """lrnnx's constructor arguments -> ours: each mixer's own translation (Centaurus), and lrnnx's arguments
        that do not change the function dropped (``fused_add_norm``, ``initializer_cfg``, ``mlp_cls``,
        ``device``, ``dtype``)."""
        kwargs = {k: v for k, v in kwargs.items() if k not in ("fused_add_norm", "initializer_cfg", "mlp_cls", "device", "dtype")}
        mixer_kwargs = {}
        for name, mk in (kwargs.get("mixer_kwargs") or {}).items():
            translate = getattr(mixer_factory(name), "translate_lrnnx_kwargs", None) if name != ATTENTION else None
            mixer_kwargs[name] = translate(dict(mk)) if translate is not None else dict(mk)
        return {**kwargs, "mixer_kwargs": mixer_kwargs}

    def save_pretrained(self, directory: str):
        """Write ``config.json`` (the constructor arguments, ``mixer_kwargs`` included) and ``model.safetensors``
        (every parameter, by its path in the module)."""
        from safetensors.numpy import save_file

        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(self.config, f, indent=2, sort_keys=True)
        save_file(_flat_params(self), os.path.join(directory, WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: str) -> "LRNNLMHeadModel":
        """The model written by :meth:`save_pretrained`."""
        from safetensors.numpy import load_file

        with open(os.path.join(directory, CONFIG_NAME)) as f:
            config = json.load(f)
        model = cls(**config, rngs=nnx.Rngs(0))
        arrays = load_file(os.path.join(directory, WEIGHTS_NAME))
        expected = _flat_params(model)
        if set(arrays) != set(expected):
            raise ValueError(f"{directory}/{WEIGHTS_NAME} does not fit its config: missing {sorted(set(expected) - set(arrays))}, "
                             f"unexpected {sorted(set(arrays) - set(expected))}")
        for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            key = ".".join(map(str, path))
            variable.set_value(jnp.asarray(arrays[key], dtype=variable.get_value().dtype))
        return model


def _check_room(index: int, kv: dict, needed: int):
    """``ValueError`` when the attention KV cache ``kv`` of layer ``index`` has fewer than ``needed`` free positions
    (checked when its lengths are concrete)."""
    if validation.is_concrete(kv["length"]):
        size = kv["k"].shape[1]
        left = size - int(np.max(np.asarray(kv["length"])))
        if left < needed:
            raise ValueError(f"cache[{index}] (attention) has {left} free positions of {size}, {needed} are needed; "
                             "allocate it with a larger max_seqlen")


def _flat_params(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, path)): np.asarray(variable.get_value())
            for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# One cached program per (model structure, shapes), the model passed as the pytree it is (lrnnx_jax.core.base
# explains why), or as a capture's leaves (lrnnx_jax.core.capture); parameters are arguments. Those that decode
# check, when traced, that the model can.
@functools.partial(jax.jit, static_argnames=("keep_cache", "max_seqlen"))
def _jit_forward(model, input_ids, lengths, cache, keep_cache, max_seqlen):
    model = as_model(model)
    if keep_cache:
        model._require_decodable("a cache")
    return model.forward_logits(input_ids, lengths, cache, keep_cache, max_seqlen)


@functools.partial(jax.jit, static_argnames=("config",))
def _jit_step(model, ids, cache, config):
    model = as_model(model)
    model._require_decodable("step")
    return model.step_logits(ids, cache, config)


@functools.partial(jax.jit, static_argnames=("config",))
def _jit_verify(model, ids, cache, num_accepted, config):
    model = as_model(model)
    model._require_decodable("verify_step")
    return model.verify_logits(ids, cache, num_accepted, config)
