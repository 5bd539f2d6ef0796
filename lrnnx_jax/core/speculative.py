"""Speculative verification of the selective models through the checkpointed SSU (``pallas_kernels.checkpointing_ssu``).

Mamba and Mamba-2 verify T drafted tokens with FlashInfer's checkpointed replay instead of the generic replay of
:meth:`lrnnx_jax.core.base.LRNN.verify` (which recomputes the accepted tokens through the forward). Their verify
cache holds the committed inference cache (``"checkpoint"``), the previous call's raw conv inputs
(``"old_conv_in" (B, T, conv_channels)``, to replay the conv history), and the op's per-token caches (``old_x``,
``old_B``, ``old_dt``, ``old_cumAdt``, ``cache_buf_idx``; one slot per batch row). A call

1. replays the conv history over the accepted raw inputs (:func:`replay_conv`) and runs the new raw inputs'
   conv from it;
2. hands the new tokens' ``x, dt, B, C`` to the op, which replays the SSM state over the accepted tokens of
   the previous call, commits it, and returns the drafts' outputs (:func:`run_ssu`).
"""

from __future__ import annotations

import jax.numpy as jnp

from lrnnx_jax.core import conv
from lrnnx_jax.core.base import compute_dtype
from pallas_kernels.checkpointing_ssu import checkpointing_ssu

SSU_CACHES = ("old_x", "old_B", "old_dt", "old_cumAdt", "cache_buf_idx")


def ssu_verify_cache(checkpoint: dict, num_tokens: int, conv_channels: int, nheads: int, dim: int, ngroups: int,
                     d_state: int, per_channel: bool, dtype=None) -> dict:
    """The empty verify cache over ``checkpoint`` (shapes in the module docstring; ``old_dt``/``old_cumAdt`` are
    ``(B, 2, nheads, T)``, or ``(B, 2, nheads, dim, T)`` with a step per channel)."""
    batch = checkpoint["lrnn_state"].shape[0]
    f = compute_dtype(dtype or jnp.float32)
    steps = (batch, 2, nheads, dim, num_tokens) if per_channel else (batch, 2, nheads, num_tokens)
    return {"checkpoint": checkpoint,
            "old_conv_in": jnp.zeros((batch, num_tokens, conv_channels), f),
            "old_x": jnp.zeros((batch, num_tokens, nheads, dim), f),
            "old_B": jnp.zeros((batch, 2, num_tokens, ngroups, d_state), f),
            "old_dt": jnp.zeros(steps, f),
            "old_cumAdt": jnp.zeros(steps, f),
            "cache_buf_idx": jnp.zeros((batch,), jnp.int32)}


def replay_conv(cache: dict, num_accepted, conv_in, weight, bias):
    """The committed conv history (the checkpoint's, advanced over the ``num_accepted (B,)`` accepted raw inputs of
    the previous call) and the causal conv of the new raw inputs ``conv_in (B, T, C)`` from it (before the
    activation). Returns ``(conv_state (B, C, K), conv_out (B, T, C))``."""
    checkpoint = cache["checkpoint"]["conv_state"]
    conv_state = conv.conv_state_after(cache["old_conv_in"].astype(conv_in.dtype), checkpoint.shape[-1], num_accepted,
                                       conv_state=checkpoint)
    return conv_state, conv.causal_conv1d(conv_in, weight, bias, conv_state=conv_state)


def run_ssu(cache: dict, num_accepted, conv_state, conv_in, x, dt, A, B, C, *, D, z, dt_bias, config):
    """The op on the new tokens (``x (B, T, nheads, dim)``, ``dt``, ``A``, ``B``/``C (B, T, G, N)``, ``D``, ``z``,
    ``dt_bias`` in the op's layout, ``dt`` before ``softplus(dt + dt_bias)``), from the cache. Returns
    ``(y (B, T, nheads, dim), new verify cache)``: the replayed state and ``conv_state`` committed, the new
    tokens cached."""
    f = x.dtype
    checkpoint = cache["checkpoint"]
    state = checkpoint["lrnn_state"]
    heads_state = state.reshape(state.shape[0], x.shape[2], x.shape[3], -1)
    caches = [cache[name] if name == "cache_buf_idx" else cache[name].astype(f) for name in SSU_CACHES]
    y, ssu = checkpointing_ssu(heads_state.astype(f), *caches, num_accepted, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
                               dt_softplus=True, config=config)
    new_cache = {"checkpoint": {"conv_state": conv_state.astype(checkpoint["conv_state"].dtype),
                                "lrnn_state": ssu.state.reshape(state.shape).astype(state.dtype)},
                 "old_conv_in": conv_in.astype(cache["old_conv_in"].dtype)}
    for name in SSU_CACHES:
        new_cache[name] = getattr(ssu, name).astype(cache[name].dtype)
    return y, new_cache
