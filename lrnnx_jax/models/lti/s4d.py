"""S4D: S4 with a diagonal state matrix (Gu et al., 2022), as in lrnnx.

Each of the ``H'`` SSM channels is a single-input system with ``N/2`` complex
states, one of each conjugate pair::

    A_bar, gamma = disc(A, dt)            zoh or bilinear, lrnnx_jax.core.discretization
    h_t = A_bar * h_{t-1} + gamma B u_t   (N/2,) complex
    y_t[c] = 2 Re(C[c] h_t)               the conjugate half, folded into C as 2 C

which is lrnnx's Vandermonde kernel ``K[c, l] = 2 Re sum_n C[c, n] gamma_n B_n A_bar_n^l``.
The channels run through the diagonal LTI engine (:mod:`lrnnx_jax.core.lti`,
FFT or scan), mapped over ``H'``, from the zero state or a cache's state ``h0`` (the FFT
path adds ``2 Re(C A_bar^(t+1) h0)``); the surrounding block is :class:`S4Layer`. Where
:func:`pallas_kernels.diagonal_scan.choose` selects them (``kernel_config``), the recurrence runs on
the training-scan kernels instead (:func:`kernel_ssm_forward`; ``"auto"`` keeps the FFT and the XLA scan,
measured faster on an H200: :data:`pallas_kernels.diagonal_scan.POLICY`). The step
(``model.step``, ``model.multi_step``, the fused rollout) is the block's cell
(:meth:`S4Layer.cell`) with this diagonal SSM (no low-rank term).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lrnnx_jax.core import lti
from lrnnx_jax.core.discretization import get_discretization
from lrnnx_jax.models.lti.s4_layer import S4Layer, SSMParams
from pallas_kernels import diagonal_scan, scan_common
from pallas_kernels.cells import KernelPolicy

DISCRETIZATIONS = ("zoh", "bilinear")


@functools.partial(jax.jit, static_argnames="disc")
def discrete_system(params: SSMParams, disc: str):
    """``(A_bar (H', N/2), B_bar (H', N/2), C (c, H', N/2))`` with the factor 2 of the conjugate half in ``C``."""
    A_bar, gamma = get_discretization(disc, DISCRETIZATIONS)(params.A, params.dt)
    return A_bar, gamma * params.B, 2 * params.C


@functools.partial(jax.jit, static_argnames=("method", "chunk_size", "return_state"))
def ssm_forward(u, A_bar, B_bar, C, *, mask, lengths, method, chunk_size, return_state, h0=None):
    """Every channel through :func:`lti.diagonal_forward`, from the state ``h0 (B, H', N/2)`` (None: zeros).

    ``u (B, L, H')`` -> ``(y (B, L, c, H'), h_last (B, H', N/2) or None)``.
    """

    def run(u_h, A_h, B_h, C_h, h0_h):
        return lti.diagonal_forward(u_h, A_h, B_h, C_h, h0=h0_h, mask=mask, lengths=lengths, method=method,
                                    chunk_size=chunk_size, return_state=return_state)

    if h0 is not None:
        h0 = h0.astype(jnp.result_type(A_bar, B_bar))
    return jax.vmap(run, in_axes=(2, 0, 0, 1, None if h0 is None else 1), out_axes=(3, 1))(
        u[..., None], A_bar, B_bar[..., None], C, h0)


def kernel_ssm_forward(u, A_bar, B_bar, C, *, mask, h0=None, config=None):
    """:func:`ssm_forward` on the training-scan kernels: the ``(H', N/2)`` states of all channels as ``H' N/2``
    lanes of :func:`pallas_kernels.diagonal_scan.kernel_scan` (time-invariant ``A_bar``), the input ``B_bar u``
    ``(B, L, H' N/2)`` formed in XLA (the FFT path never forms it: its memory is the price of this path).

    Returns ``(y (B, L, c, H'), h_last (B, H', N/2))``, or None where the kernels are not selected under ``config``.
    """
    batch, length = u.shape[:2]
    lanes = A_bar.size
    b = (u[..., None] * B_bar).reshape(batch, length, lanes)
    h0 = None if h0 is None else h0.reshape(batch, lanes)
    scanned = diagonal_scan.model_scan(A_bar.reshape(lanes), b, h0, mask, config=config)
    if scanned is None:
        return None
    h, h_last = scanned
    h = h.reshape(batch, length, *A_bar.shape)
    y = jnp.real(jnp.einsum("blhs,chs->blch", h, C.astype(h.dtype), precision="highest"))
    return y.astype(u.dtype), h_last.reshape(batch, *A_bar.shape)


class S4D(S4Layer):
    """S4D block: :class:`S4Layer`'s arguments (lrnnx's), plus ``disc="zoh" | "bilinear"`` and ``kernel_config``
    (the ``pallas_kernels.KernelConfig`` of the forward's training-scan kernels, :func:`kernel_ssm_forward`;
    ``use_kernels="always"`` opts in; None: the default, read when the forward is traced).

    ``rank`` only matters to the NPLR initialisations (``init="legs"`` gives S4D-LegS,
    the diagonal of the DPLR HiPPO-LegS matrix); S4D has no low-rank term.
    Cache: ``{"lrnn_state": (B, H', N/2) complex}``.
    """

    kernel_policy = KernelPolicy(
        rollout_max_batch=None, step_max_batch=32,
        evidence="H200 (H=128, N=64): fused rollout 2.5-2.6 us/step against 7.3-10.2 for the XLA program at B=32 and "
                 "128, 64 against 88 at B=4096; one-step kernel against the XLA step 17.3 vs 17.3 us at B=1, 10.9 vs "
                 "14.7 at B=32, 186 vs 96 at B=4096",
    )

    def __init__(self, *args, disc: str = "zoh", kernel_config=None, **kwargs):
        get_discretization(disc, DISCRETIZATIONS)
        self.disc = disc
        self.kernel_config = scan_common.model_config(kernel_config)
        super().__init__(*args, **kwargs)

    @property
    def state_size(self) -> int:
        return self.d_state // 2

    def discrete_system(self):
        """See :func:`discrete_system`."""
        return discrete_system(self.ssm_params(), self.disc)

    def _ssm_forward(self, u, mask, lengths, return_state, h0=None):
        system = self.discrete_system()
        on_kernels = kernel_ssm_forward(u, *system, mask=mask, h0=h0, config=self.kernel_config)
        if on_kernels is not None:
            y, h_last = on_kernels
            return y, (h_last if return_state else None)
        return ssm_forward(
            u, *system, mask=mask, lengths=lengths, method=self.method,
            chunk_size=self.chunk_size, return_state=return_state, h0=h0,
        )

    def _ssm_cell_system(self):
        """The diagonal SSM (:func:`discrete_system`) without low-rank terms: the cell's step is
        ``h <- A_bar h + B_bar u`` per channel, ``y[c] = Re(2 C[c] h)`` over the half state."""
        return (*self.discrete_system(), [])
