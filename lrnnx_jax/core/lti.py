"""Diagonal linear time-invariant SSMs: the shared engine of LRU, S5, S4D and Centaurus.

A diagonal LTI SSM with (complex) state size ``N`` is ::

    h_t = A_bar * h_{t-1} + B_bar x_t        A_bar (N,), B_bar (N, H_in)
    y_t = Re(C h_t)                           C (H_out, N)

Models fold any constant output factor (S4D's 2·Re, conjugate symmetry, Centaurus'
sub-state mixing) into ``C``, and add their skip term themselves.

Two parallel paths compute the full sequence:

* ``"fft"``: causal convolution with the materialised kernel ``K[l] = A_bar**l``
  by FFT, with the cheaper of two contraction orders;
* ``"scan"``: :func:`lrnnx_jax.core.scan.chunked_scan`, which also accepts a
  time-varying ``A_bar`` (B, L, N) (event mode).

``method="auto"`` picks FFT for time-invariant systems on sequences of at least
:data:`FFT_MIN_LENGTH` steps, and the scan otherwise. Where
:func:`pallas_kernels.diagonal_scan.choose` selects them under ``kernel_config``
(``use_kernels="always"`` opts in; ``"auto"`` keeps the paths above, as measured on an H200:
:data:`pallas_kernels.diagonal_scan.POLICY`), :func:`kernel_forward` runs the recurrence on the training-scan
kernels instead, whatever ``method`` says. The single-step update is
:func:`diagonal_step`; every path uses the same :func:`inject` and :func:`readout`.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from lrnnx_jax.core import scan as scan_lib
from pallas_kernels import diagonal_scan as scan_kernels

METHODS = ("auto", "fft", "scan")
FFT_MIN_LENGTH = 64


def inject(x, B_bar):
    """Input to the state: ``x (..., H_in) -> (..., N)`` complex, ``B_bar x``.

    A real ``x`` meets the real and imaginary planes of a complex ``B_bar`` in one real contraction
    (``(..., H_in) @ (H_in, 2N)``), not a complex one against an ``x`` with a zero imaginary part,
    which would do twice the multiplies (and twice again in the backward).
    """
    if jnp.iscomplexobj(x) or not jnp.iscomplexobj(B_bar):
        return jnp.einsum("...i,ni->...n", x.astype(B_bar.dtype), B_bar, precision="highest")
    planes = jnp.concatenate([jnp.real(B_bar), jnp.imag(B_bar)], axis=0)  # (2N, H_in)
    both = jnp.einsum("...i,ni->...n", x.astype(planes.dtype), planes, precision="highest")
    n = B_bar.shape[0]
    return jax.lax.complex(both[..., :n], both[..., n:])


def readout(h, C):
    """Output of the state: ``h (..., N) -> (..., H_out)`` real, ``Re(C h)``.

    ``Re(C h) = Re(C) Re(h) - Im(C) Im(h)``: one real contraction over the ``2N`` planes (the
    complex product's imaginary part is never formed); ``Re(C) Re(h)`` for a real ``C``.
    """
    if not jnp.iscomplexobj(h):
        return jnp.einsum("...n,on->...o", h, jnp.real(C).astype(h.dtype), precision="highest")
    real = jnp.real(h).dtype
    if not jnp.iscomplexobj(C):
        return jnp.einsum("...n,on->...o", jnp.real(h), C.astype(real), precision="highest")
    planes = jnp.concatenate([jnp.real(C), -jnp.imag(C)], axis=1).astype(real)  # (H_out, 2N)
    return jnp.einsum("...n,on->...o", jnp.concatenate([jnp.real(h), jnp.imag(h)], axis=-1), planes,
                      precision="highest")


def diagonal_step(h, x_t, A_bar, B_bar, C):
    """One recurrence step. ``h (B, N)``, ``x_t (B, H_in)`` -> ``(y_t (B, H_out), h_new (B, N))``."""
    h_new = A_bar * h + inject(x_t, B_bar)
    return readout(h_new, C), h_new


def kernel_powers(A_bar, length: int):
    """``K[l, n] = A_bar[n] ** l`` for ``l < length``, shape ``(length, N)``."""
    steps = jnp.arange(length, dtype=jnp.real(A_bar).dtype)[:, None]
    return jnp.exp(steps * jnp.log(A_bar.astype(jnp.result_type(A_bar, jnp.complex64)))[None, :])


def _causal_fft_conv(u, k, axis_u: int = 1):
    """Causal convolution along time of complex ``u (B, L, N)`` with ``k (L, N)``."""
    length = u.shape[axis_u]
    n = 2 * length
    out = jnp.fft.ifft(jnp.fft.fft(u, n=n, axis=1) * jnp.fft.fft(k, n=n, axis=0)[None], axis=1)
    return out[:, :length]


def _fft_costs(batch, length, n_state, h_in, h_out):
    log = math.log2(max(2 * length, 2))
    project_first = batch * length * n_state * (h_in + h_out) + 3 * batch * 2 * length * n_state * log
    kernel_first = (
        length * n_state * h_in * h_out
        + length * h_in * h_out * 2 * log
        + batch * length * (h_in + h_out) * log
        + batch * length * h_in * h_out
    )
    return project_first, kernel_first


def fft_forward(x, A_bar, B_bar, C, h0=None, lengths=None, return_state=False):
    """FFT path. ``x (B, L, H_in)`` real -> ``(y (B, L, H_out), h_last (B, N) or None)``.

    ``lengths`` (B,) selects the step whose state is returned (the inputs at and
    after it must already be zero).
    """
    batch, length, h_in = x.shape
    h_out = C.shape[0]
    K = kernel_powers(A_bar, length)  # (L, N)
    project_first, kernel_first = _fft_costs(batch, length, A_bar.shape[0], h_in, h_out)
    u = None
    if project_first <= kernel_first or return_state:
        u = inject(x, B_bar)
    if project_first <= kernel_first:
        y = readout(_causal_fft_conv(u, K), C)
    else:
        kernel = jnp.real(jnp.einsum("ln,on,ni->loi", K, C.astype(K.dtype), B_bar.astype(K.dtype), precision="highest"))
        n = 2 * length
        X = jnp.fft.rfft(x, n=n, axis=1)
        KF = jnp.fft.rfft(kernel.astype(x.dtype), n=n, axis=0)
        y = jnp.fft.irfft(jnp.einsum("bfi,foi->bfo", X, KF, precision="highest"), n=n, axis=1)[:, :length]
    if h0 is not None:
        powers = K * A_bar[None, :]  # A_bar ** (t + 1)
        y = y + readout(powers[None] * h0[:, None, :], C)
    h_last = None
    if return_state:
        ends = jnp.full((batch,), length) if lengths is None else lengths
        back = ends[:, None] - 1 - jnp.arange(length)[None, :]  # (B, L): power applied to u_t
        weights = jnp.where((back >= 0)[..., None], K[jnp.clip(back, 0, length - 1)], 0)
        h_last = jnp.sum(weights * u, axis=1)
        if h0 is not None:
            h_last = h_last + jnp.exp(ends[:, None] * jnp.log(A_bar.astype(K.dtype))[None]) * h0
    return y.astype(x.dtype), h_last


def scan_forward(x, A_bar, B_bar, C, h0=None, mask=None, chunk_size=scan_lib.DEFAULT_CHUNK_SIZE):
    """Scan path. ``A_bar`` is ``(N,)`` or time-varying ``(B, L, N)``.

    Returns ``(y (B, L, H_out), h_last (B, N))``.
    """
    batch = x.shape[0]
    time_varying = A_bar.ndim == 3
    inputs = (x, A_bar) if time_varying else (x,)
    dtype = jnp.result_type(A_bar, B_bar, jnp.complex64)
    if h0 is None:
        h0 = jnp.zeros((batch, A_bar.shape[-1]), dtype)

    def coefficients(chunk):
        a = chunk[1] if time_varying else A_bar[None, None, :]
        return a, inject(chunk[0], B_bar)

    def chunk_readout(h, chunk):
        return readout(h, C)

    y, h_last = scan_lib.chunked_scan(coefficients, chunk_readout, inputs, h0.astype(dtype), mask, chunk_size)
    return y.astype(x.dtype), h_last


def kernel_forward(x, A_bar, B_bar, C, h0=None, mask=None, config=None):
    """The kernel path: :func:`inject`, the recurrence on :func:`pallas_kernels.diagonal_scan.kernel_scan`, then
    :func:`readout`; ``A_bar`` ``(N,)`` or time-varying ``(B, L, N)``.

    Returns ``(y (B, L, H_out), h_last (B, N))``, or None where the kernels are not selected under ``config`` (a
    ``KernelConfig``, or None: the default, read when this is traced).
    """
    scanned = scan_kernels.model_scan(A_bar, inject(x, B_bar), h0, mask, config=config)
    if scanned is None:
        return None
    h, h_last = scanned
    return readout(h, C).astype(x.dtype), h_last


def resolve_method(method: str, length: int, time_varying: bool) -> str:
    """Resolve ``"auto"`` and validate ``method`` (``"auto"``, ``"fft"`` or ``"scan"``)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "fft" and time_varying:
        raise ValueError(
            "method='fft' needs a time-invariant system; with integration_timesteps the "
            "system is time-varying, use method='scan' (or 'auto')"
        )
    if method == "auto":
        return "fft" if (not time_varying and length >= FFT_MIN_LENGTH) else "scan"
    return method


def diagonal_forward(
    x,
    A_bar,
    B_bar,
    C,
    *,
    h0=None,
    mask: Optional[jax.Array] = None,
    lengths: Optional[jax.Array] = None,
    method: str = "auto",
    chunk_size: Optional[int] = scan_lib.DEFAULT_CHUNK_SIZE,
    return_state: bool = False,
    kernel_config=None,
):
    """Full-sequence output of a diagonal LTI (or event-mode) SSM.

    Args:
      x: ``(B, L, H_in)`` real input (already zero at masked positions).
      A_bar: ``(N,)``, or ``(B, L, N)`` when time-varying.
      B_bar: ``(N, H_in)``; C: ``(H_out, N)``.
      h0: optional initial state ``(B, N)``.
      mask, lengths: the ``(B, L)`` validity mask and the ``(B,)`` lengths it came from.
      method: ``"auto"``, ``"fft"`` or ``"scan"``.
      kernel_config: the ``pallas_kernels.KernelConfig`` of :func:`kernel_forward` (None: the default).

    Returns:
      ``(y (B, L, H_out), h_last (B, N) or None)``.
    """
    method = resolve_method(method, x.shape[1], A_bar.ndim == 3)
    on_kernels = kernel_forward(x, A_bar, B_bar, C, h0=h0, mask=mask, config=kernel_config)
    if on_kernels is not None:
        y, h_last = on_kernels
        return y, (h_last if return_state else None)
    if method == "fft":
        return fft_forward(x, A_bar, B_bar, C, h0=h0, lengths=lengths, return_state=return_state)
    y, h_last = scan_forward(x, A_bar, B_bar, C, h0=h0, mask=mask, chunk_size=chunk_size)
    return y, (h_last if return_state else None)
