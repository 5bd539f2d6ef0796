"""S5 (Smith et al., 2023), linear time-invariant form, as in lrnnx's ``models.lti.S5``.

    Lambda = -softplus(A[:, 0]) + i A[:, 1]               (N,) complex
    delta  = exp(log_dt)                                  (N,) one step per state
    A_bar, gamma = discretization(Lambda, delta)           lrnnx_jax.core.discretization
    h_t = A_bar * h_{t-1} + gamma * B x_t                 B (N, H) real
    y_t = kappa Re((C[..., 0] + i C[..., 1]) h_t) + x_t @ D   D (H, H) full matrix

``kappa = 2`` with ``conj_sym=True`` (each stored eigenvalue stands for a
conjugate pair), else 1. lrnnx raises ``NotImplementedError`` for ``conj_sym``.

Event mode: with ``integration_timesteps`` (B, L) the A-step of every token is
``delta * tau_t`` (asynchronous discretization), so the system is time-varying and
the forward takes the scan path.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lrnnx_jax.core import discretization as disc
from lrnnx_jax.core import lti, validation
from lrnnx_jax.core.base import lrnnx_entry
from lrnnx_jax.models.diagonal import DiagonalSSM
from lrnnx_jax.core.scan import DEFAULT_CHUNK_SIZE
from pallas_kernels import cells, scan_common
from pallas_kernels import complex_lib as cl


class S5(DiagonalSSM):
    """S5 with a diagonal complex state and lrnnx's parameterisation.

    Args:
      d_model: H (alias ``hid_dim``).
      d_state: N, complex state size (alias ``state_dim``).
      discretization: ``"zoh"``, ``"bilinear"``, ``"dirac"``, ``"async"`` (needs
        integration_timesteps) or ``"no_discretization"``.
      conj_sym: output ``2 Re(C h)`` (conjugate-symmetric state).
      method: full-sequence path for time-invariant input, ``"auto"``, ``"fft"`` or ``"scan"``.
      chunk_size: chunk of the scan path (None: one chunk).
      kernel_config: the ``pallas_kernels.KernelConfig`` of the training-scan kernels (see
        :class:`~lrnnx_jax.models.diagonal.DiagonalSSM`); None: the default.
    """

    supports_integration_timesteps = True
    kernel_policy = cells.KernelPolicy(
        rollout_max_batch=256, step_max_batch=0, hoist="largest",
        evidence="H200 (H=128, N=64): fused rollout 3.3 us/step against 11.5-11.9 for the XLA program at B=32 and 128, "
                 "269 against 33 on the block path at B=4096; one-step kernel against the XLA step 32.9 vs 12.8 us at "
                 "B=1, 12.9 vs 18.7 at B=32, 339 vs 62 at B=4096 (not faster over the range); hoist: the leaves of "
                 "largest total in registers (the dense skip held, 8,320 numbers re-read a step instead of 16,384) "
                 "2.56-2.82 / 2.67-2.82 us/step at B=1 / 32 against 3.45-3.49 / 3.34 for the smallest first, event "
                 "mode 2.70-2.73 / 2.68-2.76 against 3.21-3.40 / 3.31-3.57; the input as the real B times gamma "
                 "(factored_input) 2.48-2.57 / 2.65-2.66 against 2.81-3.11 / 2.94-3.03 with B_bar's two planes")

    def __init__(
        self,
        d_model: int | None = None,
        d_state: int | None = None,
        discretization: str | None = None,
        conj_sym: bool = False,
        *,
        hid_dim: int | None = None,
        state_dim: int | None = None,
        method: str = "auto",
        chunk_size: int | None = DEFAULT_CHUNK_SIZE,
        kernel_config=None,
        rngs: nnx.Rngs,
    ):
        d_model = d_model if d_model is not None else hid_dim
        d_state = d_state if d_state is not None else state_dim
        if d_model is None or d_state is None:
            raise TypeError("S5 needs d_model (or hid_dim) and d_state (or state_dim)")
        d_model = validation.check_positive_int(d_model, "d_model" if hid_dim is None else "hid_dim")
        d_state = validation.check_positive_int(d_state, "d_state" if state_dim is None else "state_dim")
        chunk_size = validation.check_chunk_size(chunk_size)
        if discretization is None:
            raise TypeError(f"S5 needs a discretization, one of {sorted(disc.DISCRETIZATIONS)}")
        self.discretize = disc.get_discretization(discretization)
        lti.resolve_method(method, 1, False)
        self.d_model, self.d_state = d_model, d_state
        self.discretization, self.conj_sym = discretization, conj_sym
        self.method, self.chunk_size = method, chunk_size
        self.kernel_config = scan_common.model_config(kernel_config)
        k_c, k_d = jax.random.split(rngs.params())
        self.A = nnx.Param(
            jnp.stack([jnp.full((d_state,), math.log(math.expm1(0.5))), math.pi * jnp.arange(d_state, dtype=jnp.float32)], -1)
        )
        self.B = nnx.Param(jnp.full((d_state, d_model), 1 / math.sqrt(d_model), jnp.float32))  # not weak-typed
        self.log_dt = nnx.Param(jnp.linspace(math.log(1e-3), math.log(1e-1), d_state))
        self.C = nnx.Param(jax.random.normal(k_c, (d_model, d_state, 2)) * math.sqrt(2 / d_state))
        self.D = nnx.Param(jax.random.normal(k_d, (d_model, d_model)) * math.sqrt(2 / d_model))

    def _discretized(self, integration_timesteps=None):
        """``(A_bar, gamma)`` of ``Lambda`` at the steps ``delta`` (times the timesteps)."""
        A = self.A[...]
        Lambda = -jax.nn.softplus(A[:, 0]) + 1j * A[:, 1]
        delta = jnp.exp(self.log_dt[...])
        tau = None if integration_timesteps is None else integration_timesteps[..., None]
        return self.discretize(Lambda, delta, tau)

    def discrete_system(self, integration_timesteps=None):
        """``(A_bar, B_bar (N, H), C (H, N))``.

        ``A_bar`` is ``(N,)``, or ``(..., N)`` for timesteps of shape ``(...)``.
        """
        A_bar, gamma = self._discretized(integration_timesteps)
        B_bar = gamma[:, None] * self.B[...]
        C = self.C[...]
        kappa = 2.0 if self.conj_sym else 1.0
        return A_bar, B_bar, kappa * (C[..., 0] + 1j * C[..., 1])

    def factored_input(self, integration_timesteps, dtype):
        """``B_bar = gamma[:, None] * B`` with lrnnx's real ``B``: where ``gamma`` is complex (zoh, bilinear, async)
        the cell contracts ``x`` with ``B`` once and multiplies by ``gamma`` (None where ``gamma`` is real: ``B_bar``
        is then real itself)."""
        gamma = self._discretized(integration_timesteps)[1]
        if not jnp.iscomplexobj(gamma):
            return None
        return {"B": jnp.asarray(self.B[...], dtype), "gamma": cl.split(gamma, dtype)}

    def skip(self, x):
        return x @ self.D[...]

    def skip_params(self):
        return {"D_full": self.D[...]}

    def lrnnx_entries(self):
        return {name: lrnnx_entry(getattr(self, name)) for name in ("A", "B", "log_dt", "C", "D")}
