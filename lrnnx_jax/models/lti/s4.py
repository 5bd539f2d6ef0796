"""S4: the structured state space with a diagonal-plus-low-rank (DPLR) state matrix, as in lrnnx.

Each of the ``H'`` SSM channels is a single-input system over the full
conjugate-symmetric state of size ``N`` (the parameters hold one half;
``conj_pairs`` rebuilds ``[z, conj z]``)::

    A = diag(Lambda) - P Q^T,  Q = conj(P)        Lambda (N,), P (r, N)
    h' = A h + B u,            y[c] = Re(C[c] h)   (real for conjugate-symmetric h)

**Discretization** (bilinear, step ``dt`` per channel or per state)::

    dA = (I - dt A/2)^{-1} (I + dt A/2),   dB = (I - dt A/2)^{-1} dt B

is the diagonal bilinear transform of ``Lambda`` (``core.discretization.bilinear``,
giving ``A_bar`` and ``gamma``) plus a rank-``r`` Woodbury correction::

    W  = (I_r + Q diag(gamma/2) P^T)^{-1}
    dA = diag(A_bar) - (gamma P)^T W ((1 + A_bar)/2 Q)
    dB = gamma B - (gamma P / 2)^T W Q (gamma B)

(:func:`dplr_factors`; the step steps with these factors in ``O(N r)`` per channel
instead of the dense ``dA``, see below).

**Kernel** (``method="fft"``): ``K_l = Re(C dA^l dB)`` for ``l < L`` from the truncated
generating function at the ``L``-th roots of unity ``w``::

    sum_{l<L} K_l w^l = C~ (I - w dA)^{-1} dB,       C~ = C (I - dA^L)
                      = s_{C~B} - a s_{C~P} (I_r + a s_{QP})^{-1} s_{QB},   a = (1 + w)/2
    s_{xy}(w) = sum_n x_n y_n gamma_n / (1 - w A_bar_n)    (Cauchy sums)

then an inverse real FFT. This is lrnnx's Cauchy/Woodbury kernel (its
``z = 2(1-w)/(1+w)`` form times ``2/(1+w)``) rewritten without the pole at ``w = -1``.
lrnnx stores ``C~`` for one length in its parameter ``C``; here ``C`` is the output
matrix itself and ``C~`` is computed for the length at hand (``from_lrnnx`` converts).

**Scan** (``method="scan"``): the dense recurrence ``h_t = dA h_{t-1} + dB u_t``
solved in chunks by a Kogge-Stone doubling scan (``log2(chunk)`` rounds
``h_t += dA^(2^k) h_{t-2^k}``) with the state carried across chunks; it does not use
the kernel, so the two paths check each other.

**From a state** (a cache ``h0``, chunked prefill): the scan starts from ``h0``; the FFT
path adds ``Re(C dA^(t+1) h0)`` to the outputs and ``dA^(ends) h0`` to the final state,
with the sequence ``dA^k h0`` computed by doubling (:func:`power_sequence`, shared with
:func:`state_kernel`).

**Step** (``model.step``, ``model.multi_step``, the fused Pallas rollout): the block's cell
(:meth:`S4Layer.cell`) with the factored DPLR update
``h <- A_bar h - sum_s L_s (R_s . h) + dB u`` (:func:`dplr_step_system`), ``O(N r)`` per
channel on every path: the same recurrence as the dense ``dA`` (lrnnx's dense step mode),
never the ``N x N`` matrix. Cache: ``{"lrnn_state": (B, H', N) complex}``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrnnx_jax.core import lti
from lrnnx_jax.core.base import LrnnxEntry
from lrnnx_jax.core.discretization import bilinear
from lrnnx_jax.models.lti.s4_layer import S4Layer, SSMParams, as_real_view, conj_pairs
from pallas_kernels.cells import KernelPolicy


class DPLRSystem(NamedTuple):
    """The bilinear-discretized S4 system of ``H'`` channels over the full state ``N``.

    ``A_bar, gamma (H', N)``: the diagonal bilinear transform of ``Lambda``;
    ``P (r, H', N)``; ``B (H', N)``; ``C (c, H', N)``; ``dA (H', N, N)``, ``dB (H', N)``.
    """

    A_bar: jax.Array
    gamma: jax.Array
    P: jax.Array
    B: jax.Array
    C: jax.Array
    dA: jax.Array
    dB: jax.Array


def _matvec(M, h):
    """``M (H, N, N)`` applied to ``h (..., H, N)``."""
    return jnp.einsum("hnm,...hm->...hn", M, h, precision="highest")


def _matmul(a, b):
    return jnp.matmul(a, b, precision="highest")


def matrix_power(M, n: int):
    """``M^n`` (``n >= 1``) of ``M (..., N, N)`` by repeated squaring, at full matmul precision."""
    result, square = None, M
    while True:
        if n & 1:
            result = square if result is None else _matmul(result, square)
        n >>= 1
        if not n:
            return result
        square = _matmul(square, square)


def dplr_factors(A_bar, gamma, P, B):
    """The bilinear DPLR system in factored form: ``(left (r, H, N), right (H, r, N), dB (H, N))``.

    ``dA = diag(A_bar) - left^T right`` per channel (``left = gamma P``,
    ``right = W ((1 + A_bar)/2 Q)``), so ``dA h = A_bar h - sum_s left[s] (right[s] . h)``
    costs ``O(N r)``. ``A_bar, gamma (H, N)`` are ``core.discretization.bilinear(Lambda, dt)``;
    ``P (r, H, N)``, ``B (H, N)``.
    """
    Q = jnp.conj(P)
    eye = jnp.eye(P.shape[0], dtype=P.dtype)
    core = eye + 0.5 * jnp.einsum("rhn,hn,shn->hrs", Q, gamma, P, precision="highest")  # (H, r, r)
    left = gamma * P
    right = jnp.linalg.solve(core, jnp.moveaxis((1 + A_bar) / 2 * Q, 0, 1))  # (H, r, N)
    coupling = jnp.linalg.solve(core, jnp.einsum("shm,hm->hs", Q, gamma * B, precision="highest")[..., None])[..., 0]
    dB = gamma * B - 0.5 * jnp.einsum("rhn,hr->hn", left, coupling, precision="highest")
    return left, right, dB


def dplr_bilinear(A_bar, gamma, P, B):
    """Dense ``(dA (H, N, N), dB (H, N))`` of ``A = diag(Lambda) - P conj(P)^T``, from :func:`dplr_factors`."""
    left, right, dB = dplr_factors(A_bar, gamma, P, B)
    dA = jax.vmap(jnp.diag)(A_bar) - jnp.einsum("rhn,hrm->hnm", left, right, precision="highest")
    return dA, dB


def _full_state(params: SSMParams):
    """``(A_bar, gamma, P, B, C)`` over the full state: the half-state parameters expanded and
    ``Lambda`` bilinear-discretized (``core.discretization.bilinear``)."""
    dt = params.dt if params.dt.shape[-1] == 1 else conj_pairs(params.dt)
    A_bar, gamma = bilinear(conj_pairs(params.A), dt)
    return A_bar, gamma, conj_pairs(params.P), conj_pairs(params.B), conj_pairs(params.C)


@jax.jit
def dplr_system(params: SSMParams) -> DPLRSystem:
    """Expand the half-state parameters and discretize them (see the module docstring)."""
    A_bar, gamma, P, B, C = _full_state(params)
    dA, dB = dplr_bilinear(A_bar, gamma, P, B)
    return DPLRSystem(A_bar, gamma, P, B, C, dA, dB)


@jax.jit
def dplr_step_system(params: SSMParams):
    """The step's system, never the dense ``dA``: ``(A_bar, dB (H', N), C (c, H', N), left (r, H', N),
    right (H', r, N))`` with ``dA = diag(A_bar) - left^T right`` per channel (:func:`dplr_factors`)."""
    A_bar, gamma, P, B, C = _full_state(params)
    left, right, dB = dplr_factors(A_bar, gamma, P, B)
    return A_bar, dB, C, left, right


def truncated_output(system: DPLRSystem, length: int):
    """``C~ = C (I - dA^length)`` ``(c, H, N)``: the output row of the length-``length`` generating function."""
    return system.C - jnp.einsum("chn,hnm->chm", system.C, matrix_power(system.dA, length), precision="highest")


def dplr_kernel(system: DPLRSystem, length: int):
    """The convolution kernel ``K (c, H, length)``, ``K_l = Re(C dA^l dB)``, by Cauchy sums and Woodbury."""
    rank = system.P.shape[0]
    freq = jnp.arange(length // 2 + 1, dtype=jnp.real(system.A_bar).dtype)
    omega = jnp.exp(-2j * math.pi / length * freq).astype(system.A_bar.dtype)  # (F,)
    cauchy = system.gamma[:, None, :] / (1 - omega[None, :, None] * system.A_bar[:, None, :])  # (H, F, N)
    rows = jnp.concatenate([truncated_output(system, length), jnp.conj(system.P)])  # [C~; Q] (c + r, H, N)
    cols = jnp.concatenate([system.B[None], system.P])  # [B; P] (1 + r, H, N)
    s = jnp.einsum("ihn,jhn,hfn->hfij", rows, cols, cauchy, precision="highest")  # (H, F, c + r, 1 + r)
    s_CB, s_CP, s_QB, s_QP = s[..., :-rank, 0], s[..., :-rank, 1:], s[..., -rank:, 0], s[..., -rank:, 1:]
    a = ((1 + omega) / 2)[None, :, None]
    eye = jnp.eye(rank, dtype=s.dtype)
    coupling = jnp.linalg.solve(eye + a[..., None] * s_QP, s_QB[..., None])[..., 0]  # (H, F, r)
    k_f = s_CB - a * jnp.einsum("hfcr,hfr->hfc", s_CP, coupling, precision="highest")
    return jnp.fft.irfft(jnp.moveaxis(k_f, (0, 1), (1, 2)), n=length, axis=-1)


def fft_convolve(u, K):
    """Causal convolution of ``u (B, L, H)`` with ``K (c, H, L)`` -> ``(B, L, c, H)``."""
    length = u.shape[1]
    n = 2 * length
    U = jnp.fft.rfft(u, n=n, axis=1)
    KF = jnp.fft.rfft(K, n=n, axis=-1)
    return jnp.fft.irfft(jnp.einsum("bfh,chf->bfch", U, KF, precision="highest"), n=n, axis=1)[:, :length]


def inject(u, dB):
    """``dB u``: ``u (..., H)`` -> ``(..., H, N)``."""
    return u[..., None].astype(dB.dtype) * dB


def readout(h, C):
    """``Re(C h)``: ``h (..., H, N)`` -> ``(..., c, H)``."""
    return jnp.real(jnp.einsum("chn,...hn->...ch", C.astype(h.dtype), h, precision="highest"))


def power_sequence(dA, v, length: int):
    """``dA^k v`` for ``k < length``: ``v (..., H, N)`` -> ``(length, ..., H, N)``, by doubling
    (``log2(length)`` rounds, each applying ``dA^(2^j)`` to the whole sequence so far)."""
    W, power = v[None], dA
    while W.shape[0] < length:
        W = jnp.concatenate([W, _matvec(power, W)])
        if W.shape[0] < length:
            power = _matmul(power, power)
    return W[:length]


def state_kernel(system: DPLRSystem, length: int):
    """``W_k = dA^k dB`` for ``k < length``, ``(length, H, N)``, by doubling."""
    return power_sequence(system.dA, system.dB, length)


def initial_state_terms(system: DPLRSystem, h0, ends, length: int):
    """What the state ``h0 (B, H, N)`` before the sequence adds: ``(Re(C dA^(t+1) h0) (B, length, c, H),
    dA^(ends) h0 (B, H, N))``."""
    powers = power_sequence(system.dA, h0, length + 1)  # (length + 1, B, H, N)
    y = readout(jnp.moveaxis(powers[1:], 0, 1), system.C)
    return y, powers[ends, jnp.arange(h0.shape[0])]


def final_state(system: DPLRSystem, u, ends):
    """The state after step ``ends - 1`` of each row: ``sum_k W_k u_{ends-1-k}``. ``u (B, L, H)`` -> ``(B, H, N)``."""
    back = ends[:, None] - 1 - jnp.arange(u.shape[1])[None, :]  # (B, L): index of the input that W_k multiplies
    u_back = jnp.where((back >= 0)[..., None], jnp.take_along_axis(u, jnp.maximum(back, 0)[..., None], axis=1), 0)
    return jnp.einsum("khn,bkh->bhn", state_kernel(system, u.shape[1]), u_back.astype(system.dB.dtype), precision="highest")


def dense_scan(system: DPLRSystem, u, ends, chunk_size, h0=None):
    """Scan path: ``u (B, L, H)`` from ``h0 (B, H, N)`` (None: zeros) -> ``(y (B, L, c, H), state after
    step ends - 1 (B, H, N))``.

    Chunks of ``chunk_size`` steps (None: one chunk) are solved by a doubling scan and
    chained by ``lax.scan``; the chunk body is rematerialised in the backward pass.
    """
    batch, length, width = u.shape
    chunk = length if chunk_size is None else max(1, min(int(chunk_size), length))
    num_chunks = -(-length // chunk)
    u = jnp.pad(u, ((0, 0), (0, num_chunks * chunk - length), (0, 0)))
    chunks = jnp.moveaxis(u.reshape(batch, num_chunks, chunk, width), 1, 0)
    powers, power, span = [], system.dA, 1  # dA^(2^k) for 2^k < chunk
    while span < chunk:
        powers.append(power)
        power, span = _matmul(power, power), 2 * span
    if h0 is None:
        h0 = jnp.zeros((batch, width, system.dB.shape[-1]), system.dB.dtype)
    h0 = h0.astype(system.dB.dtype)

    def body(carry, inputs):
        h_prev, h_end = carry
        u_chunk, start = inputs
        h = inject(u_chunk, system.dB)
        h = h.at[:, 0].add(_matvec(system.dA, h_prev))
        for k, power in enumerate(powers):  # h_t += dA^(2^k) h_{t - 2^k}
            h = h + _matvec(power, jnp.pad(h, ((0, 0), (2**k, 0), (0, 0), (0, 0)))[:, :chunk])
        offset = ends - 1 - start
        at = jnp.take_along_axis(h, jnp.clip(offset, 0, chunk - 1)[:, None, None, None], axis=1)[:, 0]
        h_end = jnp.where(((offset >= 0) & (offset < chunk))[:, None, None], at, h_end)
        return (h[:, -1], h_end), readout(h, system.C)

    starts = jnp.arange(num_chunks) * chunk
    (_, h_end), y = jax.lax.scan(jax.checkpoint(body), (h0, h0), (chunks, starts))
    y = jnp.moveaxis(y, 0, 1).reshape(batch, num_chunks * chunk, *y.shape[3:])
    return y[:, :length], h_end


@functools.partial(jax.jit, static_argnames=("method", "chunk_size", "return_state"))
def dplr_forward(system: DPLRSystem, u, *, lengths=None, method="auto", chunk_size=None, return_state=False, h0=None):
    """Full sequence from the state ``h0 (B, H, N)`` (None: zeros): ``u (B, L, H)`` (zero after ``lengths``)
    -> ``(y (B, L, c, H), state after each row's last valid step (B, H, N) or None)``."""
    batch, length, _ = u.shape
    ends = jnp.full((batch,), length) if lengths is None else lengths
    if lti.resolve_method(method, length, False) == "scan":
        y, h = dense_scan(system, u, ends, chunk_size, h0)
        return y.astype(u.dtype), (h if return_state else None)
    y = fft_convolve(u, dplr_kernel(system, length))
    h = final_state(system, u, ends) if return_state else None
    if h0 is not None:
        y_h0, h_h0 = initial_state_terms(system, h0.astype(system.dB.dtype), ends, length)
        y = y + y_h0
        h = None if h is None else h + h_h0
    return y.astype(u.dtype), h


def output_from_lrnnx(system: DPLRSystem, C_tilde, l_kernel: int):
    """Undo lrnnx's in-place ``C~ = C (I - dA^l_kernel)``: the half-state output matrix ``(c, H, N/2)``."""
    M = jnp.eye(system.dA.shape[-1], dtype=system.dA.dtype) - matrix_power(system.dA, l_kernel)
    C = jnp.linalg.solve(jnp.swapaxes(M, -1, -2)[None], conj_pairs(C_tilde)[..., None])[..., 0]
    return C[..., : C_tilde.shape[-1]]


class S4(S4Layer):
    """S4 block: :class:`S4Layer`'s arguments (lrnnx's), with the DPLR SSM of this module.

    Loading an lrnnx checkpoint (``from_lrnnx``) converts its ``C`` from ``C~`` back to
    the output matrix using ``layer.kernel.l_kernel`` (0: never converted by lrnnx).
    """

    low_rank = True
    split_channels = True
    cache_carry = {"lrnn_state": "dense"}  # the DPLR step mixes the state (diag(A_bar) - L R^T)
    lrnnx_ignored_entries = S4Layer.lrnnx_ignored_entries + ("layer.kernel.P",)
    kernel_policy = KernelPolicy(
        rollout_max_batch=32, step_max_batch=0,
        evidence="H200 (H=128, N=64, rank 1): the fused rollout split over programs (split_channels: 8 programs per "
                 "row at B=1, 4 at B=32) 4.13 / 4.64 / 5.13 us/step against 9.68 / 11.2 / 10.4 for the XLA program at "
                 "B=1 / 8 / 32; unsplit, 14.3 / 392 against 14.3 / 241 at B=128 / 4096 (the XLA program steps in the "
                 "factored O(N r) form). One-step kernel against the XLA step 51.1 vs 36.8 us at B=1, 43.9 vs 46.2 at "
                 "B=32, 636 vs 300 at B=4096. The XLA program at unroll 2 against 8: capture 1.68 vs 6.46 s at B=1 "
                 "(9.3 vs 9.8 us per step), 2.31 vs 6.22 s at B=32 (12.6 vs 12.0 us)",
        xla_unroll=2,
    )

    @property
    def state_size(self) -> int:
        return self.d_state

    def discrete_system(self) -> DPLRSystem:
        """See :func:`dplr_system`."""
        return dplr_system(self.ssm_params())

    def _ssm_forward(self, u, mask, lengths, return_state, h0=None):
        return dplr_forward(
            self.discrete_system(), u, lengths=lengths, method=self.method, chunk_size=self.chunk_size,
            return_state=return_state, h0=h0,
        )

    def _ssm_cell_system(self):
        """The factored DPLR system (:func:`dplr_step_system`): the ``rank`` pairs ``(L_s, R_s)``
        of ``dA = diag(A_bar) - sum_s L_s R_s^T``, over the full state ``N``."""
        A_bar, dB, C, left, right = dplr_step_system(self.ssm_params())
        return A_bar, dB, C, list(zip(left, jnp.moveaxis(right, 1, 0)))

    def lrnnx_entries(self):
        entries = super().lrnnx_entries()
        # Runs after every other entry (dicts keep their order): C then holds lrnnx's C~.
        entries["layer.kernel.l_kernel"] = LrnnxEntry((), self._load_l_kernel)
        return entries

    def _load_l_kernel(self, l_kernel):
        l_kernel = int(np.asarray(l_kernel))
        if l_kernel == 0:
            return
        graphdef, state = nnx.split(self)
        with jax.enable_x64(True):
            widen = lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a  # noqa: E731
            model = nnx.merge(graphdef, jax.tree.map(widen, state))
            C = output_from_lrnnx(model.discrete_system(), model.ssm_params().C, l_kernel)
            C = jnp.real(C) if self.is_real else as_real_view(C)
            self.C.set_value(jnp.asarray(np.asarray(C), jnp.float32))
