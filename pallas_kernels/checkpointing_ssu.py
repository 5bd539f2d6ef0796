"""``checkpointing_ssu``: the multi-token verify step of speculative decoding for a selective SSM.

The FlashInfer ``checkpointing_ssu`` (v1) scheme: per state slot the op keeps one *checkpoint*
state and a cache of the tokens of the previous call. A call

1. **replays** the first ``K = prev_num_accepted_tokens[slot]`` cached tokens onto the
   checkpoint (the drafts of the previous call that the sampler accepted),
2. runs its ``T`` new (draft) tokens from there and returns their outputs,
3. **commits** the replayed state (not the drafts) and caches the new tokens for the next call.

So no per-draft state is ever stored: the state is read once and written once per call, and a
rejected draft costs nothing but its cache entry. For batch row ``b`` with slot
``s = state_batch_indices[b]`` (``s = b`` without them), ``r = cache_buf_idx[s]``,
``K = prev_num_accepted_tokens[s]`` and ``g(h) = h // (nheads / ngroups)``::

    h = state[s]                                     (times state_scale[s] for an 8-bit state)
    for j < K:  h = exp(A dt_j) h + dt_j x_j (x) B_j        dt_j = old_dt[s, r, ..., j],
                                                            x_j = old_x[s, j], B_j = old_B[s, r, j, g(h)]
    state[s] = h                                     (requantized for an 8-bit state)
    for t < T:  delta_t = softplus?(dt[b, t] + dt_bias)
                h = exp(A delta_t) h + delta_t x[b, t] (x) B[b, t, g(h)]
                out[b, t] = (C[b, t, g(h)] . h + D x[b, t]) * silu(z[b, t])
    old_x[s] = x[b];   old_B[s, 1-r], old_dt[s, 1-r], old_cumAdt[s, 1-r] = the new tokens' B, delta, running A.delta
    cache_buf_idx[s] = 1 - r

A row whose slot is ``pad_slot_id`` gets ``out = 0`` and writes nothing. The recurrence update
(:func:`step`), the readout (:func:`readout`), the step size (:func:`step_size`), the 8-bit
requantization (:func:`quantize`) and its noise (:func:`uniform_noise`) are each written once
here and used by the kernel body and by the reference alike.

**The closed form.** ``old_cumAdt`` holds the running sum of ``A.delta`` over the cached tokens
(``cum[j] = sum_{i <= j} A delta_i``), so the replay is also
``h_K = exp(cum[K-1]) h_0 + sum_{j<K} exp(cum[K-1] - cum[j]) delta_j x_j (x) B_j``: one
``(dim x K) @ (K x dstate)`` product per head (:func:`replay_closed_form`). The kernel replays with
the masked token loop (:func:`replay_loop` in the reference), which needs no dot of 16 or more
along K; tests show that the two agree.

**Per-channel variant** (Mamba-1 as ``nheads=1, dim=d_inner``): ``A (nheads, dim, dstate)``, ``dt
(batch, T, nheads, dim)``, ``dt_bias (nheads, dim)``, and ``old_dt, old_cumAdt (S, 2, nheads, dim,
T)``. ``A.delta`` then has a dstate axis a cache of this shape cannot hold, so in this variant
``old_cumAdt`` holds the running sum of ``delta`` per channel, and the closed form multiplies by ``A``:
``exp(A[h, d, n] (cum[K-1] - cum[j]))``.

**Packed layout.** With ``cu_seqlens (N+1,)``, the new tokens are packed as ``(1, total_tokens,
...)``; sequence ``i`` holds tokens ``cu_seqlens[i] : cu_seqlens[i+1]`` (``T_i`` of them, ``T_i <=
max_seqlen <= `` the caches' ``T``). The caches keep the layout above. Cache entries ``t >= T_i``
are written as *neutral* tokens (``x = 0, B = 0, delta = 0``, ``old_cumAdt`` held at its last
value), so replaying them is the identity: the next call's ``K`` must be ``<= T_i``, and a larger
``K`` replays exactly the ``T_i`` real tokens. The same holds in the padded layout when ``T`` is
smaller than the caches' ``T``. Tokens of ``x`` outside every sequence get ``out = 0``.

**8-bit state.** An int8 or float8_e4m3fn state is dequantized on read, ``h = q * state_scale``
(one float32 scale per slot, head and channel). On write it is requantized with fresh scales:
``amax`` over dstate, ``q = round(h * qmax / amax)`` with ``qmax`` 127 (int8) or 448 (float8), and
``state_scale = amax / qmax`` (a row with ``amax = 0`` stores zeros). Rounding is to nearest
(int8: half up; float8: the cast's round-to-nearest-even) unless ``rand_seed`` (a JAX PRNG key)
is given: then it is stochastic and unbiased, ``floor(v / ulp(v) + u) * ulp(v)`` with ``u``
uniform in ``[0, 1)``, drawn by a counter-based hash (:func:`uniform_noise`) of the two words
``jax.random.bits(rand_seed)`` and the element's position in the state, in the kernel and in the
reference alike (no noise array is read from memory).

**Validation.** Shapes and dtypes are checked at every call; on concrete arrays (outside
``jax.jit``) also the values: slots in range and distinct, ``0 <= K <= T``, ``cache_buf_idx`` in
{0, 1}, ``cu_seqlens`` starting at 0, non-decreasing, within ``x``, and ``T_i <= max_seqlen``.
Under ``jax.jit`` these values cannot be checked: ``K`` is clipped to ``[0, T]``, a nonzero
``cache_buf_idx`` reads buffer 1, ``T_i`` is clipped to ``[0, max_seqlen]`` (later tokens of a
longer sequence are neither run nor cached and get ``out = 0``), and an out-of-range or repeated
slot is undefined behaviour (as in FlashInfer).

:func:`checkpointing_ssu` is the one dispatch point: the Pallas kernel (:func:`kernel`) or the
pure-JAX :func:`reference`, as :mod:`pallas_kernels.dispatch` decides. The kernel updates the
state, the caches and the scales in place (``input_output_aliases``); under a ``jax.jit`` that
donates them, no copy is made.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import dispatch
from pallas_kernels import kernel_math as km

OP = "checkpointing_ssu"
#: full-scale value of each 8-bit state dtype
QMAX = {jnp.dtype(jnp.int8): 127.0, jnp.dtype(jnp.float8_e4m3fn): 448.0}
STATE_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)) + tuple(QMAX)
_KERNEL_FLOATS = tuple(jnp.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))
#: longest cache the kernel unrolls (replay and new-token loops, one body per token)
MAX_KERNEL_T = 64


class SSUCaches(NamedTuple):
    """What :func:`checkpointing_ssu` updates, under the names of its arguments (``state_scale``
    is None for a floating-point state)."""

    state: jax.Array
    old_x: jax.Array
    old_B: jax.Array
    old_dt: jax.Array
    old_cumAdt: jax.Array
    cache_buf_idx: jax.Array
    state_scale: Optional[jax.Array]


# ---------------------------------------------------------------------------------------------
# The math, written once: the kernel body and the reference both call these.


def step_size(dt, dt_bias, dt_softplus: bool):
    """``delta = dt + dt_bias`` (``dt_bias`` may be None), through softplus when ``dt_softplus``."""
    delta = dt if dt_bias is None else dt + dt_bias
    return km.softplus(delta) if dt_softplus else delta


def step(h, decay_exponent, delta_x, B):
    """One recurrence update ``exp(A.delta) h + (delta x) (x) B``.

    ``h (..., dim, dstate)``; ``decay_exponent`` (``A.delta``) broadcastable against ``h`` (a scalar
    per head, or per channel and state); ``delta_x (..., dim)``; ``B (..., dstate)``.
    """
    return jnp.exp(decay_exponent) * h + delta_x[..., :, None] * B[..., None, :]


def readout(h, C, x, D=None, z=None):
    """``(C . h + D x) * silu(z)``: ``h (..., dim, dstate)``, ``C (..., dstate)``, ``x, D, z (..., dim)``."""
    y = jnp.sum(h * C[..., None, :], axis=-1)
    if D is not None:
        y = y + D * x
    if z is not None:
        y = y * km.silu(z)
    return y


def noise_index(slot, head, channel, n, nheads: int, dim: int, dstate: int):
    """The uint32 position ``((slot * nheads + head) * dim + channel) * dstate + n`` (wrapping)."""
    u = jnp.uint32
    return ((slot.astype(u) * u(nheads) + head.astype(u)) * u(dim) + channel.astype(u)) * u(dstate) + n.astype(u)


def _fmix32(h):
    """MurmurHash3's 32-bit finalizer: every input bit affects every output bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def uniform_noise(seed0, seed1, index):
    """Uniform float32 noise in ``[0, 1)`` (24 bits) from a uint32 ``index`` and two uint32 seed words."""
    h = _fmix32(_fmix32(index ^ seed0) + seed1)
    return (h >> 8).astype(jnp.int32).astype(jnp.float32) * jnp.float32(2.0**-24)


