"""``causal_conv_silu``: the depthwise causal convolution and SiLU of Mamba's input branch, forward and backward, for
training.

For every batch row, time ``t`` and channel ``d`` (shapes below)::

    c_t = sum_k w[d, k] x_{t - (K - 1) + k} + b[d]      (x_t = 0 for t < 0)
    u_t = silu(c_t)

which is ``jax.nn.silu(lrnnx_jax.core.conv.causal_conv1d(x, w, b))`` (no history: a sequence from its start).

In XLA the convolution and its gradient are several passes over ``(batch, L, D)`` arrays: the forward writes the
pre-activation beside ``u``, and the backward reads and writes the sequence once per tap for the weights' gradients.
The kernels make one pass each way:

* :func:`forward_kernel`: grid ``(batch, cdiv(L, BLOCK_T), cdiv(D, BLOCK_D))``. A program loads its tile of ``x``
  at the ``K`` shifts (the overlapping loads hit the cache), and stores ``u``: it reads ``x`` and writes ``u``.
* :func:`backward_kernel`: the same grid. From ``du`` and ``x`` a program recomputes ``c`` at the ``K`` positions
  ``t .. t + K - 1`` that each ``x_t`` feeds (``2K - 1`` shifted loads of ``x``, ``K`` of ``du``), and stores
  ``dx_t = sum_j w[d, K - 1 - j] silu'(c_{t+j}) du_{t+j}``, with its tile's partial sums of the gradients of ``w``
  and ``b``, reduced outside (``(batch, cdiv(L, BLOCK_T), K, D)``: a few numbers per tile).

Both compute in float32 and take float32, bfloat16 or float16 ``x`` (any of those for ``w``, ``b``); ``u`` and
``dx`` are in ``x``'s dtype, the parameters' gradients in theirs.

:func:`causal_conv_silu` is the dispatch point: the kernels under ``jax.custom_vjp`` (:func:`kernel_conv`) or
:func:`reference`, as :func:`choose` (``pallas_kernels.dispatch.choose_kernel`` with :data:`POLICY`) decides.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels import kernel_math as km
from pallas_kernels import scan_common
from pallas_kernels.scan_common import ScanPolicy

OP = "causal_conv_silu"

#: time steps and channels per program, and warps per program (``KernelConfig.num_warps`` overrides them)
BLOCK_T, BLOCK_D, WARPS = 32, 128, 4
#: the largest kernel width the kernels take (they unroll over its taps)
MAX_WIDTH = 8

#: ``"auto"``: not measured on a GPU yet
POLICY = ScanPolicy(auto=False, evidence=scan_common.NOT_MEASURED)


def reference(x, weight, bias=None):
    """``silu(c)``, ``c_t = sum_k weight[:, k] x_{t-(K-1)+k} + bias``: ``x (batch, L, D)``, ``weight (D, K)``,
    ``bias (D,)`` or None. Computes in float32 (float64 for float64 inputs); returns ``x.dtype``."""
    f = jnp.promote_types(jnp.result_type(x, weight), jnp.float32)
    K = weight.shape[1]
    length = x.shape[1]
    padded = jnp.pad(x.astype(f), [(0, 0), (K - 1, 0), (0, 0)])
    c = sum(padded[:, k:k + length] * weight[:, k].astype(f) for k in range(K))
    if bias is not None:
        c = c + bias.astype(f)
    return km.silu(c).astype(x.dtype)


def _silu_grad(c):
    """``d silu(c) / dc``."""
    s = km.sigmoid(c)
    return s * (1.0 + c * (1.0 - s))


def _padded_shape(x) -> tuple:
    """``x``'s shape with L and D rounded up to whole tiles (the kernels' outputs; no copy when they divide)."""
    batch, length, dim = x.shape
    return batch, -(-length // BLOCK_T) * BLOCK_T, -(-dim // BLOCK_D) * BLOCK_D


def _unpad(a, shape):
    return a if a.shape == tuple(shape) else a[:, :shape[1], :shape[2]]


def _grid(x):
    """``(batch, time blocks, channel blocks)``."""
    batch, length, dim = x.shape
    return batch, -(-length // BLOCK_T), -(-dim // BLOCK_D)


class _Tile:
    """A program's tile of ``(BLOCK_T, BLOCK_D)`` steps and channels: loads of a ``(batch, L, D)`` sequence shifted
    in time (gathers at clipped indices, masked: a shifted tile may start before the sequence or end after it, and
    interpret mode clamps an out-of-bounds slice instead of masking it), loads along the channels, and stores into
    an output padded to whole tiles (in bounds)."""

    def __init__(self, pl, plgpu, length: int, dim: int):
        self.pl, self.plgpu, self.length, self.dim = pl, plgpu, length, dim
        self.b, self.t_blk, d_blk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        self.t0, self.d0 = self.t_blk * BLOCK_T, d_blk * BLOCK_D
        lanes = self.d0 + jnp.arange(BLOCK_D)
        self.lanes_ok = lanes < dim
        self.lane_index = jnp.minimum(lanes, dim - 1)

    def load(self, ref, shift: int):
        """``ref[b, t + shift, d]`` over the tile, float32, 0 outside the sequence and the channels."""
        t = self.t0 + shift + jnp.arange(BLOCK_T)
        ok = ((t >= 0) & (t < self.length))[:, None] & self.lanes_ok[None, :]
        rows = jnp.broadcast_to(jnp.clip(t, 0, self.length - 1)[:, None], ok.shape)
        cols = jnp.broadcast_to(self.lane_index[None, :], ok.shape)
        return self.plgpu.load(ref.at[self.b, rows, cols], mask=ok, other=0.0).astype(jnp.float32)

    def store(self, ref, value):
        """``value`` into the tile of ``ref`` ``(batch, whole tiles of L, whole tiles of D)``."""
        view = ref.at[self.b, self.pl.ds(self.t0, BLOCK_T), self.pl.ds(self.d0, BLOCK_D)]
        self.plgpu.store(view, value.astype(ref.dtype))

    def channel(self, ref, *lead):
        """``ref[*lead, d]`` over the tile's channels, float32 ``(BLOCK_D,)``, 0 past the last channel."""
        lead = tuple(jnp.int32(i) if isinstance(i, int) else i for i in lead)  # a Python int is no load index
        return self.plgpu.load(ref.at[(*lead, self.lane_index)], mask=self.lanes_ok, other=0.0).astype(jnp.float32)


