"""Centaurus ("Let SSMs be ConvNets", Pei 2025), as in lrnnx: four modes of one diagonal SSM.

Each of the ``N`` states owns ``M`` complex sub-states ``(n, m)`` that share its
input and are mixed back into it by ``E``::

    h_t[n, m] = A_bar[n, m] h_{t-1}[n, m] + gamma[n, m] (B_in x_t)[n]
    y_t[o]    = sum_{n, m} C_out[o, n] E[n, m] Re(h_t[n, m])

with ``(A_bar, gamma) = discretization(A, delta[:, None])`` and ``delta = exp(log_delta)``
(lrnnx always computes the "mamba" rule ``A_bar = exp(delta A)``, ``gamma = delta``;
here it is the default and the ``discretization`` argument is honoured).
There is no skip term. This is the diagonal SSM of :mod:`lrnnx_jax.core.lti`
with state size ``N*M``, flattened as ``s = n*M + m``::

    A_bar[s],   B_bar[s, i] = gamma[n, m] B_in[n, i],   C[o, s] = C_out[o, n] E[n, m]

so the FFT path, the scan path and the step all come from the engine. The modes
differ only in how ``B_in (N, H)`` and ``C_out (H, N)`` are parameterised:

=============  =====================================  ======================================  ===============
mode           ``B_in``                               ``C_out``                               constraint
=============  =====================================  ======================================  ===============
neck           ``B (N, H)``                           ``C (H, N)``                            none
dws            ``diag(B)``, ``B (H,)``                ``diag(C)``, ``C (H,)``                 ``N == H``
full           ``B_in[n, n mod H] = B[n]``            ``C_out[n div H, n] = C[n]``            ``N == H**2``
pw (s5)        ``B (N*M, H)``, one row per sub-state  ``C (H, N*M)``, no ``E``                none
=============  =====================================  ======================================  ===============

In ``full`` mode state ``n`` is the filter from input channel ``n mod H`` to
output channel ``n div H``: one state per (output, input) pair.
"""

from __future__ import annotations

import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from lrnnx_jax.core import discretization as disc
from lrnnx_jax.core import lti, validation
from lrnnx_jax.core.base import lrnnx_entry
from lrnnx_jax.core.scan import DEFAULT_CHUNK_SIZE
from lrnnx_jax.models.diagonal import DiagonalSSM
from pallas_kernels import cells, scan_common

#: The discretizations Centaurus accepts ("mamba" is what lrnnx computes for every name).
DISCRETIZATIONS = ("mamba", "zoh", "bilinear", "dirac")


