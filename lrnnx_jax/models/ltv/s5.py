"""S5 (Smith et al., 2023) with event mode, as in lrnnx's ``models.ltv.S5``.

    Lambda = A[:, 0] + i A[:, 1]                          (P,) complex, unconstrained
    delta  = exp(log_dt) * step_rescale                   (P,) one step per state
    A_bar_t, gamma = discretization(Lambda, delta, tau_t)  lrnnx_jax.core.discretization
    s_t = A_bar_t * s_{t-1} + gamma * (B~ x_t)            B~ = B[..., 0] + i B[..., 1]  (P, H)
    y_t = kappa Re(C~ s_t) + D * x_t                      C~ (H, P), D (H,)

``kappa = 2`` with ``conj_sym=True`` (each stored eigenvalue stands for a
conjugate pair), else 1. The discretization is ``"zoh"``, ``"bilinear"`` or
``"dirac"``.

Event mode: with ``integration_timesteps`` ``tau`` (B, L) the A-step of token t is
``delta * tau_t`` while the input normaliser ``gamma`` keeps ``delta`` (lrnnx's
asymmetric discretization), so the system is time-varying and the forward takes
the scan path. Without timesteps the system is time-invariant (lrnnx calls it
LTV only because it has the event mode), and the forward may use the FFT.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrnnx_jax.core import discretization as disc
from lrnnx_jax.core import hippo, lti
from lrnnx_jax.core.base import lrnnx_entry
from lrnnx_jax.models.diagonal import DiagonalSSM
from pallas_kernels import cells, scan_common
from lrnnx_jax.core.scan import DEFAULT_CHUNK_SIZE
from lrnnx_jax.core.validation import check_chunk_size, check_positive_int

DISCRETIZATIONS = ("zoh", "bilinear", "dirac")


def s5_init(key, d_model: int, d_state: int, conj_sym: bool, dt_min: float, dt_max: float, dtype=jnp.float32):
    """The S5 paper's initialisation (lrnnx ``utils.init``), drawn from ``key``.

    ``(Lambda, V) = make_DPLR_HiPPO(P)`` (``2P``, keeping the first ``P`` eigenpairs,
    when ``conj_sym``); ``B~ = V^-1 B0`` and ``C~ = C0 V`` with ``B0 (P_loc, H)`` real
    and ``C0 (H, P_loc)`` complex normal, both scaled by ``sqrt(1 / P_loc)``.

    Returns:
      ``{"A": (P, 2), "B": (P, H, 2), "C": (H, P, 2), "D": (H,), "log_dt": (P,)}``,
      complex values stored as (real, imaginary) pairs.
    """
    local_P = 2 * d_state if conj_sym else d_state
    Lambda, _, _, V, _ = hippo.make_DPLR_HiPPO(local_P)
    Lambda, V = Lambda[:d_state], V[:, :d_state]  # (P,), (P_loc, P)
    V_inv = V.conj().T if conj_sym else np.linalg.inv(V)  # (P, P_loc)
    k_b, k_cr, k_ci, k_d, k_dt = jax.random.split(key, 5)
    scale = math.sqrt(1 / local_P)
    B0 = jax.random.normal(k_b, (local_P, d_model)) * scale
    C0 = (jax.random.normal(k_ci, (d_model, local_P)) * 1j + jax.random.normal(k_cr, (d_model, local_P))) * scale
    B = jnp.asarray(V_inv, jnp.complex64) @ B0.astype(jnp.complex64)
    C = C0.astype(jnp.complex64) @ jnp.asarray(V, jnp.complex64)
    pairs = lambda z: jnp.stack([jnp.real(z), jnp.imag(z)], -1).astype(dtype)
    return {
        "A": pairs(jnp.asarray(Lambda)),
        "B": pairs(B),
        "C": pairs(C),
        "D": (0.1 * jax.random.normal(k_d, (d_model,))).astype(dtype),
        "log_dt": jax.random.uniform(k_dt, (d_state,), dtype, math.log(dt_min), math.log(dt_max)),
    }


class S5(DiagonalSSM):
    """Event-driven S5: a diagonal complex SSM whose A-step may vary per token.

    Args:
      d_model: H, input and output features.
      d_state: P, complex state size.
      discretization: ``"zoh"``, ``"bilinear"`` or ``"dirac"``.
      conj_sym: keep ``P`` of ``2P`` HiPPO eigenvalues and output ``2 Re(C~ s)``.
      dt_min, dt_max: ``log_dt`` is drawn uniformly in ``[log dt_min, log dt_max]``.
      step_rescale: multiplies every step ``exp(log_dt)``.
      use_fast_path, device: accepted for lrnnx compatibility and unused (JAX
        compiles one path and places arrays itself).
      dtype: parameter dtype (float32 when None).
      method: full-sequence path, ``"auto"``, ``"fft"`` or ``"scan"``; with
        ``integration_timesteps`` the system is time-varying and needs ``"auto"`` or ``"scan"``.
      chunk_size: chunk of the scan path (None: unchunked).
      kernel_config: the ``pallas_kernels.KernelConfig`` of the training-scan kernels, event mode included (see
        :class:`~lrnnx_jax.models.diagonal.DiagonalSSM`); None: the default.
      rngs: ``nnx.Rngs`` (the ``params`` stream is used).

    The inference cache is ``{"lrnn_state": (B, P) complex}``.
    """

    supports_integration_timesteps = True
    kernel_policy = cells.KernelPolicy(
        rollout_max_batch=None, step_max_batch=32,
        evidence="H200 (H=128, P=64): fused rollout 1.6-2.8 us/step against 11.5-13.9 for the XLA program at B=32 and "
                 "128, 15.6 against 29-34 at B=4096; one-step kernel against the XLA step 9.5 vs 15.5 us at B=1, 10.9 vs "
                 "26.3 at B=32, 47.9 vs 47.0 at B=4096")

    def __init__(
        self,
        d_model: int,
        d_state: int,
        discretization: str = "zoh",
        conj_sym: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        step_rescale: float = 1.0,
        use_fast_path: bool = True,
        device=None,
        dtype=None,
        *,
        method: str = "auto",
        chunk_size: int | None = DEFAULT_CHUNK_SIZE,
        kernel_config=None,
        rngs: nnx.Rngs,
    ):
        self.d_model = check_positive_int(d_model, "d_model")
        self.d_state = check_positive_int(d_state, "d_state")
        self.discretize = disc.get_discretization(discretization, DISCRETIZATIONS)
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        if not step_rescale > 0:
            raise ValueError(f"step_rescale must be > 0, got {step_rescale}")
        lti.resolve_method(method, 1, False)
        self.discretization, self.conj_sym, self.step_rescale = discretization, bool(conj_sym), float(step_rescale)
        self.method, self.chunk_size = method, check_chunk_size(chunk_size)
        self.kernel_config = scan_common.model_config(kernel_config)
        params = s5_init(rngs.params(), d_model, d_state, self.conj_sym, dt_min, dt_max, dtype or jnp.float32)
        self.A = nnx.Param(params["A"])
        self.B = nnx.Param(params["B"])
        self.C = nnx.Param(params["C"])
        self.D = nnx.Param(params["D"])
        self.log_dt = nnx.Param(params["log_dt"])

    def discrete_system(self, integration_timesteps=None):
        """``(A_bar, B_bar (P, H), C (H, P))`` complex, ``kappa`` folded into ``C``.

        ``A_bar`` is ``(P,)``, or ``(..., P)`` for timesteps of shape ``(...)``.
        """
        A, B, C = self.A[...], self.B[...], self.C[...]
        Lambda = A[:, 0] + 1j * A[:, 1]
        delta = jnp.exp(self.log_dt[...]) * self.step_rescale
        tau = None if integration_timesteps is None else integration_timesteps[..., None]
        A_bar, gamma = self.discretize(Lambda, delta, tau)
        kappa = 2.0 if self.conj_sym else 1.0
        return A_bar, gamma[:, None] * (B[..., 0] + 1j * B[..., 1]), kappa * (C[..., 0] + 1j * C[..., 1])

    def skip(self, x):
        return self.D[...] * x

    def skip_params(self):
        return {"D": self.D[...]}

    def lrnnx_entries(self):
        return {name: lrnnx_entry(getattr(self, name)) for name in ("A", "B", "C", "D", "log_dt")}
