"""The one engine for diagonal linear recurrences ``h_t = a_t * h_{t-1} + b_t``.

Every model's full-sequence scan path runs through :func:`chunked_scan`. A model
describes one time step by two pure functions, which its single-step recurrence
calls too:

* ``coefficients(chunk) -> (a, b)``: the per-step decay and input of the
  recurrence, for a chunk of inputs with time on axis 1 (shapes ``(B, C, *S)``
  where ``S`` is the state shape);
* ``readout(h, chunk) -> y``: the output from the states ``h`` ``(B, C, *S)``.

The sequence is cut into chunks of ``chunk_size`` steps. Inside a chunk the
recurrence is solved by ``jax.lax.associative_scan``; across chunks the last
state is carried by ``jax.lax.scan``. The chunk body is rematerialised in the
backward pass (``jax.checkpoint``), so peak memory is ``O(B * chunk * prod(S))``
for the state-sized tensors instead of ``O(B * L * prod(S))``:

* ``chunk_size=None``: a single chunk, the plain (unchunked) associative scan;
* ``chunk_size=1``: a sequential ``lax.scan`` over time;
* anything in between: the chunked associative scan.

Like recurrentgemma's scans, it takes an optional initial state ``h0`` and
returns the final state, so prefill hands its state straight to decoding.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = Any

DEFAULT_CHUNK_SIZE = 128


def combine(left, right):
    """Associative operator of ``h -> a h + b``: apply ``left`` first, then ``right``."""
    a_l, b_l = left
    a_r, b_r = right
    return a_r * a_l, a_r * b_l + b_r


def linear_scan(a: Array, b: Array, h0: Optional[Array] = None, axis: int = 1):
    """Solve ``h_t = a_t h_{t-1} + b_t`` along ``axis`` with an associative scan.

    Args:
      a, b: broadcast-compatible arrays; time is ``axis``.
      h0: initial state, shaped like ``b`` without ``axis`` (zeros when None).

    Returns:
      All states ``h``, shaped like ``jnp.broadcast_arrays(a, b)[1]``.
    """
    a, b = jnp.broadcast_arrays(a, b)
    if h0 is not None:
        first = jax.lax.index_in_dim(b, 0, axis, keepdims=True) + jax.lax.index_in_dim(
            a, 0, axis, keepdims=True
        ) * jnp.expand_dims(h0, axis)
        b = jax.lax.dynamic_update_index_in_dim(b, first.astype(b.dtype), 0, axis)
    _, h = jax.lax.associative_scan(combine, (a, b), axis=axis)
    return h


def _time_major_chunks(tree: PyTree, num_chunks: int, chunk: int) -> PyTree:
    """(B, num_chunks*chunk, ...) -> (num_chunks, B, chunk, ...)."""

    def split(x):
        x = x.reshape(x.shape[0], num_chunks, chunk, *x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    return jax.tree.map(split, tree)


def _pad_time(tree: PyTree, pad: int) -> PyTree:
    def pad_one(x):
        widths = [(0, 0)] * x.ndim
        widths[1] = (0, pad)
        return jnp.pad(x, widths)

    return jax.tree.map(pad_one, tree)


def chunked_scan(
    coefficients: Callable[[PyTree], tuple[Array, Array]],
    readout: Callable[[Array, PyTree], PyTree],
    inputs: PyTree,
    h0: Array,
    mask: Optional[Array] = None,
    chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE,
    checkpoint_policy: Optional[Callable] = None,
):
    """Run a diagonal linear recurrence over a sequence, chunk by chunk.

    Args:
      coefficients: ``chunk -> (a, b)``, each ``(B, C, *S)`` (``a`` may broadcast).
      readout: ``(h (B, C, *S), chunk) -> y`` pytree of ``(B, C, ...)`` arrays.
      inputs: pytree of ``(B, L, ...)`` arrays (time on axis 1).
      h0: initial state ``(B, *S)``.
      mask: optional ``(B, L)`` bool; where False the step leaves the state
        unchanged (``a = 1, b = 0``), so the final state is the state at each
        row's last valid step. Outputs there are not masked here.
      chunk_size: steps per chunk; None for one chunk (unchunked).
      checkpoint_policy: the ``jax.checkpoint`` policy of a chunk's body (what its backward keeps rather than
        recomputes); None: keep nothing (the chunk is recomputed whole in the backward).

    Returns:
      ``(y, h_last)``: the readout pytree ``(B, L, ...)`` and the final state ``(B, *S)``.
    """
    leaves = jax.tree.leaves(inputs)
    batch, length = leaves[0].shape[:2]
    chunk = length if chunk_size is None else max(1, min(int(chunk_size), length))
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length
    if mask is None and pad:
        mask = jnp.ones((batch, length), bool)
    if mask is not None:
        inputs = (inputs, mask)
    if pad:
        inputs = _pad_time(inputs, pad)
    chunks = _time_major_chunks(inputs, num_chunks, chunk)

    def body(h, chunk_inputs):
        if mask is not None:
            chunk_inputs, chunk_mask = chunk_inputs
        a, b = coefficients(chunk_inputs)
        a, b = jnp.broadcast_arrays(a, b)
        if mask is not None:
            m = chunk_mask.reshape(chunk_mask.shape + (1,) * (b.ndim - 2))
            a = jnp.where(m, a, jnp.ones_like(a))
            b = jnp.where(m, b, jnp.zeros_like(b))
        hs = linear_scan(a, b.astype(h.dtype), h0=h)
        return hs[:, -1], readout(hs, chunk_inputs)

    h_last, ys = jax.lax.scan(jax.checkpoint(body, policy=checkpoint_policy), h0, chunks)

    def merge(y):
        y = jnp.moveaxis(y, 0, 1)
        y = y.reshape(y.shape[0], num_chunks * chunk, *y.shape[3:])
        return y[:, :length]

    return jax.tree.map(merge, ys), h_last
