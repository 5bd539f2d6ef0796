"""The model shell shared by the diagonal complex SSMs (LRU, S5 LTI and LTV, Centaurus).

A subclass provides its discrete system, its skip term and (when the cache keeps
lrnnx's layout) the per-row shape of its state; the full-sequence forward (FFT or
chunked scan), the step and the cache come from :mod:`lrnnx_jax.core.lti`.
"""

from __future__ import annotations

import jax.numpy as jnp

from lrnnx_jax.core import lti
from lrnnx_jax.core.base import LRNN
from pallas_kernels import simplified


class DiagonalSSM(LRNN):
    """Base of LRU, S5 and Centaurus: ``h_t = A_bar h_{t-1} + B_bar x_t``, ``y_t = Re(C h_t) + skip(x_t)``.

    Subclasses set ``d_state``, ``method`` and ``chunk_size`` and implement
    :meth:`discrete_system` and :meth:`skip`. The engine sees the state flat,
    ``(B, S)``; the cache holds it as ``(B, *state_shape())``.
    """

    d_state: int
    method: str
    chunk_size: int | None

    def discrete_system(self, integration_timesteps=None):
        """``(A_bar (N,) or (..., N) for timesteps of shape (...), B_bar (N, H), C (H, N))`` complex."""
        raise NotImplementedError

    def skip(self, x):
        """The direct term, ``x (..., H) -> (..., H)``."""
        raise NotImplementedError

    def state_shape(self) -> tuple[int, ...]:
        """Per-row shape of the cache's ``lrnn_state``; ``(d_state,)`` unless a model keeps another layout."""
        return (self.d_state,)

    def _forward(self, x, integration_timesteps, mask, lengths, return_cache):
        A_bar, B_bar, C = self.discrete_system(integration_timesteps)
        y, h = lti.diagonal_forward(
            x, A_bar, B_bar, C, mask=mask, lengths=lengths, method=self.method,
            chunk_size=self.chunk_size, return_state=return_cache,
        )
        return y + self.skip(x), (None if h is None else {"lrnn_state": h.reshape(h.shape[:1] + self.state_shape())})

    def _step(self, x_t, cache, integration_timesteps):
        """The update ``h = A_bar h + B_bar x`` and ``Re(C h)`` by ``pallas_kernels.simplified_state_update``
        (its Pallas kernel on NVIDIA GPUs, else :func:`lrnnx_jax.core.lti.diagonal_step`)."""
        A_bar, B_bar, C = self.discrete_system(integration_timesteps)
        state = cache["lrnn_state"]
        y, h = simplified.simplified_state_update(
            state.reshape(state.shape[0], -1), x_t, A_bar, B_bar, C, discretization="no_discretization"
        )
        return y + self.skip(x_t), {"lrnn_state": h.reshape(state.shape).astype(state.dtype)}

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int = 1, dtype=None):
        """``{"lrnn_state": (batch_size, *state_shape()) complex zeros}``."""
        return {"lrnn_state": jnp.zeros((batch_size,) + self.state_shape(), self._state_dtype(dtype, True))}
