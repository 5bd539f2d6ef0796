"""S7 (Soydan et al., 2024), as in lrnnx's ``models.ltv.S7``.

For the layer input ``u_t`` (H,) and ``x_t = W_in u_t``, one projection
``W_x x_t`` gives the per-token ``a_t (N,)``, ``B_t (H, N)``, ``C_t (H, N)``,
``d_t (H,)`` and ``beta_t (N,)`` (in this order; ``B_t`` and ``C_t`` flattened
as ``(h n)``). The state ``s (N,)`` is shared by all channels::

    A_bar_t = 1 - 1 / ((a_t + base)^2 + 1/2)        in [-1, 1)
    s_t     = A_bar_t * s_{t-1} + B_t^T x_t + beta_t
    y_t     = C_t s_t + d_t * x_t
    out_t   = sigmoid(W_g GELU(y_t)) * y_t + u_t     (exact, erf GELU)

``base`` is the real part of the HiPPO-DPLR eigenvalues of size ``N/J``, repeated
``J`` times (-1/2 everywhere). S7 has no event mode.

The per-token ``B_t`` and ``C_t`` (``O(H N)`` numbers each) are projected inside the
chunked scan, so memory is ``O(B * chunk * H * N)``, not ``O(B * L * H * N)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrnnx_jax.core import hippo
from lrnnx_jax.core.base import LRNN, lrnnx_entry, lrnnx_linear_entries, torch_linear
from lrnnx_jax.core.scan import DEFAULT_CHUNK_SIZE, chunked_scan
from lrnnx_jax.core.validation import check_positive_int
from pallas_kernels import selective


#: the parts of the ``x_proj`` output, in order
PARTS = ("a", "B", "C", "d", "beta")


def s7_transition(a):
    """``A_bar = 1 - 1 / (a^2 + 1/2)`` elementwise."""
    return 1 - 1 / (a * a + 0.5)


class S7(LRNN):
    """Selective and simplified SSM with input-dependent ``A, B, C, D`` and bias.

    Args:
      d_model: H, input and output features.
      d_state: N, real state size (shared by all channels).
      J: number of HiPPO blocks of the base of ``a``; must divide ``d_state``.
      use_fast_path, layer_idx, device: accepted for lrnnx compatibility and unused.
      dtype: parameter dtype (float32 when None).
      chunk_size: chunk of the scan (None: unchunked, 1: sequential).
      rngs: ``nnx.Rngs`` (the ``params`` stream is used).

    The inference cache is ``{"lrnn_state": (B, N)}``.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int,
        J: int = 1,
        use_fast_path: bool = True,
        layer_idx=None,
        device=None,
        dtype=None,
        *,
        chunk_size: int | None = DEFAULT_CHUNK_SIZE,
        rngs: nnx.Rngs,
    ):
        H = self.d_model = check_positive_int(d_model, "d_model")
        N = self.d_state = check_positive_int(d_state, "d_state")
        J = check_positive_int(J, "J")
        if N % J:
            raise ValueError(f"d_state must be divisible by J (the number of HiPPO blocks), got d_state={N}, J={J}")
        self.J, self.chunk_size = J, chunk_size
        param_dtype = dtype or jnp.float32
        self.in_proj = torch_linear(H, H, use_bias=False, rngs=rngs, param_dtype=param_dtype)
        self.x_proj = nnx.Linear(
            H, N + 2 * H * N + H + N, use_bias=False, kernel_init=nnx.initializers.normal(0.02),
            param_dtype=param_dtype, rngs=rngs,
        )
        self.gate_proj = torch_linear(H, H, use_bias=False, rngs=rngs, param_dtype=param_dtype)
        base = np.tile(np.real(hippo.make_DPLR_HiPPO(N // J)[0]), J)
        self.base_params = nnx.Param(jnp.asarray(base, param_dtype))

    def _projection(self, x, part: str):
        """One part of ``W_x x`` for ``x (..., H)``: ``"a"`` (..., N) with the base added,
        ``"B"``/``"C"`` (..., H, N), ``"d"`` (..., H) or ``"beta"`` (..., N)."""
        H, N = self.d_model, self.d_state
        sizes = (N, H * N, H * N, H, N)
        index = PARTS.index(part)
        start = sum(sizes[:index])
        kernel = self.x_proj.kernel[...][:, start : start + sizes[index]]
        out = jnp.einsum("...i,io->...o", x, kernel.astype(x.dtype), precision="highest")
        if part == "a":
            return out + self.base_params[...]
        if part in ("B", "C"):
            return out.reshape(out.shape[:-1] + (H, N))
        return out

    def drive(self, x):
        """``x (..., H)`` (after ``in_proj``) -> the state's input ``B_t^T x + beta_t`` ``(..., N)``."""
        drive = jnp.einsum("...hn,...h->...n", self._projection(x, "B"), x, precision="highest")
        return drive + self._projection(x, "beta")

    def coefficients(self, x):
        """``x (..., H)`` (after ``in_proj``) -> ``(A_bar (..., N), B_t^T x + beta (..., N))``."""
        return s7_transition(self._projection(x, "a")), self.drive(x)

    def readout(self, s, x):
        """``s (..., N)``, ``x (..., H)`` -> ``y = C_t s + d_t * x`` (..., H)."""
        y = jnp.einsum("...hn,...n->...h", self._projection(x, "C"), s, precision="highest")
        return y + self._projection(x, "d") * x

    def output(self, y, u):
        """The gate and the residual: ``sigmoid(W_g GELU(y)) * y + u``."""
        return jax.nn.sigmoid(self.gate_proj(jax.nn.gelu(y, approximate=False))) * y + u

    def _forward(self, u, integration_timesteps, mask, lengths, return_cache):
        x = self.in_proj(u)
        s0 = jnp.zeros((u.shape[0], self.d_state), x.dtype)
        y, s = chunked_scan(self.coefficients, lambda s, x: self.readout(s, x), x, s0, mask, self.chunk_size)
        return self.output(y, u), ({"lrnn_state": s} if return_cache else None)

    def _step(self, u_t, cache, integration_timesteps):
        """The recurrence by ``pallas_kernels.selective_state_update`` in its ``"s7"`` mode (the state as
        ``(B, N, 1)``, ``dt = a_t + base``, ``x`` the drive, ``B = C = 1``; the reference is :func:`s7_transition`)."""
        x = self.in_proj(u_t)
        state = cache["lrnn_state"]
        ones = jnp.ones((x.shape[0], 1), x.dtype)
        s, new_state = selective.selective_state_update(
            state[..., None], self.drive(x), self._projection(x, "a"), jnp.zeros((self.d_state, 1), x.dtype),
            ones, ones, discretization="s7",
        )
        return self.output(self.readout(s, x), u_t), {"lrnn_state": new_state[..., 0]}

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int = 1, dtype=None):
        """``{"lrnn_state": (batch_size, N) zeros}``."""
        return {"lrnn_state": jnp.zeros((batch_size, self.d_state), self._state_dtype(dtype, False))}

    def lrnnx_entries(self):
        return {
            **lrnnx_linear_entries("in_proj", self.in_proj),
            **lrnnx_linear_entries("x_proj", self.x_proj),
            **lrnnx_linear_entries("gate_proj", self.gate_proj),
            "base_params": lrnnx_entry(self.base_params),
        }
