"""Mamba-2's chunked SSD ("state space duality", Dao & Gu 2024, *Transformers are SSMs*, section 6) in pure JAX.

The recurrence, per head ``h`` (one scalar ``A[h] < 0`` per head; ``B_t``, ``C_t`` shared by the heads of a group)::

    S_t = exp(dt_t A) S_{t-1} + (dt_t x_t) B_t^T        S_t (headdim, N), x_t (headdim,), B_t (N,)
    y_t = S_t C_t                                        (headdim,)

is the same as the one :func:`lrnnx_jax.core.scan.chunked_scan` runs step by step (there with the state in each
channel), written as matmuls. The sequence is cut into chunks of ``Q`` steps. With ``a_t = dt_t A`` and ``cum_t``
its cumulative sum inside the chunk (so ``cum_l - cum_s`` is the log-decay from step ``s`` to step ``l``):

* inside a chunk, from a zero entering state, the output is a causal, decay-weighted quadratic form:
  ``y_l = sum_{s <= l} (C_l . B_s) exp(cum_l - cum_s) dt_s x_s``, i.e. ``((C B^T) * L) @ (dt x)`` with
  ``L[l, s] = exp(cum_l - cum_s)`` below the diagonal and ``0`` above;
* each chunk's state from a zero entering state is ``sum_s exp(cum_Q - cum_s) (dt_s x_s) B_s^T``;
* the states entering the chunks follow ``S_c = exp(cum_Q) S_{c-1} + state_c``: an associative scan over the
  (few) chunks (:func:`lrnnx_jax.core.scan.linear_scan`);
* the entering state adds ``exp(cum_l) S C_l`` to each step's output.

The segment sums are differences of cumulative sums inside one chunk, replaced by ``-inf`` above the diagonal before
``exp``: every exponent is ``<= 0`` up to rounding (``A < 0``, ``dt >= 0``), so nothing overflows and the
gradients stay finite (``exp(-inf) = 0`` has a zero derivative). This is what ``mamba_ssm``'s Triton kernels do;
the cumulative sum stays within a chunk, so its rounding is relative to one chunk's total decay.

Cost: ``O(L Q)`` per head for the quadratic part (it holds ``(batch, L / Q, nheads, Q, Q)`` decay weights) and
``O(L N headdim)`` for the states, all in batched matmuls (``einsum``). The matmuls run at the caller's precision
(``jax.default_matmul_precision``); on NVIDIA GPUs since Ampere the default float32 precision may use TF32 (10-bit
mantissa): expect relative errors near ``1e-3`` against :func:`~lrnnx_jax.core.scan.chunked_scan`, whose state
update and readout are elementwise, unless the precision is set to ``"highest"`` (``"float32"``).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from lrnnx_jax.core.scan import linear_scan
from lrnnx_jax.core.validation import check_chunk_size

Array = jax.Array


def _check_shape(name: str, array, expected: tuple, layout: str):
    if tuple(array.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {layout} = {tuple(expected)}, got {tuple(array.shape)}")


def _check_inputs(x, dt, A, B, C, h0, mask):
    """The shapes of :func:`ssd_chunked`'s arguments; returns ``(batch, length, nheads, headdim, ngroups, N)``."""
    if x.ndim != 4:
        raise ValueError(f"x must have shape (batch, length, nheads, headdim), got {tuple(x.shape)}")
    batch, length, nheads, headdim = x.shape
    if B.ndim != 4 or tuple(B.shape[:2]) != (batch, length):
        raise ValueError(f"B must have shape (batch, length, ngroups, N) with (batch, length) = {(batch, length)}, "
                         f"got {tuple(B.shape)}")
    ngroups, N = B.shape[2:]
    if nheads % ngroups:
        raise ValueError(f"B's ngroups={ngroups} must divide nheads={nheads} (x's axis 2)")
    _check_shape("dt", dt, (batch, length, nheads), "(batch, length, nheads)")
    _check_shape("A", A, (nheads,), "(nheads,)")
    _check_shape("C", C, B.shape, "(batch, length, ngroups, N), as B,")
    if h0 is not None:
        _check_shape("h0", h0, (batch, nheads, headdim, N), "(batch, nheads, headdim, N)")
    if mask is not None:
        _check_shape("mask", mask, (batch, length), "(batch, length)")
        if mask.dtype != jnp.bool_:
            raise TypeError(f"mask must be a bool array, got dtype {mask.dtype}")
    return batch, length, nheads, headdim, ngroups, N


