"""Token and position embeddings (lrnnx's ``architectures/embedding.py``).

* :class:`PositionEmbedding` ``(max_position_embeddings, embedding_dim)``: a learned table of absolute positions.
* :class:`TokenEmbedding` ``(vocab_size, embedding_dim, padding_idx=None, max_position_embeddings=None,
  use_position=False, dropout=0.1)``: the token lookup, plus the position embedding of ``0..L-1`` when
  ``use_position``, then dropout. ``token_ids (B, L)`` -> ``(B, L, embedding_dim)``.

As ``torch.nn.Embedding``, the tables start ``N(0, 1)``; the ``padding_idx`` row starts at zero and receives no
gradient. Dropout is active only in training mode (``model.train()``); modules start in eval mode, as every
lrnnx_jax module (torch modules start in training mode).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrnnx_jax.core import validation


def check_ids(ids, num_embeddings: int, name: str, layout: str = "(B, L)", ndim: int = 2):
    """Validate integer ids of rank ``ndim`` with values in ``[0, num_embeddings)`` (a traced check under
    ``lrnnx_jax.checked``)."""
    if not hasattr(ids, "shape"):
        ids = jnp.asarray(ids)
    if ids.ndim != ndim:
        raise ValueError(f"{name} must have shape {layout}, got shape {tuple(ids.shape)}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"{name} must be integers, got dtype {ids.dtype}")
    validation.check_id_values(ids, num_embeddings, name)
    return ids


def lookup(embed: nnx.Embed, ids):
    """Rows ``ids`` of the table, in the table's dtype (``nnx.Embed`` casts to the dtype fixed at construction)."""
    return jnp.take(embed.embedding[...], ids, axis=0)


class PositionEmbedding(nnx.Module):
    """A learned absolute position embedding: ``positions (...)`` int -> ``(..., embedding_dim)``."""

    def __init__(self, max_position_embeddings: int, embedding_dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.max_position_embeddings = validation.check_positive_int(max_position_embeddings, "max_position_embeddings")
        self.embedding_dim = validation.check_positive_int(embedding_dim, "embedding_dim")
        self.position_embedding = nnx.Embed(max_position_embeddings, embedding_dim, param_dtype=param_dtype,
                                            embedding_init=nnx.initializers.normal(1.0), rngs=rngs)

    def __call__(self, positions):
        positions = jnp.asarray(positions)
        check_ids(positions, self.max_position_embeddings, "positions", "(...)", positions.ndim)
        return lookup(self.position_embedding, positions)


class TokenEmbedding(nnx.Module):
    """Token lookup (+ the learned position embedding when ``use_position``), then dropout.

    Args:
      vocab_size, embedding_dim: the table.
      padding_idx: this row starts at zero and gets no gradient (``torch.nn.Embedding``'s ``padding_idx``).
      max_position_embeddings: the position table's size; required when ``use_position``.
      use_position: add the embedding of positions ``0..L-1``.
      dropout: the rate, active in training mode (``model.train()``).
    """

    def __init__(self, vocab_size: int, embedding_dim: int, padding_idx: Optional[int] = None,
                 max_position_embeddings: Optional[int] = None, use_position: bool = False, dropout: float = 0.1,
                 *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.vocab_size = validation.check_positive_int(vocab_size, "vocab_size")
        self.embedding_dim = validation.check_positive_int(embedding_dim, "embedding_dim")
        if padding_idx is not None:
            if isinstance(padding_idx, bool) or not isinstance(padding_idx, (int, np.integer)):
                raise TypeError(f"padding_idx must be an integer or None, got {padding_idx!r}")
            if not -vocab_size <= padding_idx < vocab_size:
                raise ValueError(f"padding_idx must lie in [-{vocab_size}, {vocab_size}), got {padding_idx}")
            padding_idx = int(padding_idx) % vocab_size  # torch accepts negative indices
        self.padding_idx = padding_idx
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.token_embedding = nnx.Embed(vocab_size, embedding_dim, param_dtype=param_dtype,
                                         embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
        if padding_idx is not None:
            table = self.token_embedding.embedding
            table.set_value(table.get_value().at[padding_idx].set(0))
        if use_position and max_position_embeddings is None:
            raise ValueError("max_position_embeddings must be set when use_position=True")
        self.position_embedding = (PositionEmbedding(max_position_embeddings, embedding_dim, rngs=rngs,
                                                     param_dtype=param_dtype) if use_position else None)
        self.dropout = nnx.Dropout(dropout, deterministic=True, rngs=rngs)

    def __call__(self, token_ids):
        """``token_ids (B, L)`` int -> ``(B, L, embedding_dim)``."""
        token_ids = check_ids(token_ids, self.vocab_size, "token_ids")
        embeddings = lookup(self.token_embedding, token_ids)
        if self.padding_idx is not None:
            # the padding row keeps its value and gets no gradient
            embeddings = jnp.where((token_ids == self.padding_idx)[..., None], jax.lax.stop_gradient(embeddings), embeddings)
        if self.position_embedding is not None:
            length = token_ids.shape[1]
            if length > self.position_embedding.max_position_embeddings:
                raise ValueError(f"token_ids has length {length}, more than max_position_embeddings="
                                 f"{self.position_embedding.max_position_embeddings}")
            embeddings = embeddings + self.position_embedding(jnp.arange(length))[None]
        return self.dropout(embeddings)
