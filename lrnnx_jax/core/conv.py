"""Causal depthwise 1-D convolution (Mamba, RG-LRU), with a rolling inference state.

Layout follows lrnnx: ``weight (D, K)`` (PyTorch's ``conv1d.weight (D, 1, K)`` squeezed),
and the inference ``conv_state (B, D, K)`` holds the last ``K`` raw (pre-conv)
inputs, newest last. ::

    y[b, t, d] = bias[d] + sum_k weight[d, k] * x[b, t - K + 1 + k, d]

:func:`causal_conv1d` and :func:`conv_state_after` serve the models' forward (from a zero
history or from an inference cache); the ``conv_cell_*`` functions are the conv of the
models' cells (``pallas_kernels.cells``): one step as elementwise operations over K
separate history vectors, with the mappings from and to the ``conv_state`` cache.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from lrnnx_jax.core.base import compute_dtype, in_compute_dtype


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


# ----------------------------------------------------------------------------- the cell's conv
# The step of a model's cell (``pallas_kernels.cells``) keeps the conv history as K separate per-row
# vectors ``conv0..conv{K-1}`` (oldest first, ``conv{K-1}`` the newest raw input) and the taps as K
# separate vectors ``conv_w0..conv_w{K-1}`` (and ``conv_b``), so that the step needs no slicing or
# concatenation of values inside a Pallas kernel.


def conv_cell_params(weight, bias=None) -> dict:
    """The cell parameters of the conv: ``{"conv_w{k}": weight[..., k] (D...)}`` and ``"conv_b"`` (when a bias);
    ``weight (D..., K)`` with any channel shape ``D...`` (``bias`` of that shape)."""
    params = {f"conv_w{k}": in_compute_dtype(weight[..., k]) for k in range(weight.shape[-1])}
    if bias is not None:
        params["conv_b"] = in_compute_dtype(bias)
    return params


def conv_cell_state(conv_state, dtype=None) -> dict:
    """``conv_state (B, D, K)`` (newest last) -> ``{"conv{k}": (B, D)}`` in ``dtype`` (default: the compute
    dtype of ``conv_state``, its promotion with float32)."""
    dtype = compute_dtype(conv_state.dtype) if dtype is None else dtype
    return {f"conv{k}": conv_state[..., k].astype(dtype) for k in range(conv_state.shape[-1])}


def conv_cell_cache(state: dict, like):
    """The ``(B, D, K)`` conv state (dtype of ``like``) from the cell state of :func:`conv_cell_state`."""
    K = like.shape[-1]
    return jnp.stack([state[f"conv{k}"] for k in range(K)], axis=-1).astype(like.dtype)


def conv_taps(params: dict) -> int:
    """K, the number of taps in cell parameters made by :func:`conv_cell_params`."""
    return sum(1 for name in params if name.startswith("conv_w"))


def conv_cell_step(params: dict, state: dict, x_in, K: int):
    """One conv step inside a cell: ``x_in (..., D)`` enters the history.

    Returns ``(y (..., D), {"conv0": ..., "conv{K-1}": x_in})``, ``y = conv_b + sum_k conv_w{k} * history_k``
    over the history ``conv1..conv{K-1}, x_in`` (oldest first); ``x_in`` enters in the state's dtype, so the
    new state has the dtypes of ``state``. Elementwise only: it lowers in Pallas.
    """
    history = [state[f"conv{k}"] for k in range(1, K)] + [x_in.astype(state[f"conv{K - 1}"].dtype)]
    y = params["conv_b"] if "conv_b" in params else 0.0
    for k in range(K):
        y = y + params[f"conv_w{k}"] * history[k]
    return y, {f"conv{k}": history[k] for k in range(K)}