def quantize(h, dtype, noise=None):
    """``(q, scale)``: ``h (..., dstate)`` float32 requantized to the 8-bit ``dtype`` with one scale per row.

    ``scale = amax / qmax`` over the last axis (0 where the row is 0), ``q ~ h / scale``; rounded to
    nearest, or stochastically with ``noise`` (uniform in ``[0, 1)``, shaped like ``h``).
    """
    qmax = QMAX[jnp.dtype(dtype)]
    amax = jnp.max(jnp.abs(h), axis=-1)
    nonzero = amax > 0
    factor = jnp.where(nonzero, qmax / jnp.where(nonzero, amax, 1.0), 0.0)
    v = h * factor[..., None]
    if jnp.dtype(dtype) == jnp.int8:
        q = jnp.floor(v + (0.5 if noise is None else noise))
    elif noise is None:
        q = v  # the float8 cast rounds to nearest even
    else:  # the float8 grid around v: ulp = 2^(exponent - 3), at least the subnormal step 2^-9
        bits = jax.lax.bitcast_convert_type(v, jnp.uint32)
        exponent = jnp.maximum(((bits >> 23) & jnp.uint32(0xFF)).astype(jnp.int32), 127 - 6)
        ulp = jax.lax.bitcast_convert_type(((exponent - 3) << 23).astype(jnp.uint32), jnp.float32)
        inverse_ulp = jax.lax.bitcast_convert_type(((257 - exponent) << 23).astype(jnp.uint32), jnp.float32)
        q = jnp.floor(v * inverse_ulp + noise) * ulp  # exact: powers of two
    q = jnp.clip(q, -qmax, qmax)
    return q.astype(dtype), amax / qmax


# ---------------------------------------------------------------------------------------------
# The pure-JAX reference.


def _rows(state_batch_indices, pad_slot_id, batch):
    """``(slot, valid)`` per batch row: slot 0 for padded rows; ``s = b`` without indices."""
    if state_batch_indices is None:
        return jnp.arange(batch, dtype=jnp.int32), jnp.ones((batch,), bool)
    valid = state_batch_indices != pad_slot_id
    return jnp.where(valid, state_batch_indices, 0).astype(jnp.int32), valid


def _unpack(a, cu_seqlens, max_seqlen):
    """Packed ``(1, total, ...)`` -> padded ``(N, max_seqlen, ...)`` (zeros past each ``T_i``), and the
    token index of each padded position (``total``, out of range, where there is none)."""
    total = a.shape[1]
    lengths = jnp.clip(cu_seqlens[1:] - cu_seqlens[:-1], 0, max_seqlen)
    t = jnp.arange(max_seqlen)
    on = t[None, :] < lengths[:, None]
    index = jnp.where(on, cu_seqlens[:-1, None] + t[None, :], total)
    padded = jnp.take(a[0], jnp.minimum(index, total - 1), axis=0)
    return jnp.where(on.reshape(on.shape + (1,) * (padded.ndim - 2)), padded, 0), index


