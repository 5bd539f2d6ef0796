"""HiPPO matrices and the S5 paper's DPLR initialisation (NumPy, float64, run at construction).

Shared by S5 (LTV), S7 and the S4 family's initialisers.
"""

from __future__ import annotations

import numpy as np


def make_HiPPO(N: int) -> np.ndarray:
    """The HiPPO-LegS matrix ``(N, N)``: ``-(tril(p p^T) - diag(n))`` with ``p_n = sqrt(1 + 2n)``."""
    p = np.sqrt(1 + 2 * np.arange(N))
    return -(np.tril(p[:, None] * p[None, :]) - np.diag(np.arange(N)))


def make_NPLR_HiPPO(N: int):
    """``(A, P, B)``: HiPPO-LegS with its normal-plus-low-rank factor ``P_n = sqrt(n + 1/2)``."""
    n = np.arange(N)
    return make_HiPPO(N), np.sqrt(n + 0.5), np.sqrt(2 * n + 1.0)


def make_DPLR_HiPPO(N: int):
    """Diagonalise the normal part of HiPPO-LegS.

    Returns ``(Lambda (N,) complex, P (N,), B (N,), V (N, N), B_orig (N,))`` with
    ``Re Lambda = -1/2`` and ``A + P P^T = V diag(Lambda) V^H``; ``P`` and ``B`` are
    expressed in the eigenbasis (``V^H P``, ``V^H B``).
    """
    A, P, B = make_NPLR_HiPPO(N)
    S = A + P[:, None] * P[None, :]
    real = np.mean(np.diagonal(S)) * np.ones(N)
    imag, V = np.linalg.eigh(S * -1j)
    return real + 1j * imag, V.conj().T @ P, V.conj().T @ B, V, B
