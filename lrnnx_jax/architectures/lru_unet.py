"""``LRUUnet``: lrnnx's U-Net for signals (aTENNuate's structure) over LRU or any zoo model, strictly causal on request.

``x (B, C_in, T) -> y (B, C_out, T)`` (channels first, as lrnnx). With ``widths = (in_channels, *channels)``,
``r_i = resample_factors[i]`` and ``P = prod(r_i)``:

* the input is padded with zeros on the right to a multiple of ``P`` and the output cropped back to ``T``;
* encoder, level ``i = 0 .. depth-1``: keep ``skip_i = h``; a block at ``widths[i]``; the strided conv
  ``Conv1d(widths[i] -> widths[i+1], kernel r_i, stride r_i)``;
* bottleneck: two blocks at ``widths[-1]``;
* decoder, level ``i = depth-1 .. 0``: the transposed conv ``ConvTranspose1d(widths[i+1] -> widths[i], kernel r_i,
  stride r_i)``, delayed by ``r_i - 1`` samples when ``causal``; add ``skip_i``; a block at ``widths[i]``;
* head: two blocks at ``in_channels`` (the second without activation), then a 1x1 conv (no bias) when
  ``out_channels != in_channels``.

A block is lrnnx's ``LRUBlock``: the mixer (``d_model = d_state = width`` by default), then LayerNorm over channels
(when the width is above 1) and SiLU (except the last block). lrnnx ignores ``channels`` (its widths double from
``in_channels``); here ``channels[i]`` is the width after level ``i``'s downsampling, so
``channels=[2 * in_channels, 4 * in_channels, ...]`` is lrnnx's network.

**Causality.** A coarse sample ``j`` of level ``i`` summarizes the ``r_i`` inputs ``j r_i .. j r_i + r_i - 1`` of
its level. The transposed conv writes it to those same positions; delayed by ``r_i - 1`` samples, it first appears
at ``j r_i + r_i - 1``, after its last input, and this is the least delay that is causal. By induction over the
levels (the mixers, norms, activations, skips and 1x1 conv are causal or pointwise), with ``causal=True`` the output
at ``t`` depends only on inputs at ``<= t``. lrnnx delays by one sample, which is causal only when every factor is at
most 2. With ``causal=False`` there is no delay, and the output at ``t`` may depend on the inputs up to the end of
its block of ``P`` samples, ``P (t // P) + P - 1``.

**``lengths (B,)``**: the inputs at and after a row's length are set to zero and its outputs there are zero. Each
row's outputs are then those of the network run on the row cut at its length (which the network pads with zeros
itself); nothing before a row's length depends on the values after it.

The pure functions :func:`strided_conv`, :func:`transposed_conv`, :func:`delay` and :func:`pad_to_multiple` hold the
resampling math; the modules only own the parameters.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrnnx_jax.architectures.language_model import MIXERS, mixer_factory
from lrnnx_jax.core import validation
from lrnnx_jax.core.base import compute_dtype, drawn_random_state


# ================================================================ pure functions (channels last: (B, T, C))
def pad_to_multiple(x, multiple: int):
    """``x (B, T, C)`` with zeros appended on the time axis up to a multiple of ``multiple``."""
    pad = -x.shape[1] % multiple
    return jnp.pad(x, ((0, 0), (0, pad), (0, 0))) if pad else x


def strided_conv(x, kernel, bias):
    """``Conv1d(kernel_size=r, stride=r)`` on ``x (B, S r, C_in)`` -> ``(B, S, C_out)``.

    ``y[:, j] = sum_k x[:, j r + k] @ kernel[k] + bias``; ``kernel (r, C_in, C_out)`` is torch's ``Conv1d`` weight
    ``(C_out, C_in, r)`` transposed. The time axis must be a multiple of ``r``.
    """
    factor, c_in, _ = kernel.shape
    batch, length, _ = x.shape
    if length % factor:
        raise ValueError(f"strided_conv needs a length that is a multiple of {factor}, got {length}")
    blocks = x.reshape(batch, length // factor, factor, c_in)
    return jnp.einsum("bjkc,kcd->bjd", blocks, kernel.astype(x.dtype)) + bias.astype(x.dtype)


def transposed_conv(x, kernel, bias):
    """``ConvTranspose1d(kernel_size=r, stride=r)`` on ``x (B, S, C_in)`` -> ``(B, S r, C_out)``.

    ``y[:, j r + k] = x[:, j] @ kernel[k] + bias``; ``kernel (r, C_in, C_out)`` is torch's ``ConvTranspose1d``
    weight ``(C_in, C_out, r)`` transposed.
    """
    factor, _, c_out = kernel.shape
    batch, length, _ = x.shape
    y = jnp.einsum("bjc,kcd->bjkd", x, kernel.astype(x.dtype)).reshape(batch, length * factor, c_out)
    return y + bias.astype(x.dtype)


def delay(x, shift: int):
    """``x (B, T, C)`` delayed by ``shift`` samples: ``y[:, t] = x[:, t - shift]``, zeros for ``t < shift``."""
    if shift == 0:
        return x
    length = x.shape[1]
    return jnp.pad(x, ((0, 0), (shift, 0), (0, 0)))[:, :length]


def causal_delay(factor: int, causal: bool) -> int:
    """The decoder's delay at a level of resampling factor ``factor``: ``factor - 1`` when causal (the least
    causal delay, see the module docstring), else 0."""
    return factor - 1 if causal else 0


# ================================================================ modules (own parameters, call the functions)
def _uniform(rngs: nnx.Rngs, shape, bound: float, dtype):
    return nnx.Param(jax.random.uniform(rngs.params(), shape, dtype, -bound, bound))


class StridedConv(nnx.Module):
    """lrnnx's ``DownPool1D`` with any output width: :func:`strided_conv`, initialised as torch's ``Conv1d``
    (``U(+-1/sqrt(C_in r))``)."""

    def __init__(self, in_channels: int, out_channels: int, factor: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        bound = 1 / math.sqrt(in_channels * factor)
        self.kernel = _uniform(rngs, (factor, in_channels, out_channels), bound, param_dtype)
        self.bias = _uniform(rngs, (out_channels,), bound, param_dtype)

    def __call__(self, x):
        return strided_conv(x, self.kernel[...], self.bias[...])


class TransposedConv(nnx.Module):
    """lrnnx's ``UpPool1D`` with any output width: :func:`transposed_conv` then :func:`delay` by ``shift``,
    initialised as torch's ``ConvTranspose1d`` (``U(+-1/sqrt(C_out r))``, torch's fan-in of that weight)."""

    def __init__(self, in_channels: int, out_channels: int, factor: int, shift: int, *, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        bound = 1 / math.sqrt(out_channels * factor)
        self.kernel = _uniform(rngs, (factor, in_channels, out_channels), bound, param_dtype)
        self.bias = _uniform(rngs, (out_channels,), bound, param_dtype)
        self.shift = shift

    def __call__(self, x):
        return delay(transposed_conv(x, self.kernel[...], self.bias[...]), self.shift)


class MixerBlock(nnx.Module):
    """lrnnx's LRU block on ``(B, T, C)``: the mixer, then (``activation``) LayerNorm over channels when ``C > 1``
    and SiLU."""

    def __init__(self, mixer, channels: int, activation: bool, epsilon: float, *, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        self.mixer = mixer
        self.activation = activation
        self.norm = (nnx.LayerNorm(channels, epsilon=epsilon, use_fast_variance=False, param_dtype=param_dtype, rngs=rngs)
                     if activation and channels > 1 else None)

    def __call__(self, x):
        y, _ = self.mixer.masked_forward(x, None, None, None, False, None)
        if self.norm is not None:
            y = self.norm(y)
        return jax.nn.silu(y) if self.activation else y


class LRUUnet(nnx.Module):
    """lrnnx's ``LRUUnet`` (see the module docstring): ``x (B, in_channels, T) -> (B, out_channels, T)``.

    Args:
      in_channels, out_channels: the signal's channels in and out.
      channels: the width after each level's downsampling (lrnnx ignores it and doubles).
      resample_factors: each level's factor ``r`` (kernel and stride of its convs); as many as ``channels``.
      pre_conv: only ``False`` (lrnnx accepts it and ignores it; aTENNuate's depthwise pre-convs are not built).
      causal: strictly causal (see the module docstring); lrnnx's default.
      dtype: the parameter dtype of the convs and norms (lrnnx: of the 1x1 conv only); mixers keep their own.
      mixer: the zoo model of every block, a name of ``language_model.MIXERS`` (``"LRU"``, ``"S4D"``, ``"Mamba"``...).
      mixer_kwargs: more keyword arguments of the mixer (``d_model`` and ``d_state`` are set per block; the blocks run
        the mixers on ``(B, T, C)`` through ``masked_forward``, so S4's ``transposed`` does not matter).
      d_state: the mixers' state size; None: each block's width (lrnnx's ``N = H = C``).
      norm_epsilon: the LayerNorms' epsilon (torch's default).
      rngs: ``nnx.Rngs`` (``params``).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, channels: Sequence[int] = (8, 16),
                 resample_factors: Sequence[int] = (4, 2), pre_conv: bool = False, causal: bool = True,
                 dtype=jnp.float32, *, mixer: str = "LRU", mixer_kwargs: Optional[Mapping[str, Any]] = None,
                 d_state: Optional[int] = None, norm_epsilon: float = 1e-5, rngs: nnx.Rngs):
        self.in_channels = validation.check_positive_int(in_channels, "in_channels")
        self.out_channels = validation.check_positive_int(out_channels, "out_channels")
        channels, factors = _check_levels(channels, resample_factors)
        if pre_conv:
            raise ValueError("pre_conv=True is not implemented (lrnnx accepts it and ignores it); pass pre_conv=False")
        if not isinstance(causal, (bool, np.bool_)):
            raise TypeError(f"causal must be a bool, got {causal!r}")
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        make_mixer = _mixer_maker(mixer, mixer_kwargs, d_state)
        self.channels, self.resample_factors, self.causal = channels, factors, bool(causal)
        self.widths = (self.in_channels, *channels)
        self.total_factor = math.prod(factors)

        def block(width, activation=True):
            return MixerBlock(make_mixer(width, rngs), width, activation, norm_epsilon, rngs=rngs, param_dtype=dtype)

        w = self.widths
        self.encoder = nnx.List([block(w[i]) for i in range(len(factors))])
        self.down = nnx.List([StridedConv(w[i], w[i + 1], r, rngs=rngs, param_dtype=dtype) for i, r in enumerate(factors)])
        self.bottleneck = nnx.List([block(w[-1]), block(w[-1])])
        self.up = nnx.List([TransposedConv(w[i + 1], w[i], r, causal_delay(r, self.causal), rngs=rngs, param_dtype=dtype)
                            for i, r in enumerate(factors)])
        self.decoder = nnx.List([block(w[i]) for i in range(len(factors))])
        self.head = nnx.List([block(w[0]), block(w[0], activation=False)])
        self.projection = (None if self.out_channels == self.in_channels else
                           _uniform(rngs, (self.in_channels, self.out_channels), 1 / math.sqrt(self.in_channels), dtype))

    # ---------------------------------------------------------------- pure math (inside programs)
    def forward(self, x, mask=None):
        """The network on validated compute-dtype ``x (B, in_channels, T)``; ``mask (B, T)`` bool (valid positions)
        or None. Returns ``(B, out_channels, T)``."""
        length = x.shape[2]
        h = jnp.swapaxes(x, 1, 2)
        if mask is not None:
            h = jnp.where(mask[..., None], h, 0)
        h = pad_to_multiple(h, self.total_factor)
        skips = []
        for block, down in zip(self.encoder, self.down):
            skips.append(h)
            h = down(block(h))
        for block in self.bottleneck:
            h = block(h)
        for level in reversed(range(len(self.resample_factors))):
            h = self.decoder[level](self.up[level](h) + skips[level])
        for block in self.head:
            h = block(h)
        if self.projection is not None:
            h = h @ self.projection[...].astype(h.dtype)
        h = h[:, :length]
        if mask is not None:
            h = jnp.where(mask[..., None], h, 0)
        return jnp.swapaxes(h, 1, 2)

    # ---------------------------------------------------------------- public API
    def __call__(self, x, lengths=None):
        """``x (B, in_channels, T)`` float -> ``(B, out_channels, T)`` of ``x``'s dtype (computed in float32, or
        float64 for float64 inputs). ``lengths (B,)`` integers in ``[0, T]``: ragged rows (module docstring)."""
        x = _check_signal(x, self.in_channels)
        mask = validation.check_lengths(lengths, x.shape[0], x.shape[2])
        y, rng_state = _jit_forward(self, x.astype(compute_dtype(x.dtype)), mask)
        if rng_state is not None:
            nnx.update(self, rng_state)
        return y.astype(x.dtype)


def _check_signal(x, in_channels: int):
    if not hasattr(x, "shape"):
        x = jnp.asarray(x)
    if x.ndim != 3 or x.shape[1] != in_channels:
        raise ValueError(f"x must have shape (B, C_in, T) with C_in={in_channels} (channels first, as lrnnx), "
                         f"got shape {tuple(x.shape)}")
    if x.shape[2] < 1:
        raise ValueError(f"x must have at least one time step, got shape {tuple(x.shape)}")
    validation.check_float(x, "x")
    return x


def _check_levels(channels, resample_factors):
    if any(isinstance(v, (str, bytes)) or not np.iterable(v) for v in (channels, resample_factors)):
        raise TypeError(f"channels and resample_factors must be lists of integers, got {channels!r} and {resample_factors!r}")
    channels, resample_factors = list(channels), list(resample_factors)
    if len(channels) == 0 or len(channels) != len(resample_factors):
        raise ValueError(f"channels and resample_factors must have the same nonzero length (one entry per level), "
                         f"got {len(channels)} and {len(resample_factors)}")
    channels = tuple(validation.check_positive_int(c, f"channels[{i}]") for i, c in enumerate(channels))
    factors = tuple(validation.check_positive_int(r, f"resample_factors[{i}]") for i, r in enumerate(resample_factors))
    return channels, factors


def _mixer_maker(mixer: str, mixer_kwargs, d_state):
    """``make(width, rngs)`` building one mixer of the zoo type ``mixer`` with ``d_model = width`` and its state size."""
    if mixer not in MIXERS:
        raise ValueError(f"unknown mixer {mixer!r}; expected one of {list(MIXERS)} (attention is not a U-Net mixer)")
    factory = mixer_factory(mixer)
    params = inspect.signature(factory.__init__ if inspect.isclass(factory) else factory).parameters
    kwargs = dict(mixer_kwargs or {})
    fixed = sorted({"d_model", "d_state", "rngs"} & set(kwargs))
    if fixed:
        raise ValueError(f"mixer_kwargs must not set {fixed}: d_model is each block's width, and the state size is "
                         "LRUUnet's d_state argument")
    takes_state = "d_state" in params
    if d_state is not None:
        d_state = validation.check_positive_int(d_state, "d_state")
        if not takes_state:
            raise ValueError(f"{mixer} has no d_state; pass d_state=None")

    def make(width: int, rngs: nnx.Rngs):
        state = {"d_state": width if d_state is None else d_state} if takes_state else {}
        return factory(d_model=width, **state, **kwargs, rngs=rngs)

    return make


# One cached program per (model structure, shapes), the model passed as the pytree it is (lrnnx_jax.core.base
# explains why); parameters are arguments. Random state is returned (and written back) only when a mixer's active
# dropout drew from it.
@jax.jit
def _jit_forward(model, x, mask):
    return model.forward(x, mask), drawn_random_state(model)