def replay_loop(h, old_x, old_B, old_dt, A, K):
    """The replay as written: ``h`` through the first ``K`` cached tokens, one :func:`step` each.

    Per batch row: ``h (b, H, P, N)``, ``old_x (b, Tc, H, P)``, ``old_B (b, Tc, H, N)`` (heads'
    groups), ``old_dt (b, H, Tc)`` or per channel ``(b, H, P, Tc)``; ``A (H,)`` or ``(H, P, N)``;
    ``K (b,)``.
    """
    per_channel = A.ndim == 3
    for j in range(old_x.shape[1]):
        dt_j = jnp.where((j < K).reshape((-1,) + (1,) * (old_dt.ndim - 2)), old_dt[..., j], 0.0)
        if per_channel:
            exponent, delta_x = A * dt_j[..., None], dt_j * old_x[:, j]
        else:
            exponent, delta_x = (A * dt_j)[..., None, None], dt_j[..., None] * old_x[:, j]
        h = step(h, exponent, delta_x, old_B[:, j])
    return h


def replay_closed_form(h, old_x, old_B, old_dt, old_cumAdt, A, K):
    """The replay in closed form from the running sums (shapes of :func:`replay_loop`; ``old_cumAdt``
    like ``old_dt``): ``exp(cum[K-1]) h + sum_{j<K} exp(cum[K-1] - cum[j]) dt_j x_j (x) B_j``, with
    ``cum = A.delta`` summed per head, or ``delta`` summed per channel (then times ``A``)."""
    Tc = old_x.shape[1]
    hi = jax.lax.Precision.HIGHEST
    per_channel = A.ndim == 3
    lead = (-1,) + (1,) * (old_dt.ndim - 1)
    last = jnp.take_along_axis(old_cumAdt, jnp.broadcast_to(jnp.maximum(K - 1, 0).reshape(lead), old_cumAdt.shape[:-1] + (1,)),
                               axis=-1)
    on = jnp.arange(Tc) < K.reshape(lead)
    total = jnp.where(K.reshape(lead) > 0, last, 0.0)[..., 0]  # cum[K-1], 0 when K = 0
    since = jnp.where(on, total[..., None] - old_cumAdt, 0.0)  # cum[K-1] - cum[j]
    if not per_channel:
        coeff = jnp.where(on, jnp.exp(since) * old_dt, 0.0)  # (b, H, Tc)
        carried = jnp.einsum("bhj,bjhp,bjhn->bhpn", coeff, old_x, old_B, precision=hi)
        return jnp.exp(total)[..., None, None] * h + carried  # cum holds A.delta
    decay = jnp.exp(A[None, :, :, None, :] * since[..., None])  # (b, H, P, Tc, N)
    weight = jnp.where(on, old_dt * jnp.moveaxis(old_x, 1, -1), 0.0)  # (b, H, P, Tc)
    carried = jnp.sum(decay * weight[..., None] * jnp.moveaxis(old_B, 1, 2)[:, :, None], axis=-2)
    return jnp.exp(A * total[..., None]) * h + carried


def _scatter(buffer, rows, slot, valid, *lead):
    """``buffer`` with ``rows[b]`` at ``[slot[b], *lead[b]]`` where ``valid[b]`` (other rows dropped)."""
    target = jnp.where(valid, slot, buffer.shape[0])
    return buffer.at[(target, *lead)].set(rows.astype(buffer.dtype), mode="drop")


def reference(state, old_x, old_B, old_dt, old_cumAdt, cache_buf_idx, prev_num_accepted_tokens, x, dt, A, B, C, *,
              D=None, z=None, dt_bias=None, dt_softplus=False, state_batch_indices=None, pad_slot_id=-1,
              state_scale=None, noise_seed=None, cu_seqlens=None, max_seqlen=None, closed_form=False):
    """The op in pure JAX, following the steps of the module docstring literally.

    Arguments as :func:`checkpointing_ssu` (validated), except ``noise_seed``: None or the two
    uint32 words of the stochastic rounding, and ``max_seqlen``: an int when ``cu_seqlens`` is
    given. ``closed_form`` replays with :func:`replay_closed_form` instead of the token loop.
    Computes in float32 (float64 for float64 inputs). Returns ``(out, SSUCaches)``.
    """
    f = jnp.promote_types(jnp.result_type(x, dt, A, B, C), jnp.float32)
    S, H, P, N = state.shape
    Tc = old_x.shape[1]
    rep = H // B.shape[-2]
    per_channel = A.ndim == 3
    total = x.shape[1]
    if cu_seqlens is not None:
        (x, dt, B, C), index = zip(*(_unpack(a, cu_seqlens, max_seqlen) for a in (x, dt, B, C)))
        index = index[0]
        z = None if z is None else _unpack(z, cu_seqlens, max_seqlen)[0]
        lengths = jnp.clip(cu_seqlens[1:] - cu_seqlens[:-1], 0, max_seqlen)
    batch, T = x.shape[:2]
    on = jnp.ones((batch, T), bool) if cu_seqlens is None else jnp.arange(T)[None, :] < lengths[:, None]
    slot, valid = _rows(state_batch_indices, pad_slot_id, batch)
    r = (cache_buf_idx[slot] != 0).astype(jnp.int32)
    K = jnp.clip(prev_num_accepted_tokens[slot], 0, Tc)
    heads = lambda a: jnp.repeat(a.astype(f), rep, axis=-2)  # (..., G, N) -> (..., H, N)
    A = A.astype(f)

    # 1. replay onto the dequantized checkpoint
    h = state[slot].astype(f)
    if state_scale is not None:
        h = h * state_scale[slot][..., None].astype(f)
    replay_args = (h, old_x[slot].astype(f), heads(old_B[slot, r]), old_dt[slot, r].astype(f))
    if closed_form:
        h = replay_closed_form(*replay_args, old_cumAdt[slot, r].astype(f), A, K)
    else:
        h = replay_loop(*replay_args, A, K)
    committed = h

    # 2. the new tokens
    bias = None if dt_bias is None else dt_bias.astype(f)
    per_token = lambda a: jnp.where(on.reshape(on.shape + (1,) * (a.ndim - 2)), a, 0.0)
    delta = per_token(step_size(dt.astype(f), bias, dt_softplus))  # (b, T, H) or (b, T, H, P)
    xf, Bh, Ch = x.astype(f), heads(B), heads(C)
    Dh = None if D is None else jnp.broadcast_to(D.astype(f).reshape(H, -1), (H, P))
    ys = []
    for t in range(T):
        if per_channel:
            exponent, delta_x = A * delta[:, t, ..., None], delta[:, t] * xf[:, t]
        else:
            exponent, delta_x = (A * delta[:, t])[..., None, None], delta[:, t, :, None] * xf[:, t]
        h = step(h, exponent, delta_x, Bh[:, t])
        ys.append(readout(h, Ch[:, t], xf[:, t], Dh, None if z is None else z[:, t].astype(f)))
    y = jnp.where(valid[:, None, None, None] & on[:, :, None, None], jnp.stack(ys, axis=1), 0.0).astype(x.dtype)
    if cu_seqlens is not None:
        y = jnp.zeros((1, total, H, P), y.dtype).at[0, index].set(y, mode="drop")

    # 3. the writes: the replayed state, and the new tokens (neutral past T_i or T) into buffer 1 - r
    extra = Tc - T
    new_delta = jnp.pad(delta, [(0, 0), (0, extra)] + [(0, 0)] * (delta.ndim - 2))
    running = jnp.cumsum(new_delta if per_channel else A * new_delta, axis=1)  # held past the last token
    to_cache = lambda a: jnp.moveaxis(a, 1, -1)  # (b, Tc, H[, P]) -> (b, H[, P], Tc)
    new_x = jnp.pad(per_token(xf), [(0, 0), (0, extra), (0, 0), (0, 0)])
    new_B = jnp.pad(per_token(B.astype(f)), [(0, 0), (0, extra), (0, 0), (0, 0)])
    if state_scale is None:
        new_state, new_scale = _scatter(state, committed, slot, valid), None
    else:
        noise = None
        if noise_seed is not None:
            index = noise_index(slot[:, None, None, None], jnp.arange(H)[None, :, None, None], jnp.arange(P)[None, None, :, None],
                                jnp.arange(N)[None, None, None, :], H, P, N)
            noise = uniform_noise(noise_seed[0], noise_seed[1], index)
        q, scale = quantize(committed.astype(jnp.float32), state.dtype, noise)
        new_state, new_scale = _scatter(state, q, slot, valid), _scatter(state_scale, scale, slot, valid)
    caches = SSUCaches(
        state=new_state,
        old_x=_scatter(old_x, new_x, slot, valid),
        old_B=_scatter(old_B, new_B, slot, valid, 1 - r),
        old_dt=_scatter(old_dt, to_cache(new_delta), slot, valid, 1 - r),
        old_cumAdt=_scatter(old_cumAdt, to_cache(running), slot, valid, 1 - r),
        cache_buf_idx=_scatter(cache_buf_idx, 1 - r, slot, valid),
        state_scale=new_scale,
    )
    return y, caches



