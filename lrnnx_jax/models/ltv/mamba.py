"""Mamba's selective SSM block (S6; Gu & Dao, 2023), as in lrnnx's ``models.ltv.Mamba``.

For the block input ``x_t`` (H,), with ``D = expand * H`` channels and state size ``N``::

    [x_t; z_t]      = W_in x_t                                  (D,), (D,)
    u_t             = SiLU(conv(x)_t)                           causal depthwise conv
    [r_t; B_t; C_t] = W_x u_t                                   (dt_rank,), (N,), (N,)
    delta_t         = softplus(W_dt r_t + b_dt)                 (D,)
    A               = -exp(A_log)                               (D, N)
    A_bar_t, gamma_t = discretization(A, delta_t, delta_A=delta_A_t)
    h_t             = A_bar_t * h_{t-1} + gamma_t * B_t * u_t   (D, N)
    y_t             = W_out((h_t C_t + D * u_t) * SiLU(z_t))

The discretization is ``"mamba"`` (``A_bar = exp(delta A)``, ``gamma = delta``),
``"zoh"``, ``"bilinear"`` or ``"dirac"`` (:mod:`lrnnx_jax.core.discretization`).
Without event mode ``delta_A = delta``. In event mode (``integration_timesteps``
``tau`` (B, L)) the A-step is ``delta_A_t = tau_t * softplus(b_A)`` with ``b_A`` the
bias of ``dtA_proj`` (its weight is unused, as in lrnnx), while ``gamma`` keeps
``delta_t``.

The forward runs :func:`selective_scan` (:func:`lrnnx_jax.core.scan.chunked_scan`):
the state-sized tensors ``A_bar`` and ``gamma B u`` (B, C, D, N) exist one chunk
of ``C`` steps at a time and are contracted with ``C_t`` inside the chunk, so the
memory of a training step grows as ``B * L * (D + N)`` (the per-token inputs)
plus ``B * (L / C) * D * N`` (the chunk boundaries), not as ``B * L * D * N``
(benchmarks/benchmark_scan_memory.py). The forward starts from an inference cache
when given one (the conv history and ``h``), so a prompt can be prefilled in chunks.
Where :func:`pallas_kernels.selective_scan.choose` selects them (``kernel_config``), the
forward runs the Pallas training-scan kernels instead (:func:`kernel_scan`, the step's softplus
inside them); on an NVIDIA GPU ``"auto"`` takes them (measured faster than this XLA path at
every point of the training sweeps: :data:`pallas_kernels.selective_scan.POLICY`).

The single step is written once, as the cell :func:`mamba_cell_step` (see
:mod:`pallas_kernels.cells`): ``model.step``, ``model.multi_step`` and the fused
rollout of ``generate`` all run it, in XLA or in a Pallas kernel. It uses the
kernels' discretizations (:func:`pallas_kernels.kernel_math.discretize`, compared
with :mod:`lrnnx_jax.core.discretization` in the tests) and the conv step of
:func:`lrnnx_jax.core.conv.conv_cell_step`.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrnnx_jax.core import conv, speculative
from lrnnx_jax.core import discretization as disc
from lrnnx_jax.core.base import LRNN, in_compute_dtype, compute_dtype, linear_blocks, lrnnx_entry, lrnnx_linear_entries, torch_linear
from lrnnx_jax.core.scan import DEFAULT_CHUNK_SIZE, chunked_scan
from lrnnx_jax.core.validation import check_cache_size, check_chunk_size, check_positive_int
from pallas_kernels import dispatch
from pallas_kernels import kernel_math as km
from pallas_kernels import selective_scan as scan_kernels
from pallas_kernels.cells import UNSPLIT, Cell, Collectives, KernelPolicy, Split

DISCRETIZATIONS = ("mamba", "zoh", "bilinear", "dirac")
DT_INITS = ("random", "constant")

#: where ``use_kernels="auto"`` runs Mamba's cell kernels (measured on an H200, BENCHMARKS.md section 6)
POLICY = KernelPolicy(
    rollout_max_batch=512,
    step_max_batch=0,
    evidence=("H200 (H=128, d_state=16, 512 steps), the fused rollout split over programs (each holding a slice of "
              "d_inner) against the compile-once XLA program: 5.0 vs 13.3 us per step at B=1 (16 programs per row, "
              "4 warps), 5.9 / 6.5 / 6.4 vs 14.0 / 14.8 / 15.5 at B=2 / 8 / 16, 9.4-10.9 vs 17.7-23.3 at B=32 (4 "
              "programs per row, 8 warps); from 34 rows on, blocks of 16 rows over 4 programs each (tensor-core dots): "
              "16.9 / 17.3 / 17.2 / 17.2 / 17.8 vs 21.9 / 21.7 / 22.5 / 25.6 / 31.3 at B=48 / 64 / 128 / 256 / 512 "
              "(event mode 17.0-20.8 vs 22.8-33.7); above 528 rows no split is resident on 132 SMs, and unsplit the "
              "rollout took 1,910 us against 116 at B=4096. The one-step kernel was not measured split; unsplit 30.9 "
              "vs 16.9 us at B=1, 33.4 vs 27.6 at B=32: the XLA step is kept. The XLA program (above 512 rows) at "
              "unroll 2 against 8 at B=256: capture 2.06 vs 3.65 s, 24.1 vs 23.5 us per step"),
    xla_unroll=2,
)

#: how the programs of Mamba's split rollout exchange their partial sums (``pallas_kernels.cells.Split.exchange``).
#: Measured on an H200 (H=128, d_state 16, 512 steps; µs per step, two alternating runs each,
#: ``benchmarks/results/split_exchange_h200/device_call_6``): the counter barrier 7.84-8.01 / 9.74-9.84 / 8.99-9.81
#: at B = 1 / 8 / 32 against 16.4-16.5 / 20.0 / 12.1-12.2 with tagged words; blocks of 16 rows 16.6-17.2 against
#: 23.5-24.4 at B = 64 / 256. With the barrier spinning on volatile loads instead of atomics (session 15,
#: ``benchmarks/results/session15_h200/call2``): 4.47-4.48 / 4.67-4.73 / 7.16-7.23 against 5.15-5.21 / 5.23-5.38 /
#: 8.74-8.98 before.
SPLIT_EXCHANGE = "barrier"


def event_step(tau, dtA_bias):
    """The event-mode A-step ``tau * softplus(dtA_bias)``: ``tau (...)`` -> ``(..., D)``."""
    return tau[..., None] * jax.nn.softplus(dtA_bias)


def selective_coefficients(inputs, A, dtA_bias, discretize: Callable):
    """The recurrence ``h_t = A_bar_t h_{t-1} + b_t`` of the selective SSM.

    Args:
      inputs: dict of per-token arrays with any leading axes ``(...)``: ``"u"``
        ``(..., D)`` conv output, ``"delta"`` ``(..., D)`` step, ``"B"`` ``(..., N)``
        and, in event mode, ``"tau"`` ``(...)`` the time since the last event.
      A: ``(D, N)`` continuous-time diagonal state matrix (negative).
      dtA_bias: ``(D,)``; the event-mode A-step is ``tau * softplus(dtA_bias)``.
      discretize: a function of :mod:`lrnnx_jax.core.discretization`.

    Returns:
      ``(A_bar, b)``, each ``(..., D, N)``: ``b = gamma * B_t * u_t``.
    """
    delta = inputs["delta"][..., None]
    delta_A = None
    if "tau" in inputs:
        delta_A = event_step(inputs["tau"], dtA_bias)[..., None]
    A_bar, gamma = discretize(A, delta, delta_A=delta_A)
    return A_bar, gamma * inputs["B"][..., None, :] * inputs["u"][..., None]


def selective_readout(h, inputs, D):
    """``(h_t C_t + D * u_t) * SiLU(z_t)``: ``h (..., D, N)`` -> ``(..., D)``.

    ``inputs`` holds ``"C"`` ``(..., N)``, ``"u"`` and ``"z"`` ``(..., D)``.
    """
    y = jnp.einsum("...dn,...n->...d", h, inputs["C"].astype(h.dtype), precision="highest")
    return (y + D * inputs["u"]) * jax.nn.silu(inputs["z"])


@functools.partial(jax.jit, static_argnames=("discretization", "chunk_size"))
def selective_scan(inputs, A, dtA_bias, D, h0, mask=None, *, discretization: str = "mamba", chunk_size=DEFAULT_CHUNK_SIZE):
    """The selective SSM over a sequence, by :func:`lrnnx_jax.core.scan.chunked_scan`.

    Args:
      inputs: dict of ``(B, L, ...)`` arrays as in :func:`selective_coefficients`
        and :func:`selective_readout` (``u``, ``z``, ``delta`` ``(B, L, D)``; ``B``,
        ``C`` ``(B, L, N)``; optional ``tau`` ``(B, L)``).
      A: ``(D, N)``; dtA_bias, D: ``(D,)``.
      h0: ``(B, D, N)`` initial state.
      mask: optional ``(B, L)`` bool; the state is frozen where False.
      discretization: a name of :data:`DISCRETIZATIONS`.
      chunk_size: steps per chunk (None: unchunked, 1: sequential).

    Returns:
      ``(y (B, L, D), h_last (B, D, N))``.

    Jitted with static ``discretization`` and ``chunk_size``, so that eager calls
    reuse one compiled program per shape instead of re-tracing the scan.
    """
    discretize = disc.get_discretization(discretization, DISCRETIZATIONS)
    return chunked_scan(
        lambda chunk: selective_coefficients(chunk, A, dtA_bias, discretize),
        lambda h, chunk: selective_readout(h, chunk, D),
        inputs, h0, mask, chunk_size,
    )


def kernel_scan(inputs, A, dtA_bias, D, h0, mask, discretization: str, config):
    """:func:`selective_scan` on the Pallas training-scan kernels (:mod:`pallas_kernels.selective_scan`,
    forward and backward) when :func:`pallas_kernels.selective_scan.choose` selects them under ``config``
    (a ``KernelConfig``, or None: the default read when this is traced); None otherwise.

    ``inputs`` holds ``"dt"``, the step before its softplus, in place of ``"delta"`` (:func:`with_delta`): the
    kernels apply the softplus (``delta_softplus``)."""
    delta_A = event_step(inputs["tau"], dtA_bias) if "tau" in inputs else None
    args = (inputs["u"], inputs["dt"], A, inputs["B"], inputs["C"], D, inputs["z"], delta_A)
    if not scan_kernels.choose(*args, h0, config=config):
        return None
    y, h_last = scan_kernels.kernel_scan(*args, mask, h0, discretization=discretization, config=dispatch.resolve(config),
                                         delta_softplus=True)
    return y, h_last.astype(h0.dtype)


def with_delta(inputs):
    """``inputs`` with the step ``"delta" = softplus(dt)`` in place of ``"dt"`` (as :func:`selective_scan` takes
    them)."""
    rest = {k: v for k, v in inputs.items() if k != "dt"}
    return {**rest, "delta": jax.nn.softplus(inputs["dt"])}


def _bias(params, name):
    return params[name] if name in params else 0.0


def mamba_cell_step(params, state, x, inputs, precision, *, discretization: str, comm: Collectives = UNSPLIT):
    """One step of the Mamba block, the model's cell (:mod:`pallas_kernels.cells`).

    ``x (..., H)`` with the leading row axes of ``state`` (``conv0..conv{K-1}`` ``(..., D)``,
    ``h`` ``(..., D, N)``) and ``inputs`` (``tau`` ``(...)`` in event mode); ``params`` as
    :meth:`Mamba.cell` builds them. Returns ``(y (..., H), new_state)``. Only operations that
    lower in Pallas: the contractions by :func:`pallas_kernels.kernel_math.contract`.

    Split over programs (:func:`mamba_split`: each holds a slice of the ``D`` channels), the two
    contractions over ``D`` (``x_proj`` and ``out_proj``) are completed by ``comm.psum``.
    """
    p = params
    x_in = km.project(x, p["Win_x"], 1, precision) + _bias(p, "Win_x_b")
    z = km.project(x, p["Win_z"], 1, precision) + _bias(p, "Win_z_b")
    pre, history = conv.conv_cell_step(p, state, x_in, conv.conv_taps(p))
    u = km.silu(pre)
    r, B_t, C_t = comm.psum((km.project(u, p["Wx_r"], 1, precision), km.project(u, p["Wx_B"], 1, precision),
                             km.project(u, p["Wx_C"], 1, precision)))
    delta = km.softplus(km.project(r, p["Wdt"], 0, precision) + p["Wdt_b"])
    delta_A = None
    if "tau" in inputs:  # event mode: the A-step tau * softplus(b_A)
        delta_A = (inputs["tau"][..., None] * p["dtA"])[..., None]
    A_bar, gamma = km.discretize(discretization, p["A"], delta[..., None], delta_A)
    h = (A_bar * state["h"] + gamma * B_t[..., None, :] * u[..., None]).astype(state["h"].dtype)  # keeps its dtype
    y = (jnp.sum(h * C_t[..., None, :], axis=-1) + p["Dskip"] * u) * km.silu(z)
    out = comm.psum(km.project(y, p["Wout"], 0, precision)) + _bias(p, "Wout_b")
    return out, {**history, "h": h}


def mamba_split(d_inner: int, d_conv: int) -> Split:
    """:meth:`Mamba.cell`'s split over the ``d_inner`` channels: every parameter with a ``D`` axis is cut along
    it (``Wout_b`` stays whole), and so are the conv history and ``h``."""
    along_first = ["Win_x", "Win_z", "Win_x_b", "Win_z_b", "conv_b", "Wdt_b", "A", "Dskip", "dtA", "Wout",
                   *(f"conv_w{k}" for k in range(d_conv))]
    return Split(d_inner, {**dict.fromkeys(along_first, 0), **dict.fromkeys(["Wx_r", "Wx_B", "Wx_C", "Wdt"], 1)},
                 {"h": 0, **{f"conv{k}": 0 for k in range(d_conv)}}, exchange=SPLIT_EXCHANGE)


#: one step function per discretization (stable identities)
_CELL_STEPS = {name: functools.partial(mamba_cell_step, discretization=name) for name in DISCRETIZATIONS}




def _resolve_dt_rank(dt_rank, d_model: int) -> int:
    if dt_rank == "auto":
        return math.ceil(d_model / 16)
    if isinstance(dt_rank, bool) or not isinstance(dt_rank, (int, np.integer)) or dt_rank < 1:
        raise ValueError(f"dt_rank must be a positive integer or 'auto', got {dt_rank!r}")
    return int(dt_rank)


class Mamba(LRNN):
    """Mamba block: input projection, causal conv, selective SSM, gated output projection.

    Args:
      d_model: H, input and output features.
      d_state: N, state size per channel.
      d_conv: kernel size of the causal depthwise conv.
      expand: ``D = int(expand * H)`` channels.
      dt_rank: rank of the step projection, or ``"auto"`` for ``ceil(H / 16)``.
      dt_min, dt_max, dt_init_floor: at initialisation ``softplus(b_dt)`` is
        log-uniform in ``[dt_min, dt_max]``, floored at ``dt_init_floor``.
      dt_init: ``"random"`` (``W_dt ~ U(+-s)``) or ``"constant"`` (``W_dt = s``),
        ``s = dt_scale / sqrt(dt_rank)``.
      dt_scale: see ``dt_init``.
      conv_bias: bias of the conv; bias: biases of ``in_proj`` and ``out_proj``.
      use_fast_path, layer_idx, device: accepted for lrnnx compatibility and
        unused (JAX compiles one path and places arrays itself).
      dtype: dtype of the projection and conv parameters (float32 when None);
        ``A_log`` and ``D`` are float32, as in lrnnx.
      discretization: ``"mamba"``, ``"zoh"``, ``"bilinear"`` or ``"dirac"``.
      chunk_size: steps per chunk of the scan (None: unchunked associative scan,
        1: sequential).
      kernel_config: the ``pallas_kernels.KernelConfig`` of the forward's scan (:func:`kernel_scan`;
        ``use_kernels="always"`` opts in to the training-scan kernels); None: the default, read when the
        forward is traced (the forward is compiled once per model structure: set this attribute, not the
        default, to switch between calls).
      rngs: ``nnx.Rngs`` (the ``params`` stream is used).

    The inference cache is ``{"conv_state": (B, D, d_conv)`` (the last raw, pre-conv
    inputs of the conv, newest last), ``"lrnn_state": (B, D, N)}``.
    """

    supports_integration_timesteps = True

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank="auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_fast_path: bool = True,
        layer_idx: Optional[int] = None,
        device=None,
        dtype=None,
        discretization: str = "mamba",
        *,
        chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE,
        kernel_config: Optional[dispatch.KernelConfig] = None,
        rngs: nnx.Rngs,
    ):
        H = self.d_model = check_positive_int(d_model, "d_model")
        N = self.d_state = check_positive_int(d_state, "d_state")
        K = self.d_conv = check_positive_int(d_conv, "d_conv")
        if isinstance(expand, bool) or not isinstance(expand, (int, float, np.integer, np.floating)) or int(expand * H) < 1:
            raise ValueError(f"expand must be a positive number with int(expand * d_model) >= 1, got {expand!r}")
        D = self.d_inner = int(expand * H)
        R = self.dt_rank = _resolve_dt_rank(dt_rank, H)
        disc.get_discretization(discretization, DISCRETIZATIONS)
        if dt_init not in DT_INITS:
            raise ValueError(f"dt_init must be one of {list(DT_INITS)}, got {dt_init!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        self.expand, self.discretization, self.chunk_size = expand, discretization, check_chunk_size(chunk_size)
        self.layer_idx = layer_idx
        self.kernel_config = None if kernel_config is None else dispatch.resolve(kernel_config)
        param_dtype = dtype or jnp.float32

        self.in_proj = torch_linear(H, 2 * D, use_bias=bias, rngs=rngs, param_dtype=param_dtype)
        bound = 1 / math.sqrt(K)  # torch Conv1d init, fan_in = d_conv (depthwise)
        self.conv_weight = nnx.Param(jax.random.uniform(rngs.params(), (D, K), param_dtype, -bound, bound))
        self.conv_bias = nnx.Param(jax.random.uniform(rngs.params(), (D,), param_dtype, -bound, bound)) if conv_bias else None
        self.x_proj = torch_linear(D, R + 2 * N, use_bias=False, rngs=rngs, param_dtype=param_dtype)
        self.dt_proj = torch_linear(R, D, use_bias=True, rngs=rngs, param_dtype=param_dtype)
        dt_init_std = dt_scale / math.sqrt(R)
        if dt_init == "constant":
            kernel = jnp.full((R, D), dt_init_std, param_dtype)
        else:
            kernel = jax.random.uniform(rngs.params(), (R, D), param_dtype, -dt_init_std, dt_init_std)
        self.dt_proj.kernel.set_value(kernel)
        log_dt = jax.random.uniform(rngs.params(), (D,), jnp.float32, math.log(dt_min), math.log(dt_max))
        dt = jnp.maximum(jnp.exp(log_dt), dt_init_floor)
        self.dt_proj.bias.set_value((dt + jnp.log(-jnp.expm1(-dt))).astype(param_dtype))  # softplus^-1(dt)
        self.dtA_proj = torch_linear(R, D, use_bias=True, rngs=rngs, param_dtype=param_dtype)
        self.A_log = nnx.Param(jnp.log(jnp.broadcast_to(jnp.arange(1, N + 1, dtype=jnp.float32), (D, N))))
        self.D = nnx.Param(jnp.ones((D,), jnp.float32))
        self.out_proj = torch_linear(D, H, use_bias=bias, rngs=rngs, param_dtype=param_dtype)

    # ------------------------------------------------- shared by forward and step
    def _conv_bias(self):
        return None if self.conv_bias is None else self.conv_bias[...]

    def _split_in_proj(self, x):
        """``x (..., H)`` -> ``(x_in, z)``, each ``(..., D)`` (one contraction each: :func:`linear_blocks`)."""
        return linear_blocks(self.in_proj, x, (self.d_inner, self.d_inner))

    def _x_proj(self, u):
        """``(r (..., dt_rank), B_t (..., N), C_t (..., N))`` from the conv output ``u (..., D)``.

        One contraction, then split (not :func:`linear_blocks`): its output is narrow (``dt_rank + 2 N`` columns
        against ``D`` inputs), so the gradient w.r.t. ``u`` is best one contraction of the joined ``(...,
        dt_rank + 2 N)`` gradient; by blocks it would be three, each writing a ``(..., D)`` array, and their sum (on
        an H200 at B=32, H=128, L=2048: 2.36 ms of device time per training step against 2.44, BENCHMARKS.md §7).
        """
        return jnp.split(self.x_proj(u), [self.dt_rank, self.dt_rank + self.d_state], axis=-1)

    def _ssm_inputs(self, u, z, tau):
        """The per-token inputs of the recurrence from the conv output ``u`` and gate ``z`` ``(..., D)``: the step
        as ``"dt"``, before its softplus (:func:`kernel_scan`; :func:`with_delta` for the XLA path)."""
        r, B_t, C_t = self._x_proj(u)
        inputs = {"u": u, "z": z, "dt": self.dt_proj(r), "B": B_t, "C": C_t}
        if tau is not None:
            inputs["tau"] = tau.astype(u.dtype)
        return inputs

    def _A(self):
        """``A = -exp(A_log)`` ``(D, N)``."""
        return -jnp.exp(self.A_log[...])

    # ------------------------------------------------------------------- model
    def _forward(self, x, integration_timesteps, mask, lengths, return_cache, cache=None):
        x_in, z = self._split_in_proj(x)
        conv_state = None if cache is None else cache["conv_state"]
        u = jax.nn.silu(conv.causal_conv1d(x_in, self.conv_weight[...], self._conv_bias(), conv_state=conv_state))
        inputs = self._ssm_inputs(u, z, integration_timesteps)
        if cache is None:
            h0 = jnp.zeros((x.shape[0], self.d_inner, self.d_state), x.dtype)
        else:
            h0 = cache["lrnn_state"].astype(x.dtype)
        scanned = kernel_scan(inputs, self._A(), self.dtA_proj.bias[...], self.D[...], h0, mask, self.discretization,
                              self.kernel_config)
        if scanned is None:  # the XLA path
            scanned = selective_scan(
                with_delta(inputs), self._A(), self.dtA_proj.bias[...], self.D[...], h0, mask,
                discretization=self.discretization, chunk_size=self.chunk_size,
            )
        y, h_last = scanned
        new_cache = None
        if return_cache:
            new_cache = {"conv_state": conv.conv_state_after(x_in, self.d_conv, lengths, conv_state=conv_state),
                         "lrnn_state": h_last}
        return self.out_proj(y), new_cache

    # ---------------------------------------------------------------- the cell
    def cell(self) -> Cell:
        """The block's step (:func:`mamba_cell_step`) and its parameters in the kernel layout:
        the projections as separate tiles (``Win_x``/``Win_z`` ``(D, H)``, ``Wx_r`` ``(R, D)``,
        ``Wx_B``/``Wx_C`` ``(N, D)``, ``Wdt`` ``(R, D)``, ``Wout`` ``(D, H)``), the conv taps,
        ``A (D, N)`` (padded lanes -1: zoh divides by A), ``Dskip`` and ``dtA = softplus(b_A)``."""
        D, N, R = self.d_inner, self.d_state, self.dt_rank
        W_in = self.in_proj.kernel[...]
        p = {"Win_x": in_compute_dtype(W_in[:, :D].T), "Win_z": in_compute_dtype(W_in[:, D:].T)}
        if self.in_proj.bias is not None:
            b = self.in_proj.bias[...]
            p["Win_x_b"], p["Win_z_b"] = in_compute_dtype(b[:D]), in_compute_dtype(b[D:])
        p.update(conv.conv_cell_params(self.conv_weight[...], self._conv_bias()))
        W_x = self.x_proj.kernel[...]
        p["Wx_r"], p["Wx_B"], p["Wx_C"] = in_compute_dtype(W_x[:, :R].T), in_compute_dtype(W_x[:, R:R + N].T), in_compute_dtype(W_x[:, R + N:].T)
        p["Wdt"], p["Wdt_b"] = in_compute_dtype(self.dt_proj.kernel[...]), in_compute_dtype(self.dt_proj.bias[...])
        p["A"] = in_compute_dtype(self._A())
        p["Dskip"] = in_compute_dtype(self.D[...])
        p["dtA"] = in_compute_dtype(jax.nn.softplus(self.dtA_proj.bias[...]))  # as event_step computes it
        p["Wout"] = in_compute_dtype(self.out_proj.kernel[...])
        if self.out_proj.bias is not None:
            p["Wout_b"] = in_compute_dtype(self.out_proj.bias[...])
        return Cell(_CELL_STEPS[self.discretization], p, pad_values={"A": -1.0}, blockable=True, policy=POLICY,
                    split=mamba_split(D, self.d_conv))

    def cell_state(self, cache):
        """``{"conv0".."conv{K-1}": (B, D), "h": (B, D, N)}`` from the cache, in the compute dtype."""
        dtype = compute_dtype(cache["lrnn_state"].dtype)
        return {**conv.conv_cell_state(cache["conv_state"], dtype), "h": cache["lrnn_state"].astype(dtype)}

    def cell_cache(self, state, like):
        return {"conv_state": conv.conv_cell_cache(state, like["conv_state"]),
                "lrnn_state": state["h"].astype(like["lrnn_state"].dtype)}

    def cell_inputs(self, shape, integration_timesteps=None):
        """Event mode: ``{"tau": (*shape,)}``; otherwise no per-token inputs."""
        if integration_timesteps is None:
            return {}
        tau = jnp.asarray(integration_timesteps)
        return {"tau": tau.astype(compute_dtype(tau.dtype)).reshape(shape)}

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int = 1, dtype=None):
        """``{"conv_state": (batch_size, D, d_conv), "lrnn_state": (batch_size, D, N)}`` zeros."""
        batch_size, _ = check_cache_size(batch_size, max_seqlen)
        state_dtype = self._state_dtype(dtype, False)
        return {
            "conv_state": jnp.zeros((batch_size, self.d_inner, self.d_conv), state_dtype),
            "lrnn_state": jnp.zeros((batch_size, self.d_inner, self.d_state), state_dtype),
        }

    # ------------------------------------------------------- speculative verification
    def verify_cache_from(self, checkpoint, num_tokens: int, dtype=None, *, checkpointed_ssu: Optional[bool] = None):
        """The verify cache. With ``checkpointed_ssu`` (default: for the ``"mamba"`` discretization, which the op
        computes) the checkpointed SSU's (:mod:`lrnnx_jax.core.speculative`, the op's per-channel variant:
        one head of ``d_inner`` channels); else the generic one, which event mode (``integration_timesteps``)
        and the other discretizations need."""
        if checkpointed_ssu is None:
            checkpointed_ssu = self.discretization == "mamba"
        if not checkpointed_ssu:
            return super().verify_cache_from(checkpoint, num_tokens, dtype)
        if self.discretization != "mamba":
            raise ValueError(f"checkpointed_ssu=True needs discretization='mamba' (the op's exp(dt A)), got {self.discretization!r}")
        return speculative.ssu_verify_cache(checkpoint, check_positive_int(num_tokens, "num_tokens"), self.d_inner, 1,
                                            self.d_inner, 1, self.d_state, True, dtype)

    def verify(self, x, cache, num_accepted, tau, old_tau, config):
        """T drafted tokens through the checkpointed SSU when the cache is the SSU's (see :meth:`verify_cache_from`)."""
        if "old_conv_in" not in cache:
            return super().verify(x, cache, num_accepted, tau, old_tau, config)
        if tau is not None:
            raise ValueError("integration_timesteps (event mode) need the generic verify cache: build it with "
                             "allocate_verify_cache(..., checkpointed_ssu=False)")
        batch, T = x.shape[:2]
        x_in, z = self._split_in_proj(x)
        conv_state, u = speculative.replay_conv(cache, num_accepted, x_in, self.conv_weight[...], self._conv_bias())
        u = jax.nn.silu(u)
        r, B_t, C_t = self._x_proj(u)
        f = x.dtype
        per_channel = lambda a: a.reshape(batch, T, 1, self.d_inner)  # noqa: E731  (one head of d_inner channels)
        y, new_cache = speculative.run_ssu(
            cache, num_accepted, conv_state, x_in, per_channel(u), per_channel(r @ self.dt_proj.kernel[...].astype(f)),
            self._A()[None].astype(f), B_t[:, :, None], C_t[:, :, None], D=self.D[...][None].astype(f), z=per_channel(z),
            dt_bias=self.dt_proj.bias[...][None].astype(f), config=config)
        return self.out_proj(y.reshape(batch, T, self.d_inner)), new_cache

    def lrnnx_entries(self):
        entries = {
            **lrnnx_linear_entries("in_proj", self.in_proj),
            "conv1d.weight": lrnnx_entry(self.conv_weight, shape=(self.d_inner, 1, self.d_conv)),
            **lrnnx_linear_entries("x_proj", self.x_proj),
            **lrnnx_linear_entries("dt_proj", self.dt_proj),
            **lrnnx_linear_entries("dtA_proj", self.dtA_proj),
            "A_log": lrnnx_entry(self.A_log),
            "D": lrnnx_entry(self.D),
            **lrnnx_linear_entries("out_proj", self.out_proj),
        }
        if self.conv_bias is not None:
            entries["conv1d.bias"] = lrnnx_entry(self.conv_bias)
        return entries

    def mamba_ssm_entries(self):
        """``mamba_ssm``'s Mamba-1 layout (``mamba_ssm.modules.mamba_simple.Mamba``): lrnnx's without ``dtA_proj``,
        which ``mamba_ssm`` does not have. ``dtA_proj`` acts only in event mode (``integration_timesteps``), so a
        loaded model keeps its initialisation there and computes ``mamba_ssm``'s function otherwise."""
        return {name: entry for name, entry in self.lrnnx_entries().items() if not name.startswith("dtA_proj.")}