class CentaurusBase(DiagonalSSM):
    """What all Centaurus modes share: ``A``, ``log_delta``, the discrete system and the engine calls.

    Args:
      d_model: H, input and output features.
      d_state: N, number of states.
      sub_state_dim: M, complex sub-states per state.
      discretization: one of :data:`DISCRETIZATIONS`; ``"mamba"`` (``A_bar = exp(delta A)``,
        ``B_bar = delta B``) is what lrnnx computes whatever it is told.
      method: full-sequence path, ``"auto"``, ``"fft"`` or ``"scan"``.
      chunk_size: chunk of the scan path (None: one chunk).
      kernel_config: the ``pallas_kernels.KernelConfig`` of the training-scan kernels (see
        :class:`~lrnnx_jax.models.diagonal.DiagonalSSM`); None: the default.
      rngs: ``nnx.Rngs`` (the ``params`` stream is used).

    Parameters: ``A (N, M)`` complex, initialised to ``-0.5 + i pi m / M`` on every row;
    ``log_delta (N,)`` = ``log(logspace(-3, -1, N))``; plus the mode's ``B``, ``C`` (and ``E``).
    """

    #: lrnnx's name of the mode.
    mode: ClassVar[str]

    def __init__(
        self,
        d_model: int,
        d_state: int,
        sub_state_dim: int,
        discretization: str = "mamba",
        *,
        method: str = "auto",
        chunk_size: int | None = DEFAULT_CHUNK_SIZE,
        kernel_config=None,
        rngs: nnx.Rngs,
    ):
        self.d_model = validation.check_positive_int(d_model, "d_model")
        self.d_state = validation.check_positive_int(d_state, "d_state")
        self.sub_state_dim = validation.check_positive_int(sub_state_dim, "sub_state_dim")
        self._check_sizes()
        disc.get_discretization(discretization, allowed=DISCRETIZATIONS)
        lti.resolve_method(method, 1, False)
        self.discretization = discretization
        self.method, self.chunk_size = method, validation.check_chunk_size(chunk_size)
        self.kernel_config = scan_common.model_config(kernel_config)
        phases = jnp.arange(sub_state_dim, dtype=jnp.float32) * math.pi / sub_state_dim
        A = jnp.broadcast_to(jax.lax.complex(jnp.full_like(phases, -0.5), phases), (d_state, sub_state_dim))
        self.A = nnx.Param(A.astype(jnp.complex64))
        self.log_delta = nnx.Param(jnp.log(jnp.logspace(-3.0, -1.0, d_state, dtype=jnp.float32)))
        self._init_mode(rngs)

    # ------------------------------------------------------------- per mode
    def _check_sizes(self):
        """Raise ``ValueError`` when the mode cannot have these sizes."""

    def _init_mode(self, rngs: nnx.Rngs):
        """Create the mode's parameters (``B``, ``C``, and ``E`` where it mixes sub-states)."""
        raise NotImplementedError

    def _sub_state_projections(self):
        """``(B_in (N, M or 1, H), C (H, N, M))``: the input and output maps of every sub-state."""
        raise NotImplementedError

    # ------------------------------------------------------------- shared
    def discrete_system(self, integration_timesteps=None):
        """``(A_bar (N*M,) complex, B_bar (N*M, H), C (H, N*M) real)``, state index ``n*M + m`` (no event mode)."""
        delta = jnp.exp(self.log_delta[...])
        A_bar, gamma = disc.get_discretization(self.discretization)(self.A[...], delta[:, None])
        B_in, C = self._sub_state_projections()
        n_flat = self.d_state * self.sub_state_dim
        B_bar = (gamma[..., None] * B_in).reshape(n_flat, self.d_model)
        return A_bar.reshape(n_flat), B_bar, C.reshape(self.d_model, n_flat)

    def skip(self, x):
        """Centaurus has no direct term."""
        return jnp.zeros_like(x)

    def skip_params(self):
        return {}

    def lrnnx_entries(self):
        return {name: lrnnx_entry(getattr(self, name)) for name in ("A", "log_delta", "B", "C")}


class _MixedSubStates(CentaurusBase):
    """Modes whose ``M`` sub-states share the state's input and are mixed by ``E (N, M) ~ N(0, 2)``."""

    #: lrnnx's derived (non-persistent) buffers, accepted and ignored when loading.
    lrnnx_ignored_entries = ("_A_bar", "_B_bar", "_C_eff")

    def _init_mode(self, rngs):
        self.E = nnx.Param(jax.random.normal(rngs.params(), (self.d_state, self.sub_state_dim)) * math.sqrt(2))
        self._init_projections(rngs)

    def _init_projections(self, rngs: nnx.Rngs):
        raise NotImplementedError

    def _projections(self):
        """``(B_in (N, H), C_out (H, N))`` real."""
        raise NotImplementedError

    def _sub_state_projections(self):
        B_in, C_out = self._projections()
        return B_in[:, None, :], C_out[:, :, None] * self.E[...][None]

    def state_shape(self):
        return (self.d_state, self.sub_state_dim)

    def lrnnx_entries(self):
        return {**super().lrnnx_entries(), "E": lrnnx_entry(self.E)}


def _kaiming_uniform(key, shape):
    """``torch.nn.init.kaiming_uniform_(a=sqrt(5))`` of a ``(out, in)`` matrix: ``U(+-1/sqrt(in))``."""
    bound = 1 / math.sqrt(shape[1])
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class CentaurusNeck(_MixedSubStates):
    """Bottleneck mode: dense ``B (N, H)`` and ``C (H, N)`` (kaiming-uniform). See :class:`CentaurusBase`."""

    mode = "neck"

    def _init_projections(self, rngs):
        self.B = nnx.Param(_kaiming_uniform(rngs.params(), (self.d_state, self.d_model)))
        self.C = nnx.Param(_kaiming_uniform(rngs.params(), (self.d_model, self.d_state)))

    def _projections(self):
        return self.B[...], self.C[...]