def _taps(tile: _Tile, w_ref, K: int) -> list:
    """The ``K`` taps ``w[:, k]`` over the tile's channels, each ``(1, BLOCK_D)``."""
    return [tile.channel(w_ref, k)[None, :] for k in range(K)]


def _pre_activation(tile: _Tile, x_ref, taps: list, bias, shift: int, loaded: dict):
    """``c`` over the tile shifted by ``shift`` steps; ``loaded`` caches the shifted loads of ``x``."""
    K = len(taps)
    c = bias
    for k in range(K):
        s = shift - (K - 1) + k
        if s not in loaded:
            loaded[s] = tile.load(x_ref, s)
        c = c + taps[k] * loaded[s]
    return c


def forward_kernel(x, weight_t, bias, *, config: Optional[dispatch.KernelConfig] = None):
    """``u (batch, L, D)`` in ``x.dtype`` from ``x``, ``weight_t (K, D)`` (the taps, transposed) and ``bias (D,)``."""
    config = dispatch.resolve(config)
    pl, plgpu = dispatch.pallas_modules()
    _, length, dim = x.shape
    K = weight_t.shape[0]

    def body(x_ref, w_ref, b_ref, u_ref):
        tile = _Tile(pl, plgpu, length, dim)
        c = _pre_activation(tile, x_ref, _taps(tile, w_ref, K), tile.channel(b_ref)[None, :], 0, {})
        tile.store(u_ref, km.silu(c))

    call = scan_common.pallas_call(body, jax.ShapeDtypeStruct(_padded_shape(x), x.dtype), _grid(x), config,
                                   OP + "_fwd", WARPS)
    return _unpad(call(x, weight_t, bias), x.shape)


def backward_kernel(x, weight_t, bias, du, *, config: Optional[dispatch.KernelConfig] = None):
    """The gradients from ``du (batch, L, D)``: ``dx`` in ``x.dtype``, and float32 partial sums per program of the
    taps' ``(batch, cdiv(L, BLOCK_T), K, D)`` and the bias's ``(batch, cdiv(L, BLOCK_T), D)`` gradients."""
    config = dispatch.resolve(config)
    pl, plgpu = dispatch.pallas_modules()
    batch, length, dim = x.shape
    K = weight_t.shape[0]
    _, t_blocks, _ = _grid(x)
    f32 = jnp.float32

    def body(x_ref, w_ref, b_ref, du_ref, dx_ref, dw_ref, db_ref):
        tile = _Tile(pl, plgpu, length, dim)
        taps = _taps(tile, w_ref, K)
        bias_row = tile.channel(b_ref)[None, :]
        loaded = {}
        dc = []  # dc[j]: the gradient of c at t + j
        for j in range(K):
            c = _pre_activation(tile, x_ref, taps, bias_row, j, loaded)
            dc.append(_silu_grad(c) * tile.load(du_ref, j))
        dx = sum(taps[K - 1 - j] * dc[j] for j in range(K))
        tile.store(dx_ref, dx)
        cols = pl.ds(tile.d0, BLOCK_D)
        for k in range(K):  # this tile's share of dw[:, k] = sum_t dc_t x_{t-(K-1)+k}
            partial = jnp.sum(dc[0] * loaded[k - (K - 1)], axis=0)
            plgpu.store(dw_ref.at[tile.b, tile.t_blk, jnp.int32(k), cols], partial)
        plgpu.store(db_ref.at[tile.b, tile.t_blk, cols], jnp.sum(dc[0], axis=0))

    dim_padded = _padded_shape(x)[2]
    out_shape = (jax.ShapeDtypeStruct(_padded_shape(x), x.dtype),
                 jax.ShapeDtypeStruct((batch, t_blocks, K, dim_padded), f32),
                 jax.ShapeDtypeStruct((batch, t_blocks, dim_padded), f32))
    call = scan_common.pallas_call(body, out_shape, _grid(x), config, OP + "_bwd", WARPS)
    dx, dw, db = call(x, weight_t, bias, du)
    return _unpad(dx, x.shape), dw[..., :dim], db[..., :dim]


