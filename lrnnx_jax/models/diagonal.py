"""The model shell shared by the diagonal complex SSMs with a ``(B, d_state)`` state (LRU, S5 LTI and LTV).

A subclass provides its discrete system and its skip term; the full-sequence forward
(FFT or chunked scan), the step and the cache come from :mod:`lrnnx_jax.core.lti`.
"""

from __future__ import annotations

import jax.numpy as jnp

from lrnnx_jax.core import lti
from lrnnx_jax.core.base import LRNN


class DiagonalSSM(LRNN):
    """Base of LRU and S5: ``h_t = A_bar h_{t-1} + B_bar x_t``, ``y_t = Re(C h_t) + skip(x_t)``.

    Subclasses set ``d_state``, ``method`` and ``chunk_size`` and implement
    :meth:`discrete_system` and :meth:`skip`.
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

    def _forward(self, x, integration_timesteps, mask, lengths, return_cache):
        A_bar, B_bar, C = self.discrete_system(integration_timesteps)
        y, h = lti.diagonal_forward(
            x, A_bar, B_bar, C, mask=mask, lengths=lengths, method=self.method,
            chunk_size=self.chunk_size, return_state=return_cache,
        )
        return y + self.skip(x), (None if h is None else {"lrnn_state": h})

    def _step(self, x_t, cache, integration_timesteps):
        A_bar, B_bar, C = self.discrete_system(integration_timesteps)
        y, h = lti.diagonal_step(cache["lrnn_state"], x_t, A_bar, B_bar, C)
        return y + self.skip(x_t), {"lrnn_state": h.astype(cache["lrnn_state"].dtype)}

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int = 1, dtype=None):
        """``{"lrnn_state": (batch_size, d_state) complex zeros}``."""
        return {"lrnn_state": jnp.zeros((batch_size, self.d_state), self._state_dtype(dtype, True))}
