"""``Classifier``: lrnnx's sequence classifier / regressor (after event-ssm), over any zoo model.

Structure (lrnnx's ``architectures/classifier.py``):

* input: ``Linear(input_dim, d_model)``; or, with ``vocab_size``, a :class:`~lrnnx_jax.architectures.embedding.
  TokenEmbedding` (+ ``Linear(embedding_dim, d_model)`` when the sizes differ);
* ``n_layers`` × :class:`ClassifierBlock`: ``x = LayerNorm(dropout(lrnn(x, τ, lengths)) + x)``, then the block's
  intermediate pooling (which also pools ``τ`` and ``lengths``);
* the final block pools the sequence (``"last"``, ``"mean"`` or ``"max"``, masked by ``lengths``) and applies
  ``Linear(d_model, num_classes)`` (classification, ``num_classes > 0``) or ``Linear(d_model, output_dim)``.

Each block's model is a zoo model (a name of :data:`~lrnnx_jax.architectures.language_model.MIXERS` or an
:class:`~lrnnx_jax.core.base.LRNN` class), built with ``d_model`` and, where its constructor takes it,
``d_state``; ``lrnn_params`` are further keyword arguments. (lrnnx builds ``lrnn_cls(**lrnn_params)`` without
``d_model``/``d_state``, so its classifier cannot be constructed.) In event mode the timesteps ``τ (B, L)`` go to
every layer, pooled with the sequence.

The pooling is written once as pure functions (:func:`intermediate_pool`, :func:`final_pool`), which
:class:`SequencePooling` and the blocks call. Intermediate pooling (factor ``f``; rows are cut into windows of
``f`` steps, the last one partial when ``f`` does not divide L) gives ``ceil(L / f)`` steps and lengths
``ceil(length / f)``:

* ``"stride"`` keeps steps ``0, f, 2f, ...``; the kept step's timestep is the time since the previous kept step
  (the sum of ``τ`` over ``((i-1)f, if]``);
* ``"mean"`` / ``"max"`` pool each window's valid steps; its timestep is the sum of the window's valid ``τ``
  (the time between the windows' last events).

Padding at and after a row's length never changes the result. Dropout is active only in training mode
(``model.train()``); the model starts in eval mode.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrnnx_jax.architectures.embedding import TokenEmbedding, check_ids
from lrnnx_jax.architectures.language_model import MIXERS, make_norm, mixer_factory
from lrnnx_jax.core import validation
from lrnnx_jax.core.base import LRNN, compute_dtype, drawn_random_state, torch_linear

#: final pooling modes (sequence -> vector)
POOLINGS = ("last", "mean", "max")
#: intermediate pooling modes (sequence -> shorter sequence)
INTERMEDIATE_POOLINGS = ("none", "stride", "mean", "max")
#: torch's LayerNorm epsilon
NORM_EPS = 1e-5


# ============================================================ pooling (pure functions)
def valid_mask(lengths, batch: int, length: int):
    """``(B, L)`` bool: step ``t`` of row ``b`` is before ``lengths[b]`` (all True when ``lengths`` is None)."""
    if lengths is None:
        return jnp.ones((batch, length), bool)
    return jnp.arange(length)[None, :] < lengths[:, None]


def _windows(a, factor: int, fill):
    """``(B, L, ...) -> (B, ceil(L / factor), factor, ...)``, the tail padded with ``fill``."""
    windows = -(-a.shape[1] // factor)
    pad = [(0, 0), (0, windows * factor - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
    return jnp.pad(a, pad, constant_values=fill).reshape(a.shape[0], windows, factor, *a.shape[2:])


def _masked_mean(x, valid, axis: int):
    """Mean of ``x`` over ``axis`` where ``valid`` (``x``'s shape without the feature axis); 0 where none is."""
    count = jnp.sum(valid, axis=axis)[..., None]
    return jnp.sum(jnp.where(valid[..., None], x, 0), axis=axis) / jnp.maximum(count, 1).astype(x.dtype)


def _masked_max(x, valid, axis: int):
    """Max of ``x`` over ``axis`` where ``valid``; 0 where none is."""
    pooled = jnp.max(jnp.where(valid[..., None], x, -jnp.inf), axis=axis)
    return jnp.where(jnp.any(valid, axis=axis)[..., None], pooled, 0)


def intermediate_pool(x, integration_timesteps, lengths, mode: str, factor: int):
    """Shorten a sequence by ``factor``: ``x (B, L, H), τ (B, L) or None, lengths (B,) or None`` ->
    ``(x (B, ceil(L/f), H), τ, lengths)`` (see the module docstring). ``mode`` in :data:`INTERMEDIATE_POOLINGS`."""
    tau = integration_timesteps
    if mode == "none" or factor == 1:
        return x, tau, lengths
    batch, length, _ = x.shape
    windows = -(-length // factor)
    valid = _windows(valid_mask(lengths, batch, length), factor, False)  # (B, W, f)
    if mode == "stride":
        x = x[:, ::factor]
        if tau is not None:
            # window i holds the steps ((i-1)f, if]: the time from the previous kept step to this one
            tau = jnp.pad(tau, [(0, 0), (factor - 1, 0)])[:, : windows * factor].reshape(batch, windows, factor).sum(-1)
    elif mode in ("mean", "max"):
        pool = _masked_mean if mode == "mean" else _masked_max
        x = pool(_windows(x, factor, 0), valid, axis=2)
        if tau is not None:
            summed = jnp.sum(jnp.where(valid, _windows(tau, factor, 0), 0), axis=2)
            tau = jnp.where(jnp.any(valid, axis=2), summed, 1)  # 1: any positive step past the row's end
    else:
        raise ValueError(f"unknown intermediate pooling {mode!r}; expected one of {list(INTERMEDIATE_POOLINGS)}")
    if lengths is not None:
        lengths = -(-lengths // factor)
    return x, tau, lengths


def final_pool(x, lengths, mode: str):
    """A sequence to one vector per row: ``x (B, L, H), lengths (B,) or None -> (B, H)``.

    ``"last"``: the step at ``length - 1``; ``"mean"`` / ``"max"``: over the valid steps.
    """
    batch, length, _ = x.shape
    if mode == "last":
        if lengths is None:
            return x[:, -1]
        last = jnp.clip(lengths - 1, 0, length - 1)
        return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    if mode == "mean":
        return _masked_mean(x, valid_mask(lengths, batch, length), axis=1)
    if mode == "max":
        return _masked_max(x, valid_mask(lengths, batch, length), axis=1)
    raise ValueError(f"unknown pooling {mode!r}; expected one of {list(POOLINGS)}")


class SequencePooling(nnx.Module):
    """lrnnx's pooling layer: ``stride > 1`` shortens the sequence (:func:`intermediate_pool`, ``pooling_type``
    ``"stride"``, ``"mean"`` or ``"max"``); ``stride == 1`` pools it to a vector (:func:`final_pool`,
    ``"last"``, ``"mean"`` or ``"max"``).

    ``__call__(x, lengths=None, integration_timesteps=None) -> (x, integration_timesteps, lengths)``.
    """

    def __init__(self, pooling_type: str = "last", stride: int = 1):
        self.stride = validation.check_positive_int(stride, "stride")
        allowed = INTERMEDIATE_POOLINGS[1:] if self.stride > 1 else POOLINGS
        if pooling_type not in allowed:
            raise ValueError(f"unknown {'intermediate ' if self.stride > 1 else ''}pooling {pooling_type!r} for "
                             f"stride={stride}; expected one of {list(allowed)}")
        self.pooling_type = pooling_type

    def __call__(self, x, lengths=None, integration_timesteps=None):
        if self.stride > 1:
            x, integration_timesteps, lengths = intermediate_pool(x, integration_timesteps, lengths, self.pooling_type,
                                                                  self.stride)
            return x, integration_timesteps, lengths
        return final_pool(x, lengths, self.pooling_type), integration_timesteps, lengths


# ============================================================ blocks
def resolve_lrnn_cls(lrnn_cls):
    """A zoo name (:data:`MIXERS`) or a class/factory -> the class/factory."""
    if isinstance(lrnn_cls, str):
        if lrnn_cls not in MIXERS:
            raise ValueError(f"unknown lrnn_cls {lrnn_cls!r}; expected one of {list(MIXERS)} or an LRNN class")
        return mixer_factory(lrnn_cls)
    if not callable(lrnn_cls):
        raise TypeError(f"lrnn_cls must be a model name {list(MIXERS)} or an LRNN class, got {lrnn_cls!r}")
    return lrnn_cls


def _keyword_names(factory) -> set[str]:
    """The keyword arguments ``factory`` names, following ``**kwargs`` up a class's bases (S4D passes them on)."""
    names: set[str] = set()
    for owner in (inspect.getmro(factory) if inspect.isclass(factory) else (factory,)):
        try:
            parameters = inspect.signature(owner.__init__ if inspect.isclass(owner) else owner).parameters
        except (TypeError, ValueError):
            break
        names |= {n for n, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
            break
    return names


def build_lrnn(lrnn_cls, d_model: int, d_state: int, lrnn_params: Optional[Mapping[str, Any]], rngs: nnx.Rngs) -> LRNN:
    """``lrnn_cls(d_model=d_model, d_state=d_state (if it takes it), **lrnn_params, rngs=rngs)``.

    ``lrnn_params`` may override ``d_state`` but not ``d_model`` (the block's width). Models with a
    ``transposed`` layout (S4, S4D) get ``transposed=False``: blocks work on ``(B, L, H)``.
    """
    factory = resolve_lrnn_cls(lrnn_cls)
    name = getattr(factory, "__name__", repr(factory))
    kwargs = dict(lrnn_params or {})
    if "d_model" in kwargs or "rngs" in kwargs:
        raise TypeError(f"lrnn_params must not contain d_model or rngs (the classifier passes them), got {sorted(kwargs)}")
    parameters = _keyword_names(factory)
    if "d_state" in parameters:
        kwargs.setdefault("d_state", d_state)
    if "transposed" in parameters:
        kwargs.setdefault("transposed", False)
    try:
        layer = factory(d_model=d_model, **kwargs, rngs=rngs)
    except TypeError as error:
        raise TypeError(f"could not build {name}(d_model={d_model}, **{kwargs}): {error}") from error
    if not isinstance(layer, LRNN):
        raise TypeError(f"lrnn_cls must build an lrnnx_jax LRNN model, {name} built a {type(layer).__name__}")
    if getattr(layer, "transposed", False):
        raise ValueError(f"{name} with transposed=True takes (B, H, L); the classifier's blocks need transposed=False")
    return layer


class ClassifierBlock(nnx.Module):
    """``x = LayerNorm(dropout(lrnn(x, τ, lengths)) + x)``, then the intermediate pooling; the final block also
    pools the sequence and applies the head.

    Args (lrnnx's): ``d_model``, ``d_state``, ``lrnn_cls`` (a name or class; built by :func:`build_lrnn` with
    ``lrnn_params``), ``num_classes`` / ``output_dim`` (the head's width when ``is_final``), ``pooling`` (final),
    ``dropout``, ``intermediate_pooling``, ``pooling_factor``, ``is_final``.

    ``__call__(x, integration_timesteps=None, lengths=None)`` on validated compute-dtype arrays returns the
    outputs ``(B, num_classes or output_dim)`` when final, else ``(x, integration_timesteps, lengths)``.
    """

    def __init__(self, d_model: int, d_state: int, lrnn_cls, num_classes: int = 0, output_dim: int = 1,
                 pooling: str = "last", dropout: float = 0.1, intermediate_pooling: str = "none", pooling_factor: int = 2,
                 is_final: bool = False, lrnn_params: Optional[Mapping[str, Any]] = None, *, rngs: nnx.Rngs):
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {list(POOLINGS)}")
        if intermediate_pooling not in INTERMEDIATE_POOLINGS:
            raise ValueError(f"unknown intermediate_pooling {intermediate_pooling!r}; "
                             f"expected one of {list(INTERMEDIATE_POOLINGS)}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.lrnn = build_lrnn(lrnn_cls, d_model, d_state, lrnn_params, rngs)
        self.norm = make_norm(d_model, rms_norm=False, eps=NORM_EPS, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, deterministic=True, rngs=rngs)
        self.intermediate_pooling = intermediate_pooling
        self.pooling_factor = validation.check_positive_int(pooling_factor, "pooling_factor")
        self.pooling = pooling
        self.is_final = bool(is_final)
        self.output_proj = (torch_linear(d_model, num_classes if num_classes > 0 else output_dim, use_bias=True, rngs=rngs)
                            if self.is_final else None)

    def __call__(self, x, integration_timesteps=None, lengths=None):
        mask = None if lengths is None else valid_mask(lengths, *x.shape[:2])
        y, _ = self.lrnn.masked_forward(x, integration_timesteps, mask, lengths, False, None)
        x = self.norm(self.dropout(y.astype(x.dtype)) + x)
        x, integration_timesteps, lengths = intermediate_pool(x, integration_timesteps, lengths,
                                                              self.intermediate_pooling, self.pooling_factor)
        if self.is_final:
            return self.output_proj(final_pool(x, lengths, self.pooling))
        return x, integration_timesteps, lengths


def _per_layer(value, n_layers: int, name: str, is_single) -> list:
    """``value`` repeated ``n_layers`` times when ``is_single(value)``, else a list of exactly ``n_layers``."""
    if is_single(value):
        return [value] * n_layers
    if not isinstance(value, (list, tuple)) or len(value) != n_layers:
        raise ValueError(f"{name} must be one value or a list of n_layers={n_layers} values, got {value!r}")
    return list(value)


# ============================================================ the classifier
class Classifier(nnx.Module):
    """A sequence classifier (``num_classes > 0``) or regressor (``output_dim`` outputs) over any zoo model.

    Args (lrnnx's, see the module docstring):
      input_dim: features of ``x (B, L, input_dim)`` (unused with ``vocab_size``).
      num_classes: > 0: ``num_classes`` logits; 0: ``output_dim`` regression outputs.
      d_model, d_state, n_layers: widths and depth; every layer gets ``d_model`` and (where it takes one)
        ``d_state``.
      lrnn_cls: a model name of :data:`MIXERS`, an LRNN class, or a list of them (one per layer).
      pooling: the final pooling, ``"last"``, ``"mean"`` or ``"max"``.
      dropout: the rate of each block's and the embedding's dropout (training mode only).
      intermediate_pooling, pooling_factor: each block's pooling after its norm (one value or one per layer).
      vocab_size, embedding_dim, padding_idx: token inputs ``(B, L)`` through a :class:`TokenEmbedding`
        (``embedding_dim`` defaults to ``d_model``).
      max_position_embeddings: with ``vocab_size``, adds a learned position embedding of this size (lrnnx accepts
        it and ignores it).
      lrnn_params: further keyword arguments of the layers: a dict (every layer) or a list of dicts (one per layer).

    ``model(x, lengths=None, integration_timesteps=None)`` (lrnnx's order; keywords are clearer) returns
    ``(B, num_classes or output_dim)`` in the compute dtype (float32, or float64 for float64 inputs).
    """

    def __init__(self, input_dim: Optional[int], num_classes: int = 0, output_dim: int = 1, d_model: int = 128,
                 d_state: int = 64, n_layers: int = 4, lrnn_cls: Union[str, type, Sequence[Union[str, type]]] = "LRU",
                 pooling: str = "last", dropout: float = 0.1, intermediate_pooling: Union[str, Sequence[str]] = "none",
                 pooling_factor: Union[int, Sequence[int]] = 2, vocab_size: Optional[int] = None,
                 embedding_dim: Optional[int] = None, max_position_embeddings: Optional[int] = None,
                 padding_idx: Optional[int] = 0, lrnn_params: Union[None, Mapping[str, Any], Sequence[Mapping[str, Any]]] = None,
                 *, rngs: nnx.Rngs):
        self.d_model = validation.check_positive_int(d_model, "d_model")
        d_state = validation.check_positive_int(d_state, "d_state")
        self.n_layers = n_layers = validation.check_positive_int(n_layers, "n_layers")
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0: regression with output_dim outputs), got {num_classes!r}")
        if num_classes > 0 and output_dim != 1:
            raise ValueError(f"give num_classes (classification) or output_dim (regression), not both: got "
                             f"num_classes={num_classes} and output_dim={output_dim}")
        if num_classes == 0:
            validation.check_positive_int(output_dim, "output_dim")
        self.num_outputs = int(num_classes) if num_classes > 0 else int(output_dim)
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {list(POOLINGS)}")
        self.pooling = pooling
        classes = _per_layer(lrnn_cls, n_layers, "lrnn_cls", lambda v: not isinstance(v, (list, tuple)))
        poolings = _per_layer(intermediate_pooling, n_layers, "intermediate_pooling", lambda v: isinstance(v, str))
        factors = _per_layer(pooling_factor, n_layers, "pooling_factor", lambda v: not isinstance(v, (list, tuple)))
        params = _per_layer(lrnn_params, n_layers, "lrnn_params", lambda v: v is None or isinstance(v, Mapping))
        for index, p in enumerate(params):
            if p is not None and not isinstance(p, Mapping):
                raise TypeError(f"lrnn_params[{index}] must be a dict of keyword arguments, got {p!r}")

        if vocab_size is not None:
            self.input_dim = None
            self.embedding_dim = validation.check_positive_int(embedding_dim if embedding_dim is not None else d_model,
                                                               "embedding_dim")
            self.embedding = TokenEmbedding(vocab_size, self.embedding_dim, padding_idx=padding_idx,
                                            max_position_embeddings=max_position_embeddings,
                                            use_position=max_position_embeddings is not None, dropout=dropout, rngs=rngs)
            self.embed_proj = (torch_linear(self.embedding_dim, d_model, use_bias=True, rngs=rngs)
                               if self.embedding_dim != d_model else None)
            self.input_proj = None
        else:
            if embedding_dim is not None or max_position_embeddings is not None:
                raise ValueError("embedding_dim and max_position_embeddings need vocab_size (token inputs)")
            self.input_dim = validation.check_positive_int(input_dim, "input_dim")
            self.embedding_dim = None
            self.embedding = self.embed_proj = None
            self.input_proj = torch_linear(self.input_dim, d_model, use_bias=True, rngs=rngs)

        def block(index, is_final):
            return ClassifierBlock(d_model, d_state, classes[index], num_classes=num_classes, output_dim=output_dim,
                                   pooling=pooling, dropout=dropout, intermediate_pooling=poolings[index],
                                   pooling_factor=factors[index], is_final=is_final, lrnn_params=params[index], rngs=rngs)

        self.blocks = nnx.List([block(index, False) for index in range(n_layers - 1)])
        self.final_block = block(n_layers - 1, True)
        # A weak-typed parameter (``jnp.full`` of a Python float, as LTI S5's B) turns strong at the first optimizer
        # update, and so does its optimizer state at the second: a jitted training step would compile three times.
        nnx.update(self, jax.tree.map(lambda a: jnp.asarray(a, dtype=a.dtype), nnx.state(self, nnx.Param)))

    @property
    def layers(self) -> list[ClassifierBlock]:
        """Every block, the final one last."""
        return [*self.blocks, self.final_block]

    @property
    def supports_integration_timesteps(self) -> bool:
        """Whether every layer has an event mode (``integration_timesteps`` can be passed)."""
        return all(block.lrnn.supports_integration_timesteps for block in self.layers)

    def forward_logits(self, x, lengths=None, integration_timesteps=None):
        """The forward on validated arrays: ``x`` ids ``(B, L)`` or features ``(B, L, input_dim)`` (compute dtype),
        ``lengths (B,)`` int or None, ``τ (B, L)`` or None -> ``(B, num_classes or output_dim)``."""
        if self.embedding is not None:
            if jnp.issubdtype(x.dtype, jnp.integer):
                x = self.embedding(x)
            if self.embed_proj is not None:
                x = self.embed_proj(x)
        else:
            x = self.input_proj(x)
        x = x.astype(compute_dtype(x.dtype))
        tau = integration_timesteps
        for block in self.blocks:
            x, tau, lengths = block(x, tau, lengths)
        return self.final_block(x, tau, lengths)

    def __call__(self, x, lengths=None, integration_timesteps=None):
        """``x``: features ``(B, L, input_dim)``, or with ``vocab_size`` token ids ``(B, L)`` (or embeddings
        ``(B, L, embedding_dim)``); ``lengths (B,)`` in ``[1, L]``; ``integration_timesteps (B, L)`` (event mode:
        every layer must have one) -> ``(B, num_classes or output_dim)``."""
        x = self._check_input(x)
        batch, length = x.shape[:2]
        validation.check_lengths(lengths, batch, length)
        if lengths is not None:
            lengths = jnp.asarray(lengths)
            if validation.is_concrete(lengths) and batch and int(np.min(np.asarray(lengths))) < 1:
                raise ValueError(f"lengths must lie in [1, L={length}] (a row needs a step to classify), "
                                 f"got min {int(np.min(np.asarray(lengths)))}")
            lengths = lengths.astype(jnp.int32)
        dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
        if integration_timesteps is not None:
            missing = [f"{i}: {type(b.lrnn).__name__}" for i, b in enumerate(self.layers)
                       if not b.lrnn.supports_integration_timesteps]
            if missing:
                raise ValueError(f"integration_timesteps needs every layer to have an event mode; layers {missing} "
                                 "have none")
            integration_timesteps = validation.check_timesteps(integration_timesteps, (batch, length))
            integration_timesteps = integration_timesteps.astype(compute_dtype(dtype))
        if jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(compute_dtype(x.dtype))
        out, rng_state = _jit_forward(self, x, lengths, integration_timesteps)
        if rng_state is not None:
            nnx.update(self, rng_state)
        return out

    def _check_input(self, x):
        if not hasattr(x, "shape"):
            x = jnp.asarray(x)
        if self.embedding is None:
            return validation.check_sequence(x, self.input_dim, layout="(B, L, input_dim)")
        if jnp.issubdtype(x.dtype, jnp.integer):
            return check_ids(x, self.embedding.vocab_size, "x (token ids)")
        return validation.check_sequence(x, self.embedding_dim, layout="(B, L) token ids or (B, L, embedding_dim)")


# One compiled program per (structure, shapes), the model passed as the pytree it is (lrnnx_jax.core.base explains
# why); inside a user's jit / grad it is inlined. Random state is returned (and written back) only when active dropout
# drew from it.
@jax.jit
def _jit_forward(model, x, lengths, integration_timesteps):
    return model.forward_logits(x, lengths, integration_timesteps), drawn_random_state(model)
