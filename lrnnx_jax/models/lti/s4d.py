"""S4D: S4 with a diagonal state matrix (Gu et al., 2022), as in lrnnx.

Each of the ``H'`` SSM channels is a single-input system with ``N/2`` complex
states, one of each conjugate pair::

    A_bar, gamma = disc(A, dt)            zoh or bilinear, lrnnx_jax.core.discretization
    h_t = A_bar * h_{t-1} + gamma B u_t   (N/2,) complex
    y_t[c] = 2 Re(C[c] h_t)               the conjugate half, folded into C as 2 C

which is lrnnx's Vandermonde kernel ``K[c, l] = 2 Re sum_n C[c, n] gamma_n B_n A_bar_n^l``.
The channels run through the diagonal LTI engine (:mod:`lrnnx_jax.core.lti`,
FFT or scan), mapped over ``H'``; the surrounding block is :class:`S4Layer`.
"""

from __future__ import annotations

import functools

import jax

from lrnnx_jax.core import lti
from lrnnx_jax.core.discretization import get_discretization
from lrnnx_jax.models.lti.s4_layer import S4Layer, SSMParams

DISCRETIZATIONS = ("zoh", "bilinear")


@functools.partial(jax.jit, static_argnames="disc")
def discrete_system(params: SSMParams, disc: str):
    """``(A_bar (H', N/2), B_bar (H', N/2), C (c, H', N/2))`` with the factor 2 of the conjugate half in ``C``."""
    A_bar, gamma = get_discretization(disc, DISCRETIZATIONS)(params.A, params.dt)
    return A_bar, gamma * params.B, 2 * params.C


@functools.partial(jax.jit, static_argnames=("method", "chunk_size", "return_state"))
def ssm_forward(u, A_bar, B_bar, C, *, mask, lengths, method, chunk_size, return_state):
    """Every channel through :func:`lti.diagonal_forward`.

    ``u (B, L, H')`` -> ``(y (B, L, c, H'), h_last (B, H', N/2) or None)``.
    """
    run = functools.partial(
        lti.diagonal_forward, mask=mask, lengths=lengths, method=method, chunk_size=chunk_size, return_state=return_state
    )
    return jax.vmap(run, in_axes=(2, 0, 0, 1), out_axes=(3, 1))(u[..., None], A_bar, B_bar[..., None], C)


@jax.jit
def ssm_step(h, u_t, A_bar, B_bar, C):
    """Every channel through :func:`lti.diagonal_step`: ``h (B, H', N/2)``, ``u_t (B, H')`` -> ``(y_t (B, c, H'), h)``."""
    step = jax.vmap(lti.diagonal_step, in_axes=(1, 1, 0, 0, 1), out_axes=(2, 1))
    return step(h, u_t[..., None], A_bar, B_bar[..., None], C)


class S4D(S4Layer):
    """S4D block: :class:`S4Layer`'s arguments (lrnnx's), plus ``disc="zoh" | "bilinear"``.

    ``rank`` only matters to the NPLR initialisations (``init="legs"`` gives S4D-LegS,
    the diagonal of the DPLR HiPPO-LegS matrix); S4D has no low-rank term.
    Cache: ``{"lrnn_state": (B, H', N/2) complex}``.
    """

    def __init__(self, *args, disc: str = "zoh", **kwargs):
        get_discretization(disc, DISCRETIZATIONS)
        self.disc = disc
        super().__init__(*args, **kwargs)

    @property
    def state_size(self) -> int:
        return self.d_state // 2

    def discrete_system(self):
        """See :func:`discrete_system`."""
        return discrete_system(self.ssm_params(), self.disc)

    def _ssm_forward(self, u, mask, lengths, return_state):
        return ssm_forward(
            u, *self.discrete_system(), mask=mask, lengths=lengths, method=self.method,
            chunk_size=self.chunk_size, return_state=return_state,
        )

    def _ssm_step(self, state, u_t):
        return ssm_step(state, u_t, *self.discrete_system())