def ssd_chunked(x: Array, dt: Array, A: Array, B: Array, C: Array, h0: Optional[Array] = None,
                mask: Optional[Array] = None, *, chunk_size: Optional[int]) -> tuple[Array, Array]:
    """Mamba-2's SSM over a sequence by the chunked SSD algorithm (see the module docstring).

    Args:
      x: ``(batch, L, nheads, headdim)`` inputs.
      dt: ``(batch, L, nheads)`` step sizes (after softplus and any clamp; ``>= 0``).
      A: ``(nheads,)`` the per-head rates (``< 0``).
      B, C: ``(batch, L, ngroups, N)``; head ``h`` uses group ``h // (nheads / ngroups)``.
      h0: ``(batch, nheads, headdim, N)`` entering state (zeros when None).
      mask: ``(batch, L)`` bool; where False the step is frozen (``dt = 0``: decay 1 and no input, so the state is
        unchanged and ``y_t = C_t . S_{t-1}``), as :func:`~lrnnx_jax.core.scan.chunked_scan`'s mask. Outputs there
        are not zeroed.
      chunk_size: ``Q`` steps per chunk (a positive integer; larger than L means one chunk), or None for one chunk
        (the quadratic form over the whole sequence). L need not be a multiple of it.

    Returns:
      ``(y, h_last)``: ``y (batch, L, nheads, headdim)`` without any skip term, and the state after the last
      step ``(batch, nheads, headdim, N)`` (``mamba_ssm``'s ``ssm_state`` layout).
    """
    batch, length, nheads, headdim, ngroups, N = _check_inputs(x, dt, A, B, C, h0, mask)
    chunk_size = check_chunk_size(chunk_size)
    Q = length if chunk_size is None else min(chunk_size, length)
    num_chunks = -(-length // Q)
    pad = num_chunks * Q - length
    heads_per_group = nheads // ngroups
    if mask is not None:
        dt = jnp.where(mask[..., None], dt, 0)

    def chunks(a, *inner):  # (batch, L, ...) -> (batch, num_chunks, Q, *inner); padded steps have dt = 0 (frozen)
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return a.reshape(batch, num_chunks, Q, *inner)

    x = chunks(x, ngroups, heads_per_group, headdim)  # (b, c, Q, g, k, p)
    dt = chunks(dt, ngroups, heads_per_group)  # (b, c, Q, g, k)
    B, C = chunks(B, ngroups, N), chunks(C, ngroups, N)  # (b, c, Q, g, n)
    x_dt = x * dt[..., None]
    log_decay = jnp.cumsum(dt * A.reshape(ngroups, heads_per_group), axis=2)  # cum_t: (b, c, Q, g, k), decreasing
    cum = jnp.moveaxis(log_decay, 2, -1)  # (b, c, g, k, Q)

    # inside each chunk: ((C B^T) * L) @ (dt x), L[l, s] = exp(cum_l - cum_s) for s <= l, else 0
    causal = jnp.tril(jnp.ones((Q, Q), bool))
    segment = jnp.where(causal, cum[..., :, None] - cum[..., None, :], -jnp.inf)
    scores = jnp.einsum("bclgn,bcsgn->bcgls", C, B)[:, :, :, None] * jnp.exp(segment)  # (b, c, g, k, Q, Q)
    y = jnp.einsum("bcgkls,bcsgkp->bclgkp", scores, x_dt)

    # each chunk's state from a zero entering state, then the states entering the chunks
    to_end = jnp.exp(log_decay[:, :, -1:] - log_decay)  # (b, c, Q, g, k): decay from step s to the chunk's end
    chunk_states = jnp.einsum("bcsgn,bcsgkp->bcgkpn", B, x_dt * to_end[..., None])  # (b, c, g, k, p, n)
    if h0 is None:
        h0 = jnp.zeros((batch, nheads, headdim, N), chunk_states.dtype)
    h0 = h0.reshape(batch, ngroups, heads_per_group, headdim, N)
    chunk_decay = jnp.exp(log_decay[:, :, -1])[..., None, None]  # (b, c, g, k, 1, 1)
    after = linear_scan(chunk_decay, chunk_states.astype(h0.dtype), h0=h0, axis=1)  # states after each chunk
    entering = jnp.concatenate([h0[:, None], after[:, :-1]], axis=1)

    # the entering state's contribution: exp(cum_l) S C_l
    y = y + jnp.einsum("bclgn,bcgkpn->bclgkp", C, entering.astype(y.dtype)) * jnp.exp(log_decay)[..., None]
    y = y.reshape(batch, num_chunks * Q, nheads, headdim)[:, :length]
    return y, after[:, -1].reshape(batch, nheads, headdim, N)
