"""The arithmetic inside the kernel bodies, written once for real and complex states.

These are the kernels' own versions of :mod:`lrnnx_jax.core.discretization`
(which stays the single definition that models and references use). They use
only elementwise operations that lower in Pallas kernels, take real arrays or
:class:`~pallas_kernels.complex_lib.Planes`, and are tested against the core
functions on random inputs (tests/test_pallas_kernel_math.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import complex_lib as cl

#: discretizations the kernels implement: those of lrnnx_jax.core.discretization, and the
#: gated transitions of RG-LRU (``rglru_coefficients``) and S7 (``s7_transition``)
DISCRETIZATIONS = ("zoh", "async", "bilinear", "dirac", "mamba", "no_discretization", "rglru", "s7")


def discretize(name: str, A, delta, delta_A=None):
    """``(A_bar, gamma)`` of ``h_t = A_bar h_{t-1} + gamma (B u_t)``.

    Args:
      name: one of :data:`DISCRETIZATIONS`.
      A: real array or ``Planes``; ``delta`` (and ``delta_A``, the A-step of event
        mode, ``delta`` when None) real arrays broadcastable against it.

    Returns:
      ``A_bar`` like ``A``; ``gamma`` real or ``Planes`` (for ``"dirac"``, ``"s7"``
      and ``"no_discretization"`` the scalar 1.0).

    ``"rglru"`` and ``"s7"`` are real-only: ``A`` is RG-LRU's ``a_log`` (``A_bar =
    sigmoid(A)^delta``, ``gamma = sqrt(1 - A_bar^2)``), and S7 ignores ``A``
    (``A_bar = 1 - 1/(delta^2 + 1/2)``, ``gamma = 1``).
    """
    step_A = delta if delta_A is None else delta_A
    if name == "no_discretization":
        return A, 1.0
    if name == "rglru":  # A = a_log (real): A_bar = sigmoid(A)^delta, gamma = sqrt(1 - A_bar^2)
        log_a_bar = -step_A * softplus(-A)
        one_minus_sq = jnp.maximum(-jnp.expm1(2.0 * log_a_bar), jnp.finfo(jnp.float32).tiny)
        return jnp.exp(log_a_bar), jnp.sqrt(one_minus_sq)
    if name == "s7":  # A is ignored; delta carries S7's a_t
        return 1.0 - 1.0 / (delta * delta + 0.5), 1.0
    if name == "bilinear":
        half = cl.scale(A, 0.5 * step_A)
        A_bar = cl.div(cl.add_real(half, 1.0), cl.add_real(cl.scale(half, -1.0), 1.0))
        gamma = cl.div(delta, cl.add_real(cl.scale(A, -0.5 * delta), 1.0))
        return A_bar, gamma
    A_bar = cl.exp(cl.scale(A, step_A))
    if name in ("zoh", "async"):
        return A_bar, cl.div(cl.expm1(cl.scale(A, delta)), A)
    if name == "mamba":
        return A_bar, delta
    if name == "dirac":
        return A_bar, 1.0
    raise ValueError(f"unknown discretization {name!r}; expected one of {sorted(DISCRETIZATIONS)}")


def softplus(x):
    """``log(1 + e^x)``, returning ``x`` above 20 (as lrnnx's kernels)."""
    return jnp.where(x <= 20.0, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))), x)


def silu(x):
    return x * jax.nn.sigmoid(x)
