"""Causal depthwise 1-D convolution (Mamba, RG-LRU), with a rolling inference state.

Layout follows lrnnx: ``weight (D, K)`` (PyTorch's ``conv1d.weight (D, 1, K)`` squeezed),
and the inference ``conv_state (B, D, K)`` holds the last ``K`` raw (pre-conv)
inputs, newest last. ::

    y[b, t, d] = bias[d] + sum_k weight[d, k] * x[b, t - K + 1 + k, d]
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def causal_conv1d(x, weight, bias=None, conv_state: Optional[jax.Array] = None):
    """Full-sequence causal depthwise conv.

    Args:
      x: ``(B, L, D)``.
      weight: ``(D, K)``; bias: ``(D,)`` or None.
      conv_state: optional ``(B, D, K)`` history (the last ``K`` inputs before ``x``);
        zeros when None.

    Returns:
      ``(B, L, D)``.
    """
    batch, length, _ = x.shape
    K = weight.shape[1]
    if conv_state is None:
        history = jnp.zeros((batch, K - 1, x.shape[2]), x.dtype)
    else:
        history = jnp.moveaxis(conv_state[:, :, 1:], 1, 2).astype(x.dtype)
    padded = jnp.concatenate([history, x], axis=1)  # (B, L + K - 1, D)
    y = sum(padded[:, k : k + length] * weight[:, k] for k in range(K))
    return y if bias is None else y + bias


def conv_state_after(x, K: int, lengths: Optional[jax.Array] = None, conv_state: Optional[jax.Array] = None):
    """The ``(B, D, K)`` conv state after consuming ``x (B, L, D)`` (up to ``lengths`` per row)."""
    batch, length, channels = x.shape
    if conv_state is None:
        conv_state = jnp.zeros((batch, channels, K), x.dtype)
    full = jnp.concatenate([jnp.moveaxis(conv_state, 1, 2).astype(x.dtype), x], axis=1)  # (B, K + L, D)
    ends = jnp.full((batch,), length) if lengths is None else lengths
    index = ends[:, None] + jnp.arange(K)[None, :]  # last K rows ending at K + end - 1
    window = jnp.take_along_axis(full, index[..., None], axis=1)  # (B, K, D)
    return jnp.moveaxis(window, 1, 2)


def causal_conv1d_step(x_t, conv_state, weight, bias=None):
    """One step. ``x_t (B, D)``, ``conv_state (B, D, K)`` -> ``(y_t (B, D), new_conv_state)``."""
    new_state = jnp.concatenate([conv_state[:, :, 1:], x_t[:, :, None].astype(conv_state.dtype)], axis=2)
    y = jnp.sum(new_state.astype(x_t.dtype) * weight, axis=-1)
    return (y if bias is None else y + bias), new_state