# ---------------------------------------------------------------------------------------------
# The Pallas kernel.


def kernel(state, old_x, old_B, old_dt, old_cumAdt, cache_buf_idx, prev_num_accepted_tokens, x, dt, A, B, C, *,
           D=None, z=None, dt_bias=None, dt_softplus=False, state_batch_indices=None, pad_slot_id=-1,
           state_scale=None, noise_seed=None, cu_seqlens=None, max_seqlen=None,
           config: Optional[dispatch.KernelConfig] = None):
    """The Pallas kernel; same contract as :func:`reference`.

    Grid ``(batch, nheads, cdiv(dim, BLOCK_D))``: each program owns a ``(BLOCK_D, BLOCK_N)`` tile
    of one slot's state (``BLOCK_N`` = ``dstate`` rounded up to a power of two, ``BLOCK_D *
    BLOCK_N ~ config.block_elems``). It reads the tile once, replays the cached tokens with a
    masked loop (a token ``j >= K`` is loaded as the neutral token), writes the tile once, then
    runs the new tokens (unrolled) and writes their outputs and cache entries. ``old_B`` (one row
    per group) is written by the group's first head and ``old_dt``/``old_cumAdt`` of the per-head
    variant by the head's first channel block; ``cache_buf_idx`` by the row's first program, from
    a copy gathered before the kernel so that no program reads it after another wrote it. Every
    cache array is aliased to its output (``input_output_aliases``).
    """
    config = dispatch.resolve(config)
    pl, plgpu = dispatch.pallas_modules()
    interpret = dispatch.interpret_mode(config)
    S, H, P, N = state.shape
    Tc = old_x.shape[1]
    rep = H // B.shape[-2]
    per_channel = A.ndim == 3
    packed = cu_seqlens is not None
    quantized = state_scale is not None
    if packed:
        batch, T, total = cu_seqlens.shape[0] - 1, max_seqlen, x.shape[1]
        flat = lambda a: a[0]
    else:
        batch, T = x.shape[:2]
        total = batch * T
        flat = lambda a: a.reshape((total,) + a.shape[2:])
    block_n = dispatch.next_power_of_two(N)
    block_d = min(dispatch.next_power_of_two(P), max(1, config.block_elems // block_n))
    slot, valid = _rows(state_batch_indices, pad_slot_id, batch)
    f32 = jnp.float32

    aliased = dict(state=state, old_x=old_x, old_B=old_B, old_dt=old_dt, old_cumAdt=old_cumAdt, cache_buf_idx=cache_buf_idx)
    if quantized:
        aliased["state_scale"] = state_scale
    if packed:  # tokens outside every sequence keep these zeros
        aliased["out"] = jnp.zeros((total, H, P), x.dtype)
    inputs = dict(aliased)
    inputs.update(
        rows=jnp.where(valid, slot, -1).astype(jnp.int32),
        buf=(cache_buf_idx[slot] != 0).astype(jnp.int32),
        K=jnp.clip(prev_num_accepted_tokens[slot], 0, Tc).astype(jnp.int32),
        x=flat(x), dt=flat(dt), A=A, B=flat(B), C=flat(C),
    )
    optional = dict(D=None if D is None else jnp.broadcast_to(D.reshape(H, -1), (H, P)), z=None if z is None else flat(z),
                    dt_bias=dt_bias, seed=noise_seed if quantized else None, cu=cu_seqlens)
    inputs.update({k: v for k, v in optional.items() if v is not None})
    names = list(inputs)
    out_names = ["out", "state", "old_x", "old_B", "old_dt", "old_cumAdt", "cache_buf_idx"] + (["state_scale"] if quantized else [])
    out_shape = [jax.ShapeDtypeStruct((total, H, P), x.dtype)] + [
        jax.ShapeDtypeStruct(aliased[k].shape, aliased[k].dtype) for k in out_names[1:]
    ]
    aliases = {names.index(k): out_names.index(k) for k in aliased}

    def body(*refs):
        ref = dict(zip(names, refs[: len(names)]))
        out = dict(zip(out_names, refs[len(names):]))
        b, head, block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        group = head // rep
        channel = block * block_d + jnp.arange(block_d)
        d_ok = channel < P
        n_ok = jnp.arange(block_n) < N
        tile_ok = d_ok[:, None] & n_ok[None, :]
        rows, cols = pl.ds(block * block_d, block_d), pl.ds(0, block_n)
        s = ref["rows"][b]
        row_ok = s >= 0
        s = jnp.maximum(s, 0)
        r, k = ref["buf"][b], ref["K"][b]
        w = 1 - r
        if packed:
            start = ref["cu"][b]
            length = jnp.clip(ref["cu"][b + 1] - start, 0, T)
        else:
            start = b * T

        def load(view, mask, shape_ok):
            other = 0 if jnp.issubdtype(view.dtype, jnp.integer) else 0.0  # an int would not cast to float8
            return plgpu.load(view, mask=shape_ok if mask is True else shape_ok & mask, other=other).astype(f32)

        def along_d(name, *lead, mask=True):  # a (BLOCK_D,) vector of channels
            return load(ref[name].at[(*lead, rows)], mask, d_ok)

        def along_n(name, *lead, mask=True):  # a (BLOCK_N,) vector along dstate
            return load(ref[name].at[(*lead, cols)], mask, n_ok)

        if per_channel:
            A_tile = load(ref["A"].at[head, rows, cols], True, tile_ok)
        else:
            A_head = ref["A"][head].astype(f32)
        h = load(ref["state"].at[s, head, rows, cols], True, tile_ok)
        if quantized:
            h = h * along_d("state_scale", s, head)[:, None]

        # 1. replay the first K cached tokens of buffer r (later ones load as the neutral token)
        for j in map(jnp.int32, range(Tc)):  # static positions, as int32 scalars (refs take no Python ints)
            on = j < k
            x_j = along_d("old_x", s, j, head, mask=on)
            B_j = along_n("old_B", s, r, j, group, mask=on)
            if per_channel:
                dt_j = load(ref["old_dt"].at[s, r, head, rows, j], on, d_ok)
                h = step(h, A_tile * dt_j[:, None], dt_j * x_j, B_j)
            else:
                dt_j = jnp.where(on, ref["old_dt"][s, r, head, j], 0.0)
                h = step(h, A_head * dt_j, dt_j * x_j, B_j)
        if not interpret:  # every program's reads of old_x before any of its writes (other warps' elements)
            plgpu.debug_barrier()
        h = jnp.where(tile_ok, h, 0.0)
        state_ok = tile_ok & row_ok
        if quantized:
            noise = None
            if "seed" in ref:
                index = noise_index(s, head, channel[:, None], jnp.arange(block_n)[None, :], H, P, N)
                noise = uniform_noise(ref["seed"][0], ref["seed"][1], index)
            q, scale = quantize(h, state.dtype, noise)
            plgpu.store(out["state"].at[s, head, rows, cols], q, mask=state_ok)
            plgpu.store(out["state_scale"].at[s, head, rows], scale, mask=d_ok & row_ok)
        else:
            plgpu.store(out["state"].at[s, head, rows, cols], h.astype(state.dtype), mask=state_ok)

        # 2. the new tokens, and 3. their cache entries (neutral past the row's length)
        first_block = block == 0
        if "dt_bias" in ref:
            bias = along_d("dt_bias", head) if per_channel else ref["dt_bias"][head].astype(f32)
        else:
            bias = None
        D_row = along_d("D", head) if "D" in ref else None
        running = jnp.zeros((block_d,), f32) if per_channel else jnp.float32(0.0)
        for position in range(Tc):
            t = jnp.int32(position)
            if position < T:
                on = (t < length) if packed else True
                token = jnp.minimum(start + t, total - 1) if packed else start + t
                x_t = along_d("x", token, head, mask=on)
                B_t = along_n("B", token, group, mask=on)
                C_t = along_n("C", token, group, mask=on)
                if per_channel:
                    delta = jnp.where(on, step_size(along_d("dt", token, head), bias, dt_softplus), 0.0)
                    exponent = A_tile * delta[:, None]
                    running = running + delta
                else:
                    delta = jnp.where(on, step_size(ref["dt"][token, head].astype(f32), bias, dt_softplus), 0.0)
                    exponent = A_head * delta
                    running = running + exponent
                h = step(h, exponent, delta * x_t, B_t)
                y = readout(h, C_t, x_t, D_row, along_d("z", token, head, mask=on) if "z" in ref else None)
                y = jnp.where(row_ok, y, 0.0)
                plgpu.store(out["out"].at[token, head, rows], y.astype(x.dtype), mask=d_ok if on is True else d_ok & on)
            else:
                x_t, B_t = jnp.zeros((block_d,), f32), jnp.zeros((block_n,), f32)
                delta = jnp.zeros((block_d,), f32) if per_channel else jnp.float32(0.0)
            plgpu.store(out["old_x"].at[s, t, head, rows], x_t.astype(old_x.dtype), mask=d_ok & row_ok)
            plgpu.store(out["old_B"].at[s, w, t, group, cols], B_t.astype(old_B.dtype),
                        mask=n_ok & row_ok & first_block & (head % rep == 0))
            if per_channel:
                plgpu.store(out["old_dt"].at[s, w, head, rows, t], delta, mask=d_ok & row_ok)
                plgpu.store(out["old_cumAdt"].at[s, w, head, rows, t], running, mask=d_ok & row_ok)
            else:
                plgpu.store(out["old_dt"].at[s, w, head, t], delta, mask=row_ok & first_block)
                plgpu.store(out["old_cumAdt"].at[s, w, head, t], running, mask=row_ok & first_block)
        plgpu.store(out["cache_buf_idx"].at[s], w, mask=row_ok & first_block & (head == 0))

    call = pl.pallas_call(
        body,
        out_shape=out_shape,
        grid=(batch, H, pl.cdiv(P, block_d)),
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=dispatch.compiler_params(config),
        name=OP,
    )
    results = dict(zip(out_names, call(*inputs.values())))
    y = results["out"].reshape((1, total, H, P) if packed else (batch, T, H, P))
    return y, SSUCaches(*(results.get(k) for k in SSUCaches._fields))


# ---------------------------------------------------------------------------------------------
# Dispatch and validation.


def unsupported_reason(state, old_x, old_B, old_dt, old_cumAdt, x, dt, A, B, C, D, z, dt_bias) -> Optional[str]:
    """Why the kernel cannot take these (validated) arguments, or None."""
    if state.dtype not in _KERNEL_FLOATS + tuple(QMAX):
        return f"state of dtype {state.dtype} (supported: float32, bfloat16, float16, int8, float8_e4m3fn)"
    for name, a in (("old_x", old_x), ("old_B", old_B), ("old_dt", old_dt), ("old_cumAdt", old_cumAdt), ("x", x),
                    ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("dt_bias", dt_bias)):
        if a is not None and a.dtype not in _KERNEL_FLOATS:
            return f"{name} of dtype {a.dtype} (supported: float32, bfloat16, float16)"
    if max(a.size for a in (state, old_x, old_B, old_dt, x)) >= 2**31:
        return "arrays of 2**31 elements or more (32-bit offsets)"
    if dispatch.next_power_of_two(state.shape[-1]) > 4096:
        return f"dstate={state.shape[-1]} > 4096"
    if old_x.shape[1] > MAX_KERNEL_T:
        return f"caches of T={old_x.shape[1]} > {MAX_KERNEL_T} tokens (the kernel unrolls its token loops)"
    return None


def slower_than_reference(batch: int) -> Optional[str]:
    """Why ``"auto"`` keeps the reference although the kernel supports the call, or None.

    None: the kernel reads and writes each state tile once, where the reference gathers the slots'
    states, runs the replay and the new tokens as separate XLA ops and scatters the result back.
    benchmarks/benchmark_ssu.py measures both; no GPU measurement has changed this policy yet.
    """
    del batch
    return None


def checkpointing_ssu(
    state, old_x, old_B, old_dt, old_cumAdt, cache_buf_idx, prev_num_accepted_tokens, x, dt, A, B, C, *,
    D=None, z=None, dt_bias=None, dt_softplus: bool = False, state_batch_indices=None, pad_slot_id: int = -1,
    state_scale=None, rand_seed=None, cu_seqlens=None, max_seqlen: Optional[int] = None,
    config: Optional[dispatch.KernelConfig] = None,
):
    """The verify step of speculative decoding with checkpointed replay (see the module docstring).

    Args (``S`` slots, ``T`` tokens per call, as FlashInfer):
      state: ``(S, nheads, dim, dstate)``: float32, bfloat16, float16, int8 or float8_e4m3fn
        (float64 runs the reference).
      old_x: ``(S, T, nheads, dim)``, the previous call's tokens.
      old_B: ``(S, 2, T, ngroups, dstate)``, double-buffered.
      old_dt, old_cumAdt: ``(S, 2, nheads, T)`` float32, double-buffered (the processed steps and
        their running ``A.delta``); ``(S, 2, nheads, dim, T)`` in the per-channel variant (running
        ``delta``).
      cache_buf_idx, prev_num_accepted_tokens: ``(S,)`` integers: the buffer to replay and how many
        of its tokens (``K``, ``0 <= K <= T``).
      x, z: ``(batch, T', nheads, dim)`` with ``T' <= T``; packed: ``(1, total_tokens, nheads, dim)``.
      dt: ``(batch, T', nheads)``, or ``(batch, T', nheads, dim)`` per channel.
      A: ``(nheads,)``, or ``(nheads, dim, dstate)`` per channel (real, negative for a stable SSM).
      B, C: ``(batch, T', ngroups, dstate)``; ``nheads % ngroups == 0``.
      D: ``(nheads,)`` or ``(nheads, dim)``; dt_bias: ``(nheads,)``, or ``(nheads, dim)`` per channel.
      dt_softplus: apply softplus to ``dt + dt_bias``.
      state_batch_indices: optional ``(batch,)`` integers, distinct slots or ``pad_slot_id``.
      state_scale: ``(S, nheads, dim)`` float32, with (and only with) an 8-bit state.
      rand_seed: a JAX PRNG key: stochastic rounding of an 8-bit state (ignored otherwise). The noise is a
        function of the key and the element's position only: pass a fresh key to every call.
      cu_seqlens: ``(N+1,)`` integers: the packed layout of ``N`` sequences.
      max_seqlen: the longest ``T_i`` (static); default: from concrete ``cu_seqlens``, else ``T``.
        Used only with ``cu_seqlens``.
      config: a :class:`~pallas_kernels.dispatch.KernelConfig`; the default when None.

    Returns:
      ``(out, caches)``: ``out`` shaped like ``x`` in ``x.dtype``; ``caches`` a :class:`SSUCaches`
      with the new ``state``, ``old_x``, ``old_B``, ``old_dt``, ``old_cumAdt``, ``cache_buf_idx`` and
      ``state_scale``, each like its argument (``state_scale`` None for a floating-point state).
    """
    args, max_seqlen = _check(state, old_x, old_B, old_dt, old_cumAdt, cache_buf_idx, prev_num_accepted_tokens, x, dt, A,
                              B, C, D, z, dt_bias, state_batch_indices, pad_slot_id, state_scale, rand_seed, cu_seqlens,
                              max_seqlen)
    config = dispatch.resolve(config)
    names = ("state", "old_x", "old_B", "old_dt", "old_cumAdt", "x", "dt", "A", "B", "C", "D", "z", "dt_bias")
    reason = unsupported_reason(*(args[k] for k in names))
    batch = args["x"].shape[0] if cu_seqlens is None else args["cu_seqlens"].shape[0] - 1
    split_reason = unsplit_reason(args)
    if not dispatch.choose_kernel(OP, reason, config, slower_than_reference(batch),
                                  batch=None if split_reason else batch, split_reason=split_reason):
        config = None  # the reference: one compiled program whatever the configuration
    if args["state_scale"] is None:
        args["rand_seed"] = None
    return _ssu(**args, dt_softplus=bool(dt_softplus), pad_slot_id=int(pad_slot_id), max_seqlen=max_seqlen, config=config)


@functools.partial(jax.jit, static_argnames=("dt_softplus", "pad_slot_id", "max_seqlen", "config"))
def _ssu(state, old_x, old_B, old_dt, old_cumAdt, cache_buf_idx, prev_num_accepted_tokens, x, dt, A, B, C, D, z, dt_bias,
         state_batch_indices, state_scale, rand_seed, cu_seqlens, *, dt_softplus, pad_slot_id, max_seqlen, config):
    """The seed words, then :func:`kernel` (``config`` given) or :func:`reference` (None)."""
    noise_seed = None if rand_seed is None else jax.random.bits(rand_seed, (2,), jnp.uint32)
    options = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, state_batch_indices=state_batch_indices,
                   pad_slot_id=pad_slot_id, state_scale=state_scale, noise_seed=noise_seed, cu_seqlens=cu_seqlens,
                   max_seqlen=max_seqlen)
    arrays = (state, old_x, old_B, old_dt, old_cumAdt, cache_buf_idx, prev_num_accepted_tokens, x, dt, A, B, C)
    if config is None:
        return reference(*arrays, **options)

    # per shard under a data-parallel mesh: only calls that split by rows get there (unsplit_reason)
    names = ("state", "old_x", "old_B", "old_dt", "old_cumAdt", "cache_buf_idx", "prev_num_accepted_tokens", "x", "dt",
             "A", "B", "C")
    per_row = dict(zip(names, arrays), z=z, state_scale=state_scale, state_batch_indices=state_batch_indices)
    whole = dict(A=per_row.pop("A"), D=D, dt_bias=dt_bias, noise_seed=noise_seed, cu_seqlens=cu_seqlens)
    static = dict(dt_softplus=dt_softplus, pad_slot_id=pad_slot_id, max_seqlen=max_seqlen, config=config)
    return dispatch.per_shard(lambda rows, params: kernel(**rows, **params, **static), (per_row, whole), (0, None), 0)


def unsplit_reason(args: dict) -> Optional[str]:
    """Why a call (its checked arguments by name) cannot be split by rows over a data-parallel mesh, or None."""
    if args["state_batch_indices"] is not None:
        return dispatch.SLOTS_SPLIT_REASON
    if args["cu_seqlens"] is not None:
        return "the packed layout (cu_seqlens: every sequence's tokens in one row of x)"
    if args["rand_seed"] is not None and args["state_scale"] is not None:
        return "stochastic rounding (rand_seed: the noise is a function of each element's position in the whole state)"
    return None


def _concrete(a):
    """``a`` as a NumPy array, or None inside a trace."""
    return None if a is None or isinstance(a, jax.core.Tracer) else np.asarray(a)


def _check(state, old_x, old_B, old_dt, old_cumAdt, cache_buf_idx, prev_num_accepted_tokens, x, dt, A, B, C, D, z, dt_bias,
           state_batch_indices, pad_slot_id, state_scale, rand_seed, cu_seqlens, max_seqlen):
    """Validate the arguments; returns ``(arrays by name, max_seqlen)``."""
    names = ("state", "old_x", "old_B", "old_dt", "old_cumAdt", "cache_buf_idx", "prev_num_accepted_tokens", "x", "dt", "A",
             "B", "C", "D", "z", "dt_bias", "state_batch_indices", "state_scale", "cu_seqlens")
    values = (state, old_x, old_B, old_dt, old_cumAdt, cache_buf_idx, prev_num_accepted_tokens, x, dt, A, B, C, D, z, dt_bias,
              state_batch_indices, state_scale, cu_seqlens)
    a = {k: None if v is None else jnp.asarray(v) for k, v in zip(names, values)}

    # dtypes
    if a["state"].dtype not in STATE_DTYPES:
        raise TypeError(f"state must be float32, bfloat16, float16, float64, int8 or float8_e4m3fn, got {a['state'].dtype}")
    for k in ("old_x", "old_B", "old_dt", "old_cumAdt", "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "state_scale"):
        if a[k] is not None and not jnp.issubdtype(a[k].dtype, jnp.floating):
            raise TypeError(f"{k} must have a real floating dtype, got {a[k].dtype}")
    for k in ("old_dt", "old_cumAdt", "state_scale"):
        if a[k] is not None and a[k].dtype not in (jnp.float32, jnp.float64):
            raise TypeError(f"{k} must be float32, got {a[k].dtype}")
    for k in ("cache_buf_idx", "prev_num_accepted_tokens", "state_batch_indices", "cu_seqlens"):
        if a[k] is not None:
            if not jnp.issubdtype(a[k].dtype, jnp.integer):
                raise TypeError(f"{k} must have an integer dtype (int32), got {a[k].dtype}")
            a[k] = a[k].astype(jnp.int32)

    # shapes
    if a["state"].ndim != 4:
        raise ValueError(f"state must have shape (S, nheads, dim, dstate), got {a['state'].shape}")
    S, H, P, N = a["state"].shape
    _expect("old_x", a["old_x"], (S, None, H, P), "(S, T, nheads, dim)")
    Tc = a["old_x"].shape[1]
    packed = a["cu_seqlens"] is not None
    x = a["x"]
    if x.ndim != 4 or x.shape[2:] != (H, P) or (packed and x.shape[0] != 1):
        layout, lead = ("(1, total_tokens, nheads, dim)", 1) if packed else ("(batch, T, nheads, dim)", "batch")
        raise ValueError(f"x must have shape {layout} = ({lead}, {'total_tokens' if packed else 'T'}, {H}, {P}), got {x.shape}")
    lead = x.shape[:2]
    if not packed and lead[1] > Tc:
        raise ValueError(f"x has T={lead[1]} tokens per row, more than the caches hold: x must have shape "
                         f"(batch, T, nheads, dim) with T <= {Tc} (old_x has shape {a['old_x'].shape}), got {x.shape}")
    _expect("z", a["z"], (*lead, H, P), "like x")
    if a["B"].ndim != 4:
        raise ValueError(f"B must have shape (batch, T, ngroups, dstate) = ({lead[0]}, {lead[1]}, ngroups, {N}), got {a['B'].shape}")
    G = a["B"].shape[2]
    for k in ("B", "C"):
        _expect(k, a[k], (*lead, G, N), "(batch, T, ngroups, dstate)")
    if G == 0 or H % G:
        raise ValueError(f"nheads={H} (state {a['state'].shape}) must be a multiple of ngroups={G} (B of shape {a['B'].shape})")
    _expect("old_B", a["old_B"], (S, 2, Tc, G, N), "(S, 2, T, ngroups, dstate)")
    per_channel = a["A"].ndim == 3
    if per_channel:
        _expect("A", a["A"], (H, P, N), "(nheads, dim, dstate)")
        _expect("dt", a["dt"], (*lead, H, P), "(batch, T, nheads, dim) with a per-channel A")
        _expect("dt_bias", a["dt_bias"], (H, P), "(nheads, dim) with a per-channel A")
        for k in ("old_dt", "old_cumAdt"):
            _expect(k, a[k], (S, 2, H, P, Tc), "(S, 2, nheads, dim, T) with a per-channel A")
    else:
        if a["A"].shape != (H,):
            raise ValueError(f"A must have shape (nheads,) = ({H},) or (nheads, dim, dstate) = ({H}, {P}, {N}), got {a['A'].shape}")
        _expect("dt", a["dt"], (*lead, H), "(batch, T, nheads) with A of shape (nheads,)")
        _expect("dt_bias", a["dt_bias"], (H,), "(nheads,)")
        for k in ("old_dt", "old_cumAdt"):
            _expect(k, a[k], (S, 2, H, Tc), "(S, 2, nheads, T)")
    if a["D"] is not None and a["D"].shape not in ((H,), (H, P)):
        raise ValueError(f"D must have shape (nheads,) = ({H},) or (nheads, dim) = ({H}, {P}), got {a['D'].shape}")
    for k in ("cache_buf_idx", "prev_num_accepted_tokens"):
        _expect(k, a[k], (S,), "(S,)")
    quantized = a["state"].dtype in QMAX
    if quantized:
        if a["state_scale"] is None:
            raise ValueError(f"an {a['state'].dtype} state needs state_scale of shape (S, nheads, dim) = ({S}, {H}, {P})")
        _expect("state_scale", a["state_scale"], (S, H, P), "(S, nheads, dim)")
    elif a["state_scale"] is not None:
        raise ValueError(f"state_scale is for an int8 or float8_e4m3fn state; got a {a['state'].dtype} state")
    if rand_seed is not None and quantized:
        key = jnp.asarray(rand_seed) if not isinstance(rand_seed, jax.Array) else rand_seed
        typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        if not (typed and key.shape == ()) and not (key.dtype == jnp.uint32 and key.shape == (2,)):
            raise ValueError(f"rand_seed must be one PRNG key (jax.random.key or a uint32 (2,) key), got {key.dtype}{key.shape}")

    # rows, slots and sequences
    if packed:
        cu = a["cu_seqlens"]
        if cu.ndim != 1 or cu.shape[0] < 2:
            raise ValueError(f"cu_seqlens must have shape (N+1,) with N >= 1, got {cu.shape}")
        batch = cu.shape[0] - 1
        cu_np = _concrete(cu)
        if cu_np is not None:
            if cu_np[0] != 0 or np.any(np.diff(cu_np) < 0) or cu_np[-1] > lead[1]:
                raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing up to at most total_tokens={lead[1]} "
                                 f"(x of shape {x.shape}), got {cu_np.tolist()}")
            seqlens = np.diff(cu_np)
            if max_seqlen is None:
                max_seqlen = max(int(seqlens.max()), 1)
            elif seqlens.max() > max_seqlen:
                i = int(np.argmax(seqlens))
                raise ValueError(f"cu_seqlens: sequence {i} has T_{i}={int(seqlens[i])} tokens, more than "
                                 f"max_seqlen={max_seqlen} (cu_seqlens {cu_np.tolist()})")
        elif max_seqlen is None:
            max_seqlen = Tc
        max_seqlen = int(max_seqlen)
        if not 1 <= max_seqlen <= Tc:
            raise ValueError(f"max_seqlen={max_seqlen} must be in [1, T] with the caches' T={Tc} (old_x of shape "
                             f"{a['old_x'].shape}): a sequence may not have more tokens than the caches hold")
    else:
        batch, max_seqlen = lead[0], None
    sbi = a["state_batch_indices"]
    if sbi is not None:
        if sbi.shape != (batch,):
            raise ValueError(f"state_batch_indices must have shape (batch,) = ({batch},), got {sbi.shape}")
    elif S != batch:
        raise ValueError(f"state has {S} slots (shape {a['state'].shape}) but there are {batch} rows: pass "
                         f"state_batch_indices of shape ({batch},) to map rows to slots")
    sbi_np = np.arange(batch) if sbi is None else _concrete(sbi)
    if sbi_np is not None:
        used = sbi_np[sbi_np != pad_slot_id]
        bad = (used < 0) | (used >= S)
        if bad.any():
            raise ValueError(f"state_batch_indices must hold slots 0 <= s < {S} (state of shape {a['state'].shape}) or "
                             f"pad_slot_id={pad_slot_id}, got {int(used[bad][0])} in {sbi_np.tolist()}")
        if len(np.unique(used)) != len(used):
            raise ValueError(f"state_batch_indices must not repeat a slot (rows would race on it), got {sbi_np.tolist()}")
        for k, ok, expected in (("prev_num_accepted_tokens", lambda v: (v >= 0) & (v <= Tc), f"0 <= K <= T={Tc} (the caches' T)"),
                                ("cache_buf_idx", lambda v: (v == 0) | (v == 1), "0 or 1")):
            v = _concrete(a[k])
            if v is not None and not ok(v[used]).all():
                s = int(used[~ok(v[used])][0])
                raise ValueError(f"{k}[{s}] = {int(v[s])} must be {expected} (old_x of shape {a['old_x'].shape})")
    a["rand_seed"] = rand_seed
    return a, max_seqlen


def _expect(name, a, shape, layout):
    """A ``ValueError`` naming ``name``, its shape and the expected one (None: any length on that axis)."""
    if a is None:
        return
    if a.ndim != len(shape) or any(e is not None and g != e for g, e in zip(a.shape, shape)):
        expected = tuple("T" if e is None else e for e in shape)
        raise ValueError(f"{name} must have shape {layout} = {expected}, got {tuple(a.shape)}".replace("'", ""))