# ----------------------------------------------------------------------------- custom_vjp
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv(config, x, weight, bias):
    return forward_kernel(x, weight.T, bias, config=config)


def _conv_fwd(config, x, weight, bias):
    return forward_kernel(x, weight.T, bias, config=config), (x, weight, bias)


def _conv_bwd(config, residuals, du):
    x, weight, bias = residuals
    dx, dw, db = backward_kernel(x, weight.T, bias, du, config=config)
    return dx, jnp.sum(dw, (0, 1)).T.astype(weight.dtype), jnp.sum(db, (0, 1)).astype(bias.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def kernel_conv(x, weight, bias=None, *, config: Optional[dispatch.KernelConfig] = None):
    """The kernel pair under ``jax.custom_vjp``; same contract as :func:`causal_conv_silu` (no dispatch). Under a
    data-parallel mesh it runs per shard (:func:`pallas_kernels.dispatch.per_shard`)."""
    config = dispatch.resolve(config)
    if bias is None:
        bias = jnp.zeros(weight.shape[:1], weight.dtype)
    return dispatch.per_shard(functools.partial(_conv, config), (x, weight, bias), (0, None, None), 0)


# ----------------------------------------------------------------------------- dispatch
def unsupported_reason(x, weight, bias=None) -> Optional[str]:
    """Why the kernels cannot take these arguments, or None."""
    reason = scan_common.unsupported_dtype(dict(x=x, weight=weight, bias=bias))
    if reason is not None:
        return reason
    if weight.shape[1] > MAX_WIDTH:
        return f"a kernel width of {weight.shape[1]} > {MAX_WIDTH}"
    return scan_common.unsupported_size(x.size + x.shape[2] * (BLOCK_T + MAX_WIDTH))


def choose(x, weight, bias=None, *, config: Optional[dispatch.KernelConfig] = None,
           policy: ScanPolicy = POLICY) -> bool:
    """Whether :func:`causal_conv_silu` runs the kernels for these arguments under ``config``."""
    return dispatch.choose_kernel(OP, unsupported_reason(x, weight, bias), dispatch.resolve(config),
                                  policy.slower_reason(), batch=x.shape[0])


def causal_conv_silu(x, weight, bias=None, *, config: Optional[dispatch.KernelConfig] = None):
    """``silu`` of the depthwise causal convolution of a sequence from its start: the kernels or :func:`reference`.

    Args:
      x: ``(batch, L, D)``.
      weight: ``(D, K)``, the taps (``weight[:, K - 1]`` multiplies the current step).
      bias: ``(D,)`` or None.
      config: a :class:`~pallas_kernels.dispatch.KernelConfig`; the default when None. ``"auto"`` keeps the
        reference until :data:`POLICY` says the kernels were measured faster.

    Returns:
      ``u (batch, L, D)`` in ``x.dtype``.
    """
    _check(x, weight, bias)
    config = dispatch.resolve(config)
    if choose(x, weight, bias, config=config):
        return kernel_conv(x, weight, bias, config=config)
    return reference(x, weight, bias)


def _check(x, weight, bias):
    if x.ndim != 3 or weight.ndim != 2:
        raise ValueError(f"x must be (batch, L, D) and weight (D, K), got {x.shape} and {weight.shape}")
    if weight.shape[0] != x.shape[2]:
        raise ValueError(f"weight must have shape ({x.shape[2]}, K) for x of {x.shape[2]} channels, got {weight.shape}")
    if bias is not None and tuple(bias.shape) != (x.shape[2],):
        raise ValueError(f"bias must have shape ({x.shape[2]},), got {tuple(bias.shape)}")
    for name, a in (("x", x), ("weight", weight), ("bias", bias)):
        if a is not None and not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"{name} must have a real floating dtype, got {a.dtype}")
