"""The model shell shared by the diagonal complex SSMs (LRU, S5 LTI and LTV, Centaurus).

A subclass provides its discrete system, its skip term and (when the cache keeps
lrnnx's layout) the per-row shape of its state; the full-sequence forward (FFT,
chunked scan, or the training-scan kernels of :mod:`pallas_kernels.diagonal_scan` where
``kernel_config`` selects them) comes from :mod:`lrnnx_jax.core.lti`, and the step is the
diagonal cell of this module (:func:`diagonal_step`), which every step path runs.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import jax
import jax.numpy as jnp

from lrnnx_jax.core import lti, validation
from lrnnx_jax.core.base import LRNN, compute_dtype
from pallas_kernels import cells
from pallas_kernels import complex_lib as cl
from pallas_kernels import dispatch
from pallas_kernels import kernel_math as km

#: H200 measurements (BENCHMARKS.md §4): the fused rollout is faster than the XLA program at every measured batch
#: (LRU, Centaurus neck/pw), the one-step kernel faster than the XLA driver of the cell only at batch 1
DIAGONAL_POLICY = cells.KernelPolicy(
    rollout_max_batch=None, step_max_batch=1,
    evidence="H200 (H=128, N=64): fused rollout 1.4-2.0 us/step against 7.9-11.6 for the XLA program at B=32 and 128, "
             "15-18 against 24-30 at B=4096 (LRU, Centaurus neck/pw); one-step kernel against the XLA step: LRU 10.0 vs "
             "17.1 us at B=1, 30.6 vs 19.9 at B=32, 54.5 vs 35.3 at B=4096; Centaurus neck 9.0 vs 10.2 at B=1, 20.6 vs "
             "12.7 at B=32")


def diagonal_step(p, s, x, inputs, precision):
    """The diagonal cell: ``h = A_bar h_prev + B_bar x``, ``y = Re(C h) + skip(x)``.

    ``p``: ``B`` ``(N, H)`` and ``CT`` (``C`` transposed) ``(N, H)``, real or ``Planes``; with
    ``gamma`` ``(N,)`` ``Planes``, ``B`` is real and ``B_bar = gamma[:, None] * B`` (one real
    contraction, then the per-state factor: :meth:`DiagonalSSM.factored_input`);
    ``a`` ``(N,)`` ``Planes`` unless ``inputs`` has a per-row (event-mode) ``a``; the skip
    ``D`` ``(H,)`` (``y += D x``), or, for a dense skip ``x @ D``, ``direct`` ``(H, H)``: the input's whole
    path to the output, ``D + Re(C B_bar)^T``. With ``direct`` the output is read as
    ``Re(C (A_bar h_prev)) + x @ direct``, the same output, whose contractions do not wait for the state update
    (:meth:`DiagonalSSM.cell`). State ``{"h": Planes (N,)}``.
    """
    a = inputs["a"] if "a" in inputs else p["a"]
    B, CT = p["B"], p["CT"]
    decayed = cl.mul(a, s["h"])
    u = km.contract(x, cl.real(B), 1, precision)
    if cl.is_planes(B):
        u = cl.Planes(u, km.contract(x, B.im, 1, precision))
    if "gamma" in p:
        u = cl.mul(p["gamma"], u)
    h = cl.add(decayed, u)
    read = decayed if "direct" in p else h
    y = km.contract_real_part(read, CT, 0, precision)
    if "direct" in p:
        y = y + km.contract(x, p["direct"], 0, precision)
    if "D" in p:
        y = y + p["D"] * x
    return y, {"h": h}


def _planes_or_real(z, dtype):
    return cl.split(z, dtype) if jnp.iscomplexobj(z) else jnp.asarray(z, dtype)


class DiagonalSSM(LRNN):
    """Base of LRU, S5 and Centaurus: ``h_t = A_bar h_{t-1} + B_bar x_t``, ``y_t = Re(C h_t) + skip(x_t)``.

    Subclasses set ``d_state``, ``method``, ``chunk_size`` and ``kernel_config`` (their constructors' argument: the
    ``pallas_kernels.KernelConfig`` of the forward's training-scan kernels, ``use_kernels="always"`` opts in; None:
    the default, read when the forward is traced; ``"auto"`` keeps the FFT and the XLA scan, as measured on an H200:
    :data:`pallas_kernels.diagonal_scan.POLICY`) and implement
    :meth:`discrete_system`, :meth:`skip` and :meth:`skip_params`. The engine sees the
    state flat, ``(B, S)``; the cache holds it as ``(B, *state_shape())``.
    """

    d_state: int
    method: str
    chunk_size: int | None
    kernel_config: Optional[dispatch.KernelConfig] = None
    #: where "auto" runs the kernels (measured; a subclass may narrow it)
    kernel_policy: ClassVar[cells.KernelPolicy] = DIAGONAL_POLICY

    def discrete_system(self, integration_timesteps=None):
        """``(A_bar (N,) or (..., N) for timesteps of shape (...), B_bar (N, H), C (H, N))`` complex."""
        raise NotImplementedError

    def skip(self, x):
        """The direct term, ``x (..., H) -> (..., H)``."""
        raise NotImplementedError

    def skip_params(self) -> dict:
        """The skip as cell parameters: ``{"D": (H,)}`` (``D x``), ``{"D_full": (H, H)}`` (``x @ D``; :meth:`cell` folds
        it with ``C B_bar`` into the cell's ``direct``) or ``{}``."""
        raise NotImplementedError

    def factored_input(self, integration_timesteps, dtype) -> Optional[dict]:
        """The cell's input matrix as ``{"B": (N, H) real, "gamma": Planes (N,)}``, ``B_bar = gamma[:, None] * B``,
        for a model whose ``B_bar`` factors so with a real ``B`` (:func:`diagonal_step` then contracts one real
        plane instead of two); None (the default): the cell takes ``B_bar`` itself."""
        return None

    def state_shape(self) -> tuple[int, ...]:
        """Per-row shape of the cache's ``lrnn_state``; ``(d_state,)`` unless a model keeps another layout."""
        return (self.d_state,)

    def _forward(self, x, integration_timesteps, mask, lengths, return_cache, cache):
        A_bar, B_bar, C = self.discrete_system(integration_timesteps)
        h0 = None if cache is None else cache["lrnn_state"].reshape(x.shape[0], -1)
        y, h = lti.diagonal_forward(
            x, A_bar, B_bar, C, h0=h0, mask=mask, lengths=lengths, method=self.method,
            chunk_size=self.chunk_size, return_state=return_cache, kernel_config=self.kernel_config,
        )
        return y + self.skip(x), (None if h is None else {"lrnn_state": h.reshape(h.shape[:1] + self.state_shape())})

    # ------------------------------------------------------------------ the cell
    def cell(self) -> cells.Cell:
        # unit timesteps give the time-invariant A_bar (and one that the async discretization accepts;
        # in event mode the per-token A_bar comes from cell_inputs)
        unit = jnp.ones(()) if self.supports_integration_timesteps else None
        A_bar, B_bar, C = self.discrete_system(unit)
        dtype = compute_dtype(jnp.real(B_bar).dtype)
        params = {"a": cl.split(A_bar, dtype),
                  **(self.factored_input(unit, dtype) or {"B": _planes_or_real(B_bar, dtype)}),
                  "CT": _planes_or_real(C.T, dtype)}
        skip = self.skip_params()
        if "D_full" in skip:
            # a dense skip takes Re(C B_bar) in at no cost per step, and the output no longer waits for the update:
            # S5 LTI's fused rollout at B=1 2.37-2.47 us/step against 2.67-2.68 (H200, H=128, N=64); with a diagonal
            # skip or none the dense fold made LRU, S5 LTV and Centaurus 1.9x slower, so they keep the plain readout
            fold = jnp.real(jnp.matmul(C, B_bar, precision=jax.lax.Precision.HIGHEST)).T
            skip = {"direct": skip["D_full"] + fold}
        params.update({k: jnp.asarray(v, dtype) for k, v in skip.items()})
        return cells.Cell(diagonal_step, params, blockable=True, policy=self.kernel_policy)

    def cell_state(self, cache):
        h = cache["lrnn_state"]
        return {"h": cl.split(h.reshape(h.shape[0], -1), compute_dtype(jnp.real(h).dtype))}

    def cell_cache(self, state, like):
        ref = like["lrnn_state"]
        return {"lrnn_state": cl.merge(state["h"], ref.dtype).reshape(ref.shape)}

    def cell_inputs(self, shape, integration_timesteps=None):
        """Event mode: the per-token ``A_bar`` (``shape + (N,)``) from the timesteps."""
        if integration_timesteps is None:
            return {}
        A_bar = self.discrete_system(integration_timesteps)[0]
        return {"a": cl.split(A_bar, compute_dtype(jnp.real(A_bar).dtype))}

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int = 1, dtype=None):
        """``{"lrnn_state": (batch_size, *state_shape()) complex zeros}``."""
        batch_size, _ = validation.check_cache_size(batch_size, max_seqlen)
        return {"lrnn_state": jnp.zeros((batch_size,) + self.state_shape(), self._state_dtype(dtype, True))}
