"""Multi-head attention with a preallocated, masked KV cache (lrnnx's / mamba_ssm's ``MHA``).

The math is in pure functions (:func:`rotary`, :func:`attend`, :func:`write_kv`); :class:`MHA` owns the
projections. Every path works on one static-shape KV cache per layer::

    {"k": (B, max_seqlen, num_heads_kv, head_dim), "v": (B, max_seqlen, num_heads_kv, head_dim), "length": (B,) int32}

``length[b]`` is how many positions of row ``b`` are filled. A call writes its tokens' keys and values at
positions ``length[b] + t`` and lets query ``t`` see the keys at positions ``<= length[b] + t``, so the
parallel forward from a cache (prefill, chunked prefill), ``step`` and the multi-token verification are the
same computation. Speculative verification rolls back by length alone: rejected tokens' keys stay in the
buffer, beyond ``length``, masked, and are overwritten by the next call.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from lrnnx_jax.core import validation
from lrnnx_jax.core import conv
from lrnnx_jax.core.base import LrnnxEntry, lrnnx_entry, lrnnx_linear_entries, torch_linear

KVCache = dict


def rotary(x, positions, rotary_dim: int, base: float, interleaved: bool = False):
    """Rotary position embedding of the first ``rotary_dim`` channels of each head (flash_attn's convention).

    Args:
      x: ``(B, L, heads, head_dim)``.
      positions: ``(B, L)`` integer positions.
      rotary_dim: even, ``<= head_dim``; 0 returns ``x``.
      interleaved: rotate pairs ``(x[2i], x[2i+1])`` (GPT-J) instead of halves ``(x[i], x[i + rotary_dim/2])``.

    Returns:
      ``x`` rotated by ``positions * base ** (-2i / rotary_dim)``, dtype of ``x``.
    """
    if rotary_dim == 0:
        return x
    f = jnp.promote_types(x.dtype, jnp.float32)
    inv_freq = 1.0 / base ** (jnp.arange(0, rotary_dim, 2, dtype=f) / rotary_dim)
    angles = positions.astype(f)[..., None] * inv_freq  # (B, L, rotary_dim / 2)
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    rot, rest = x[..., :rotary_dim].astype(f), x[..., rotary_dim:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(rot.shape)
    else:
        x1, x2 = rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2 :]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([out.astype(x.dtype), rest], axis=-1)


def attend(q, k, v, visible, scale: float, precision=None):
    """Softmax attention with grouped keys and values.

    Args:
      q: ``(B, Lq, num_heads, head_dim)``.
      k, v: ``(B, Lk, num_heads_kv, head_dim)``; query head ``h`` uses key head ``h // (num_heads / num_heads_kv)``.
      visible: ``(B, Lq, Lk)`` bool: which keys each query sees. A query that sees none gets zeros.
      scale: the softmax scale.

    Returns:
      ``(B, Lq, num_heads, head_dim)`` in the dtype of ``q``.
    """
    batch, lq, heads, head_dim = q.shape
    heads_kv = k.shape[2]
    f = jnp.promote_types(q.dtype, jnp.float32)
    qg = q.reshape(batch, lq, heads_kv, heads // heads_kv, head_dim).astype(f)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k.astype(f), precision=precision) * scale
    mask = visible[:, None, None]
    scores = jnp.where(mask, scores, -jnp.inf)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.where(mask, jnp.exp(scores - jnp.where(jnp.isfinite(peak), peak, 0)), 0)
    weights = weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), jnp.finfo(f).tiny)
    out = jnp.einsum("bkgqs,bskd->bqkgd", weights, v.astype(f), precision=precision)
    return out.reshape(batch, lq, heads, head_dim).astype(q.dtype)


def write_kv(cache: KVCache, k, v, num_valid=None) -> KVCache:
    """Write ``k, v (B, L, num_heads_kv, head_dim)`` at positions ``cache["length"] + t``; ``length`` grows by
    ``num_valid (B,)`` (all ``L`` when None). Positions past the buffer are dropped (callers size it)."""
    batch, length = k.shape[:2]
    positions = cache["length"][:, None] + jnp.arange(length)
    rows = jnp.arange(batch)[:, None]
    grow = length if num_valid is None else num_valid
    return {**cache, "k": cache["k"].at[rows, positions].set(k.astype(cache["k"].dtype), mode="drop"),
            "v": cache["v"].at[rows, positions].set(v.astype(cache["v"].dtype), mode="drop"),
            "length": cache["length"] + jnp.asarray(grow, jnp.int32)}


class MHA(nnx.Module):
    """lrnnx's (mamba_ssm's) multi-head attention, with grouped queries and rotary embeddings.

    ``x (B, L, embed_dim) -> (B, L, embed_dim)``: ``in_proj`` gives ``num_heads`` query heads and
    ``num_heads_kv`` key and value heads of ``head_dim`` (plus, with ``mlp_dim > 0``, a SiLU-gated MLP branch of
    width ``mlp_dim`` rounded up to 256, whose output is concatenated before ``out_proj``). ``causal=False`` (lrnnx's
    default) attends to the whole sequence and cannot decode: :meth:`step` and any cache refuse it.

    With ``d_conv > 0`` (mamba_ssm's option) a causal depthwise conv of ``d_conv`` taps (with a bias, no
    activation) runs over the projected q, k, v before the heads are split; its history of raw projections is
    part of the KV cache (``"conv_state" (B, qkv_dim, d_conv)``), and the verify cache also keeps the previous
    call's raw projections (``"old_qkv" (B, T, qkv_dim)``) to replay it.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_heads_kv: Optional[int] = None, head_dim: Optional[int] = None,
                 mlp_dim: int = 0, qkv_proj_bias: bool = True, out_proj_bias: bool = True,
                 softmax_scale: Optional[float] = None, causal: bool = False, layer_idx=None, d_conv: int = 0,
                 rotary_emb_dim: int = 0, rotary_emb_base: float = 10000.0, rotary_emb_interleaved: bool = False,
                 *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        del layer_idx  # lrnnx's bookkeeping for its inference_params; the cache is passed explicitly here
        self.embed_dim = validation.check_positive_int(embed_dim, "embed_dim")
        self.num_heads = validation.check_positive_int(num_heads, "num_heads")
        self.num_heads_kv = validation.check_positive_int(num_heads if num_heads_kv is None else num_heads_kv, "num_heads_kv")
        if self.num_heads % self.num_heads_kv:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_heads_kv={num_heads_kv}")
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"embed_dim={embed_dim} must be a multiple of num_heads={num_heads} when head_dim is None")
            head_dim = embed_dim // num_heads
        self.head_dim = validation.check_positive_int(head_dim, "head_dim")
        if d_conv < 0 or int(d_conv) != d_conv:
            raise ValueError(f"d_conv must be an integer >= 0, got {d_conv!r}")
        self.d_conv = int(d_conv)
        if rotary_emb_dim < 0 or rotary_emb_dim % 2 or rotary_emb_dim > self.head_dim:
            raise ValueError(f"rotary_emb_dim must be an even number in [0, head_dim={self.head_dim}], got {rotary_emb_dim}")
        if mlp_dim < 0:
            raise ValueError(f"mlp_dim must be >= 0, got {mlp_dim}")
        self.mlp_dim = math.ceil(mlp_dim / 256) * 256
        self.softmax_scale = 1.0 / math.sqrt(self.head_dim) if softmax_scale is None else float(softmax_scale)
        self.causal = bool(causal)
        self.rotary_emb_dim, self.rotary_emb_base = int(rotary_emb_dim), float(rotary_emb_base)
        self.rotary_emb_interleaved = bool(rotary_emb_interleaved)
        self.qkv_dim = self.head_dim * (self.num_heads + 2 * self.num_heads_kv)
        self.in_proj = torch_linear(embed_dim, self.qkv_dim + self.mlp_dim, use_bias=qkv_proj_bias, rngs=rngs,
                                    param_dtype=param_dtype)
        self.out_proj = torch_linear(self.head_dim * self.num_heads + self.mlp_dim // 2, embed_dim, use_bias=out_proj_bias,
                                     rngs=rngs, param_dtype=param_dtype)
        if self.d_conv:  # torch Conv1d(groups=channels) init: fan_in = d_conv
            bound = 1 / math.sqrt(self.d_conv)
            self.conv_weight = nnx.Param(jax.random.uniform(rngs.params(), (self.qkv_dim, self.d_conv), param_dtype, -bound, bound))
            self.conv_bias = nnx.Param(jax.random.uniform(rngs.params(), (self.qkv_dim,), param_dtype, -bound, bound))
        else:
            self.conv_weight = self.conv_bias = None

    # ---------------------------------------------------------------- cache
    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None) -> KVCache:
        """The empty KV cache for ``max_seqlen`` positions (see the module docstring)."""
        self.require_causal("allocate_inference_cache")
        shape = (batch_size, validation.check_positive_int(max_seqlen, "max_seqlen"), self.num_heads_kv, self.head_dim)
        dtype = jnp.float32 if dtype is None else dtype
        cache = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "length": jnp.zeros((batch_size,), jnp.int32)}
        if self.d_conv:
            cache["conv_state"] = jnp.zeros((batch_size, self.qkv_dim, self.d_conv), dtype)
        return cache

    def verify_cache_from(self, cache: KVCache, num_tokens: int) -> KVCache:
        """The verify cache continuing ``cache``: ``length`` counts committed tokens only, ``"pending" (B,)`` the
        previous call's tokens written past it (0 at first); with ``d_conv`` it also keeps their raw projections
        (``"old_qkv"``, zeros at first)."""
        batch = cache["k"].shape[0]
        out = {**cache, "pending": jnp.zeros((batch,), jnp.int32)}
        if self.d_conv:
            out["old_qkv"] = jnp.zeros((batch, num_tokens, self.qkv_dim), cache["conv_state"].dtype)
        return out

    def verify(self, x, cache: KVCache, num_accepted, precision=None):
        """T drafted tokens ``x (B, T, embed_dim)`` after committing ``num_accepted (B,)`` tokens of the previous
        call: the length (and the conv history, over the accepted raw projections) move forward; the new
        tokens' keys are written past it, uncommitted. Returns ``(y (B, T, embed_dim), new verify cache)``."""
        committed = {name: value for name, value in cache.items() if name not in ("old_qkv", "pending")}
        committed["length"] = cache["length"] + num_accepted
        if self.d_conv:
            committed["conv_state"] = conv.conv_state_after(cache["old_qkv"].astype(x.dtype), self.d_conv, num_accepted,
                                                            conv_state=cache["conv_state"]).astype(cache["conv_state"].dtype)
        y, new_cache, raw_qkv = self.attend(x, committed, jnp.zeros_like(num_accepted), precision)
        new_cache["pending"] = jnp.full_like(cache["pending"], x.shape[1])
        if self.d_conv:
            new_cache["old_qkv"] = raw_qkv.astype(cache["old_qkv"].dtype)
        return y, new_cache

    def require_causal(self, what: str):
        if not self.causal:
            raise ValueError(f"{what}: this attention layer has causal=False (lrnnx's default), which cannot decode token by "
                             "token; build it with mixer_kwargs={'attn': {..., 'causal': True}}")

    # ---------------------------------------------------------------- math
    def __call__(self, x, cache: Optional[KVCache] = None, num_valid=None, precision=None):
        """``x (B, L, embed_dim)`` -> ``(y (B, L, embed_dim), new cache or None)``.

        Without a cache: attention within ``x`` (causal or not). With one: the tokens continue the cached
        sequence (positions ``length + t``), their keys and values are written, and ``length`` (and the conv
        history) advance by ``num_valid (B,)`` (all L when None); the same code serves the prefill, ``step``
        (L = 1) and the multi-token verification.
        """
        y, cache, _ = self.attend(x, cache, num_valid, precision)
        return y, cache

    def attend(self, x, cache: Optional[KVCache], num_valid, precision):
        """:meth:`__call__`, also returning the raw (pre-conv) q, k, v projections ``(B, L, qkv_dim)``."""
        batch, length, _ = x.shape
        projected = self.in_proj(x)
        raw_qkv, mlp = projected[..., : self.qkv_dim], projected[..., self.qkv_dim :]
        qkv = raw_qkv
        if self.d_conv:
            conv_state = None if cache is None else cache["conv_state"]
            qkv = conv.causal_conv1d(raw_qkv, self.conv_weight[...], self.conv_bias[...], conv_state=conv_state)
            if cache is not None:
                cache = {**cache, "conv_state": conv.conv_state_after(raw_qkv, self.d_conv, num_valid, conv_state).astype(conv_state.dtype)}
        q_end, k_end = self.num_heads * self.head_dim, (self.num_heads + self.num_heads_kv) * self.head_dim
        q = qkv[..., :q_end].reshape(batch, length, self.num_heads, self.head_dim)
        k = qkv[..., q_end:k_end].reshape(batch, length, self.num_heads_kv, self.head_dim)
        v = qkv[..., k_end:].reshape(batch, length, self.num_heads_kv, self.head_dim)
        start = jnp.zeros((batch,), jnp.int32) if cache is None else cache["length"]
        positions = start[:, None] + jnp.arange(length)
        q = rotary(q, positions, self.rotary_emb_dim, self.rotary_emb_base, self.rotary_emb_interleaved)
        k = rotary(k, positions, self.rotary_emb_dim, self.rotary_emb_base, self.rotary_emb_interleaved)
        if cache is None:
            keys, values, key_positions = k, v, jnp.broadcast_to(jnp.arange(length), (batch, length))
        else:
            cache = write_kv(cache, k, v, num_valid)
            keys, values = cache["k"], cache["v"]
            key_positions = jnp.broadcast_to(jnp.arange(keys.shape[1]), (batch, keys.shape[1]))
        if self.causal:
            visible = key_positions[:, None, :] <= positions[:, :, None]
        else:
            visible = jnp.ones((batch, length, keys.shape[1]), bool)
        context = attend(q, keys, values, visible, self.softmax_scale, precision).reshape(batch, length, -1)
        if self.mlp_dim:
            up, gate = mlp[..., : self.mlp_dim // 2], mlp[..., self.mlp_dim // 2 :]
            context = jnp.concatenate([context, up * jax.nn.silu(gate)], axis=-1)
        return self.out_proj(context), cache, raw_qkv

    def lrnnx_entries(self) -> dict[str, LrnnxEntry]:
        entries = {**lrnnx_linear_entries("in_proj", self.in_proj), **lrnnx_linear_entries("out_proj", self.out_proj)}
        if self.d_conv:
            entries["conv1d.weight"] = lrnnx_entry(self.conv_weight, shape=(self.qkv_dim, 1, self.d_conv))
            entries["conv1d.bias"] = lrnnx_entry(self.conv_bias)
        return entries