class CentaurusDWS(_MixedSubStates):
    """Depthwise-separable mode: one state per channel, ``B (H,)`` and ``C (H,)`` ones. Needs ``N == H``."""

    mode = "dws"
    kernel_policy = cells.KernelPolicy(
        rollout_max_batch=256, step_max_batch=1,
        evidence="H200 (H=128): fused rollout 3.8 / 4.6 us/step against 8.6 / 11.0 for the XLA program at B=32 / 128, "
                 "716 against 34 on the block path at B=4096; the step as the other diagonal cells")

    def _check_sizes(self):
        if self.d_state != self.d_model:
            raise ValueError(
                "Centaurus mode='dws' has one state per channel and needs d_state == d_model, "
                f"got d_state={self.d_state}, d_model={self.d_model}"
            )

    def _init_projections(self, rngs):
        self.B = nnx.Param(jnp.ones((self.d_model,)))
        self.C = nnx.Param(jnp.ones((self.d_model,)))

    def _projections(self):
        return jnp.diag(self.B[...]), jnp.diag(self.C[...])


class CentaurusFull(_MixedSubStates):
    """Full mode: state ``n`` filters input ``n mod H`` into output ``n div H``. Needs ``N == H**2``.

    ``B (N,) ~ N(0, 2/H)``, ``C (N,) ~ N(0, 2/N)``.
    """

    mode = "full"

    def _check_sizes(self):
        if self.d_state != self.d_model**2:
            raise ValueError(
                "Centaurus mode='full' has one state per (output, input) channel pair and needs "
                f"d_state == d_model**2 = {self.d_model**2}, got d_state={self.d_state}, d_model={self.d_model}"
            )

    def _init_projections(self, rngs):
        self.B = nnx.Param(jax.random.normal(rngs.params(), (self.d_state,)) * math.sqrt(2 / self.d_model))
        self.C = nnx.Param(jax.random.normal(rngs.params(), (self.d_state,)) * math.sqrt(2 / self.d_state))

    def _projections(self):
        states = jnp.arange(self.d_state)
        B_in = self.B[...][:, None] * jax.nn.one_hot(states % self.d_model, self.d_model)  # (N, H)
        C_out = self.C[...][None, :] * jax.nn.one_hot(states // self.d_model, self.d_model).T  # (H, N)
        return B_in, C_out


class CentaurusPWNeck(CentaurusBase):
    """Pointwise bottleneck ("s5"): every sub-state is its own SISO lane, no ``E``.

    ``B (N*M, H) = 1/sqrt(H)``, ``C (H, N*M) ~ N(0, 2/(N*M))``; lane ``n*M + m`` uses ``delta[n]``.
    """

    mode = "pointwise"
    lrnnx_ignored_entries = ("_A_bar_flat", "_B_bar_flat", "_C_eff_flat")

    def _init_mode(self, rngs):
        lanes = self.d_state * self.sub_state_dim
        self.B = nnx.Param(jnp.full((lanes, self.d_model), 1 / math.sqrt(self.d_model), jnp.float32))
        self.C = nnx.Param(jax.random.normal(rngs.params(), (self.d_model, lanes)) * math.sqrt(2 / lanes))

    def _sub_state_projections(self):
        N, M, H = self.d_state, self.sub_state_dim, self.d_model
        return self.B[...].reshape(N, M, H), self.C[...].reshape(H, N, M)

    def state_shape(self):
        return (self.d_state * self.sub_state_dim,)


#: lrnnx's ``mode`` names (``"pointwise"``, ``"pw"`` and ``"s5"`` are one mode).
MODES: dict[str, type[CentaurusBase]] = {
    "neck": CentaurusNeck,
    "pointwise": CentaurusPWNeck,
    "pw": CentaurusPWNeck,
    "s5": CentaurusPWNeck,
    "dws": CentaurusDWS,
    "full": CentaurusFull,
}


def Centaurus(
    d_model: int,
    d_state: int,
    sub_state_dim: int,
    discretization: str = "mamba",
    mode: str = "neck",
    **kwargs,
) -> CentaurusBase:
    """Build the Centaurus model of ``mode`` (lrnnx's factory): one of :data:`MODES`.

    The other arguments are those of :class:`CentaurusBase` (``method``, ``chunk_size``, ``rngs``).
    """
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"unknown Centaurus mode {mode!r}; expected one of {sorted(MODES)}")
    return MODES[mode](d_model, d_state, sub_state_dim, discretization, **kwargs)


def _translate_lrnnx_kwargs(kwargs: dict) -> dict:
    """lrnnx's Centaurus ignores ``discretization`` and always uses the mamba rule."""
    return {**kwargs, "discretization": "mamba"}


Centaurus.translate_lrnnx_kwargs = _translate_lrnnx_kwargs
