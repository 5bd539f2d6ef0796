"""LRU: the Linear Recurrent Unit (Orvieto et al., 2023), as in lrnnx.

    lambda = exp(-exp(nu_log) + i exp(theta_log))          (N,) complex, |lambda| < 1
    h_t = lambda * h_{t-1} + (B_re + i B_im) diag(exp(gamma_log)) x_t
    y_t = Re((C_re + i C_im) h_t) + D * x_t

The state is parameterised directly in discrete time (no discretization), and,
as in lrnnx, there is no factor 2 and no conjugate symmetry.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lrnnx_jax.core import lti, validation
from lrnnx_jax.core.base import lrnnx_entry
from lrnnx_jax.models.diagonal import DiagonalSSM
from lrnnx_jax.core.scan import DEFAULT_CHUNK_SIZE
from pallas_kernels import scan_common


class LRU(DiagonalSSM):
    """Linear Recurrent Unit.

    Args:
      d_model: H, input and output features.
      d_state: N, complex state size.
      r_min, r_max: the eigenvalue moduli are drawn uniformly on the ring ``r_min <= |lambda| <= r_max``.
      max_phase: eigenvalue phases are drawn uniformly in ``[0, max_phase]``.
      method: full-sequence path, ``"auto"``, ``"fft"`` or ``"scan"``.
      chunk_size: chunk of the scan path (None: one chunk).
      kernel_config: the ``pallas_kernels.KernelConfig`` of the training-scan kernels (see
        :class:`~lrnnx_jax.models.diagonal.DiagonalSSM`); None: the default.
      rngs: ``nnx.Rngs`` (the ``params`` stream is used).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int,
        r_min: float = 0.0,
        r_max: float = 1.0,
        max_phase: float = 2 * math.pi,
        *,
        method: str = "auto",
        chunk_size: int | None = DEFAULT_CHUNK_SIZE,
        kernel_config=None,
        rngs: nnx.Rngs,
    ):
        d_model = validation.check_positive_int(d_model, "d_model")
        d_state = validation.check_positive_int(d_state, "d_state")
        chunk_size = validation.check_chunk_size(chunk_size)
        if not 0 <= r_min < r_max <= 1:
            raise ValueError(f"need 0 <= r_min < r_max <= 1, got r_min={r_min}, r_max={r_max}")
        lti.resolve_method(method, 1, False)
        self.d_model, self.d_state = d_model, d_state
        self.method, self.chunk_size = method, chunk_size
        self.kernel_config = scan_common.model_config(kernel_config)
        k = jax.random.split(rngs.params(), 6)
        u1 = jax.random.uniform(k[0], (d_state,))
        u2 = jax.random.uniform(k[1], (d_state,))
        nu_log = jnp.log(-0.5 * jnp.log(u1 * (r_max**2 - r_min**2) + r_min**2))
        theta_log = jnp.log(max_phase * u2)
        self.nu_log = nnx.Param(nu_log)
        self.theta_log = nnx.Param(theta_log)
        self.B_re = nnx.Param(jax.random.normal(k[2], (d_state, d_model)) / math.sqrt(2 * d_model))
        self.B_im = nnx.Param(jax.random.normal(k[3], (d_state, d_model)) / math.sqrt(2 * d_model))
        self.C_re = nnx.Param(jax.random.normal(k[4], (d_model, d_state)) / math.sqrt(d_state))
        self.C_im = nnx.Param(jax.random.normal(k[5], (d_model, d_state)) / math.sqrt(d_state))
        self.D = nnx.Param(jax.random.normal(rngs.params(), (d_model,)))
        modulus = jnp.exp(-jnp.exp(nu_log))
        self.gamma_log = nnx.Param(jnp.log(jnp.sqrt(1 - modulus**2)))

    def discrete_system(self, integration_timesteps=None):
        """``(A_bar (N,), B_bar (N, H), C (H, N))`` complex (LRU has no event mode)."""
        A_bar = jnp.exp(-jnp.exp(self.nu_log[...]) + 1j * jnp.exp(self.theta_log[...]))
        B_bar = (self.B_re[...] + 1j * self.B_im[...]) * jnp.exp(self.gamma_log[...])[:, None]
        C = self.C_re[...] + 1j * self.C_im[...]
        return A_bar, B_bar, C

    def skip(self, x):
        return self.D[...] * x

    def skip_params(self):
        return {"D": self.D[...]}

    def lrnnx_entries(self):
        names = ("nu_log", "theta_log", "B_re", "B_im", "C_re", "C_im", "D", "gamma_log")
        return {name: lrnnx_entry(getattr(self, name)) for name in names}
