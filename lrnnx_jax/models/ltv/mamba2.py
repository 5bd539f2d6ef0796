"""Mamba-2 (Dao & Gu, 2024, *Transformers are SSMs*), the layer of ``mamba_ssm.modules.mamba2.Mamba2``.

For the block input ``u_t`` (H,), with ``D = expand * H`` channels in ``nheads = D / headdim``
heads of ``headdim`` channels, ``ngroups`` groups of heads sharing ``B`` and ``C``, and state size ``N``::

    [z_t; xBC_t; dt_t] = W_in u_t                                (D,), (D + 2 G N,), (nheads,)
    [x_t; B_t; C_t]    = SiLU(conv(xBC)_t)                       causal depthwise conv; B_t, C_t (G, N)
    Delta_t            = softplus(dt_t + dt_bias)                (nheads,), clamped to dt_limit
    A                  = -exp(A_log)                             (nheads,): one scalar per head
    h_t[c]             = exp(Delta_t[h(c)] A[h(c)]) h_{t-1}[c] + Delta_t[h(c)] x_t[c] B_t[g(c)]   (D, N)
    y_t[c]             = C_t[g(c)] . h_t[c] + D_skip[h(c)] x_t[c]
    y_t                = RMSNorm_G(y_t * SiLU(z_t))              gated RMSNorm over each group's channels
    out_t              = W_out y_t

``h(c)`` is the head of channel ``c`` and ``g(c)`` its group (``nheads / ngroups`` consecutive heads per
group). ``norm_before_gate=True`` gates after the norm; ``rmsnorm=False`` only gates; ``D_has_hdim`` gives
one skip per channel. The state is ``(nheads, headdim, N)`` per row, as ``mamba_ssm``'s ``ssm_state``.

The forward runs the recurrence with ``scan_method``: ``"scan"`` (the default) through
:func:`lrnnx_jax.core.scan.chunked_scan` (``chunk_size`` steps per chunk, the state of every step inside a chunk,
elementwise), ``"ssd"`` through :func:`lrnnx_jax.core.ssd.ssd_chunked`, Mamba-2's chunked SSD matmul form
(``chunk_size`` steps per chunk; under TF32 matmuls on a GPU it is less accurate, see :mod:`lrnnx_jax.core.ssd`).
Both return the final state, so ``return_cache=True`` gives the same cache. The step is the model's cell
(:func:`mamba2_cell_step`), which ``step``, ``multi_step``, ``generate`` and the Pallas kernels run.
``lrnnx_jax.convert.from_mamba_ssm("Mamba2", kwargs, state_dict)`` loads ``mamba_ssm`` checkpoints.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrnnx_jax.core import conv, speculative
from lrnnx_jax.core.base import LRNN, in_compute_dtype, compute_dtype, linear_blocks, lrnnx_entry, lrnnx_linear_entries, torch_linear
from lrnnx_jax.core.scan import chunked_scan
from lrnnx_jax.core.ssd import ssd_chunked
from lrnnx_jax.core.validation import check_cache_size, check_chunk_size, check_positive_int
from pallas_kernels import kernel_math as km
from pallas_kernels.cells import Cell, KernelPolicy

#: the forward's scans (``scan_method``); the default "scan" is the path of the tests' references and of the earlier
#: benchmarks: "ssd" has not been measured against it on a GPU yet
SCAN_METHODS = ("scan", "ssd")

#: not measured on a GPU yet: "auto" keeps the XLA paths (``use_kernels="always"`` runs the kernels)
POLICY = KernelPolicy(rollout_max_batch=0, step_max_batch=0,
                      evidence="Mamba2's kernels have not been measured against the XLA paths yet")


def gated_rmsnorm(y, z, weight, groups: int, eps: float, norm_before_gate: bool, rmsnorm: bool):
    """``mamba_ssm``'s ``RMSNormGated`` over ``groups`` equal groups of the last axis (plain gating when not
    ``rmsnorm``): ``y, z (..., D)``, ``weight (D,)``."""
    if not rmsnorm:
        return y * jax.nn.silu(z)
    if not norm_before_gate:
        y = y * jax.nn.silu(z)
    grouped = y.reshape(*y.shape[:-1], groups, -1)
    normed = grouped * jax.lax.rsqrt(jnp.mean(grouped * grouped, axis=-1, keepdims=True) + eps)
    y = normed.reshape(y.shape) * weight
    return y * jax.nn.silu(z) if norm_before_gate else y


def mamba2_cell_step(params, state, u, inputs, precision, *, K: int, channels_per_group: int, eps: float,
                     norm_before_gate: bool, rmsnorm: bool, dt_limit: tuple[float, float]):
    """One step of the Mamba-2 block, the model's cell (:mod:`pallas_kernels.cells`).

    ``u (..., H)``; ``state``: the conv histories of the ``x``, ``B`` and ``C`` parts (``conv_x``
    ``(..., D)``, ``conv_B``/``conv_C`` ``(..., G, N)``) and ``h (..., D, N)`` (channel-major: channel
    ``c`` of head ``c // headdim``). Heads and groups reach the channels through one-hot tiles
    (``E_head (D, nheads)``, ``E_group (D, G)``), so nothing is sliced or reshaped: it lowers in Pallas.
    """
    p = params

    def bias(name):
        return p[name] if name in p else 0.0

    z = km.project(u, p["Wz"], 1, precision) + bias("Wz_b")
    x_raw = km.project(u, p["Wx"], 1, precision) + bias("Wx_b")
    B_raw = km.project(u, p["WB"], 2, precision) + bias("WB_b")
    C_raw = km.project(u, p["WC"], 2, precision) + bias("WC_b")
    dt_raw = km.project(u, p["Wdt"], 1, precision) + bias("Wdt_b")
    x, conv_x = conv.conv_cell_step(p["conv_x"], state["conv_x"], x_raw, K)
    B, conv_B = conv.conv_cell_step(p["conv_B"], state["conv_B"], B_raw, K)
    C, conv_C = conv.conv_cell_step(p["conv_C"], state["conv_C"], C_raw, K)
    x, B, C = km.silu(x), km.silu(B), km.silu(C)
    dt = km.softplus(dt_raw + p["dt_bias"])  # (..., nheads)
    if dt_limit != (0.0, float("inf")):
        dt = jnp.clip(dt, *dt_limit)
    dt = km.contract(dt, p["E_head"], 1, precision)  # (..., D): each channel its head's step
    E_group = p["E_group"][:, :, None]  # (D, G, 1)
    B_c = jnp.sum(E_group * B[..., None, :, :], axis=-2)  # (..., D, N): each channel its group's B
    C_c = jnp.sum(E_group * C[..., None, :, :], axis=-2)
    h = jnp.exp(dt * p["A"])[..., None] * state["h"] + (dt * x)[..., None] * B_c
    h = h.astype(state["h"].dtype)
    y = jnp.sum(h * C_c, axis=-1) + p["Dskip"] * x
    gate = km.silu(z)
    if rmsnorm:
        if not norm_before_gate:
            y = y * gate
        per_group = km.contract(y * y, p["E_group"], 0, precision) * (1.0 / channels_per_group)  # each group's mean
        y = y * km.contract(jax.lax.rsqrt(per_group + eps), p["E_group"], 1, precision) * p["norm"]
        if norm_before_gate:
            y = y * gate
    else:
        y = y * gate
    out = km.project(y, p["Wout"], 0, precision) + bias("Wout_b")
    return out, {"conv_x": conv_x, "conv_B": conv_B, "conv_C": conv_C, "h": h}




class Mamba2(LRNN):
    """The Mamba-2 block, with ``mamba_ssm``'s constructor arguments and defaults.

    Args:
      d_model: H, input and output features.
      d_state: N, state size per channel.
      d_conv: kernel size of the causal depthwise conv (over x, B and C).
      conv_init: if given, the conv weights are drawn from ``U(+-conv_init)`` (else torch's Conv1d init).
      expand: ``D = expand * H`` channels.
      headdim: channels per head; ``D`` must be a multiple of it.
      d_ssm: must be None (the ``mamba_ssm`` option of an extra gated-MLP branch is not implemented).
      ngroups: groups of heads sharing ``B`` and ``C``; divides ``nheads``.
      A_init_range: ``A = -U(A_init_range)`` per head at initialisation.
      D_has_hdim: one skip ``D`` per channel instead of per head.
      rmsnorm, norm_before_gate: the gated RMSNorm (see the module docstring).
      dt_min, dt_max, dt_init_floor: at initialisation ``softplus(dt_bias)`` is log-uniform in
        ``[dt_min, dt_max]``, floored at ``dt_init_floor``.
      dt_limit: ``(lo, hi)``: each step is clamped to it (default: no clamp).
      bias: biases of ``in_proj`` and ``out_proj``; conv_bias: bias of the conv.
      chunk_size: steps per chunk of the forward's scan (None: unchunked, 1: sequential).
      scan_method: the forward's scan, ``"scan"`` (:func:`~lrnnx_jax.core.scan.chunked_scan`, the default, kept
        until the two are measured on a GPU) or ``"ssd"`` (:func:`~lrnnx_jax.core.ssd.ssd_chunked`, the chunked
        matmul form of ``mamba_ssm``'s training kernels; its matmuls run at the caller's precision, TF32 by
        default on recent NVIDIA GPUs).
      learnable_init_states: must be False (not implemented).
      activation: ``"silu"`` or ``"swish"`` (the same function).
      use_mem_eff_path, layer_idx, device, sequence_parallel, process_group: accepted for ``mamba_ssm``
        compatibility and unused.
      dtype: parameter dtype (float32 when None).
      rngs: ``nnx.Rngs`` (the ``params`` stream is used).

    The inference cache is ``{"conv_state": (B, D + 2 G N, d_conv)`` (the last raw, pre-conv inputs of
    the conv over ``[x; B; C]``, newest last), ``"lrnn_state": (B, nheads, headdim, N)}``.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        conv_init: Optional[float] = None,
        expand: int = 2,
        headdim: int = 64,
        d_ssm: Optional[int] = None,
        ngroups: int = 1,
        A_init_range: tuple[float, float] = (1, 16),
        D_has_hdim: bool = False,
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = (0.0, float("inf")),
        bias: bool = False,
        conv_bias: bool = True,
        chunk_size: Optional[int] = 256,
        use_mem_eff_path: bool = True,
        layer_idx: Optional[int] = None,
        process_group=None,
        sequence_parallel: bool = True,
        device=None,
        dtype=None,
        *,
        learnable_init_states: bool = False,
        activation: str = "swish",
        scan_method: str = "scan",
        rngs: nnx.Rngs,
    ):
        H = self.d_model = check_positive_int(d_model, "d_model")
        N = self.d_state = check_positive_int(d_state, "d_state")
        K = self.d_conv = check_positive_int(d_conv, "d_conv")
        self.expand = check_positive_int(expand, "expand")
        P = self.headdim = check_positive_int(headdim, "headdim")
        G = self.ngroups = check_positive_int(ngroups, "ngroups")
        D = self.d_inner = self.expand * H
        if d_ssm is not None and d_ssm != D:
            raise ValueError(f"d_ssm={d_ssm!r} (an extra gated-MLP branch) is not implemented; pass d_ssm=None")
        if learnable_init_states:
            raise ValueError("learnable_init_states=True is not implemented; pass False")
        if activation not in ("silu", "swish"):
            raise ValueError(f"activation must be 'silu' or 'swish', got {activation!r}")
        if D % P:
            raise ValueError(f"d_inner = expand * d_model = {D} must be a multiple of headdim={P}")
        nheads = self.nheads = D // P
        if nheads % G:
            raise ValueError(f"ngroups={G} must divide nheads = d_inner / headdim = {nheads}")
        lo, hi = A_init_range
        if not 0 < lo <= hi:
            raise ValueError(f"A_init_range must satisfy 0 < lo <= hi, got {tuple(A_init_range)}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        if not 0 <= dt_limit[0] < dt_limit[1]:
            raise ValueError(f"dt_limit must satisfy 0 <= lo < hi, got {tuple(dt_limit)}")
        chunk_size = check_chunk_size(chunk_size)
        if scan_method not in SCAN_METHODS:
            raise ValueError(f"scan_method must be one of {SCAN_METHODS}, got {scan_method!r}")
        self.scan_method = scan_method
        self.D_has_hdim, self.rmsnorm, self.norm_before_gate = bool(D_has_hdim), bool(rmsnorm), bool(norm_before_gate)
        self.dt_limit, self.chunk_size, self.layer_idx, self.eps = (float(dt_limit[0]), float(dt_limit[1])), chunk_size, layer_idx, 1e-5
        param_dtype = dtype or jnp.float32
        self.conv_dim = D + 2 * G * N
        self.in_proj = torch_linear(H, 2 * D + 2 * G * N + nheads, use_bias=bias, rngs=rngs, param_dtype=param_dtype)
        bound = conv_init if conv_init is not None else 1 / math.sqrt(K)  # torch Conv1d init: fan_in = d_conv
        self.conv_weight = nnx.Param(jax.random.uniform(rngs.params(), (self.conv_dim, K), param_dtype, -bound, bound))
        conv_bound = 1 / math.sqrt(K)
        self.conv_bias = (nnx.Param(jax.random.uniform(rngs.params(), (self.conv_dim,), param_dtype, -conv_bound, conv_bound))
                          if conv_bias else None)
        log_dt = jax.random.uniform(rngs.params(), (nheads,), jnp.float32, math.log(dt_min), math.log(dt_max))
        dt = jnp.maximum(jnp.exp(log_dt), dt_init_floor)
        self.dt_bias = nnx.Param(dt + jnp.log(-jnp.expm1(-dt)))  # softplus^-1(dt)
        self.A_log = nnx.Param(jnp.log(jax.random.uniform(rngs.params(), (nheads,), jnp.float32, lo, hi)))
        self.D = nnx.Param(jnp.ones((D,) if self.D_has_hdim else (nheads,), jnp.float32))
        self.norm_weight = nnx.Param(jnp.ones((D,), param_dtype)) if self.rmsnorm else None
        self.out_proj = torch_linear(D, H, use_bias=bias, rngs=rngs, param_dtype=param_dtype)

    # ------------------------------------------------- shared by forward and cell
    def _split_in_proj(self, u):
        """``u (..., H)`` -> ``(z (..., D), xBC (..., D + 2GN), dt (..., nheads))`` (one contraction each:
        :func:`linear_blocks`)."""
        return linear_blocks(self.in_proj, u, (self.d_inner, self.conv_dim, self.nheads))

    def _per_channel(self, a):
        """A per-head ``(..., nheads)`` array repeated over each head's channels: ``(..., D)``."""
        return jnp.repeat(a, self.headdim, axis=-1)

    def _skip(self):
        """``D`` per channel ``(D,)``."""
        return self.D[...] if self.D_has_hdim else self._per_channel(self.D[...])

    def _step_size(self, dt):
        return jnp.clip(jax.nn.softplus(dt + self.dt_bias[...]), *self.dt_limit)

    def _norm(self, y, z):
        weight = None if self.norm_weight is None else self.norm_weight[...]
        return gated_rmsnorm(y, z, weight, self.ngroups, self.eps, self.norm_before_gate, self.rmsnorm)

    # ------------------------------------------------------------------- model
    def _forward(self, u, integration_timesteps, mask, lengths, return_cache, cache=None):
        batch = u.shape[0]
        D, G, N = self.d_inner, self.ngroups, self.d_state
        z, xBC_raw, dt = self._split_in_proj(u)
        conv_state = None if cache is None else cache["conv_state"]
        xBC = jax.nn.silu(conv.causal_conv1d(xBC_raw, self.conv_weight[...], self._conv_bias(), conv_state=conv_state))
        x, B, C = jnp.split(xBC, [D, D + G * N], axis=-1)
        h0 = (jnp.zeros((batch, self.nheads, self.headdim, N), u.dtype) if cache is None
              else cache["lrnn_state"].astype(u.dtype))
        y, h_last = self._ssm(x, self._step_size(dt), B, C, h0, mask)
        y = self._norm(y + self._skip() * x, z)
        new_cache = None
        if return_cache:
            new_cache = {"conv_state": conv.conv_state_after(xBC_raw, self.d_conv, lengths, conv_state=conv_state),
                         "lrnn_state": h_last}
        return self.out_proj(y), new_cache

    def _ssm(self, x, dt, B, C, h0, mask):
        """The SSM over the sequence by ``scan_method``, without the skip: ``x (B, L, D)``, ``dt (B, L, nheads)``,
        ``B, C (B, L, G N)``, ``h0 (B, nheads, headdim, N)``, ``mask (B, L)`` or None ->
        ``(y (B, L, D), h_last (B, nheads, headdim, N))``."""
        batch, length, D = x.shape
        G, N, nheads, P = self.ngroups, self.d_state, self.nheads, self.headdim
        A = -jnp.exp(self.A_log[...])
        if self.scan_method == "ssd":
            grouped = (batch, length, G, N)
            y, h_last = ssd_chunked(x.reshape(batch, length, nheads, P), dt, A, B.reshape(grouped),
                                    C.reshape(grouped), h0, mask, chunk_size=self.chunk_size)
            return y.reshape(batch, length, D), h_last
        inputs = {"x": x, "dt": self._per_channel(dt), "B": B, "C": C}
        A = self._per_channel(A)
        heads_per_group = D // G

        def per_channel_group(a):  # (B, T, G * N) -> (B, T, D, N): each channel its group's vector
            return jnp.repeat(a.reshape(*a.shape[:-1], G, N), heads_per_group, axis=-2)

        def coefficients(chunk):
            a = jnp.exp(chunk["dt"] * A)[..., None]
            return a, (chunk["dt"] * chunk["x"])[..., None] * per_channel_group(chunk["B"])

        def readout(h, chunk):
            return jnp.sum(h * per_channel_group(chunk["C"]).astype(h.dtype), axis=-1)

        y, h_last = chunked_scan(coefficients, readout, inputs, h0.reshape(batch, D, N), mask, self.chunk_size)
        return y, h_last.reshape(h0.shape)

    def _conv_bias(self):
        return None if self.conv_bias is None else self.conv_bias[...]

    # ---------------------------------------------------------------- the cell
    def cell(self) -> Cell:
        """The block's step (:func:`mamba2_cell_step`) with its parameters as separate tiles: ``Wz``/``Wx``
        ``(D, H)``, ``WB``/``WC`` ``(G, N, H)``, ``Wdt`` ``(nheads, H)``, ``Wout`` ``(D, H)``, the three
        convs' taps, and the per-channel ``A``, ``Dskip`` with the one-hot head and group maps."""
        D, G, N, nheads = self.d_inner, self.ngroups, self.d_state, self.nheads
        W_in = in_compute_dtype(self.in_proj.kernel[...]).T  # (2D + 2GN + nheads, H)
        parts = np.cumsum([0, D, D, G * N, G * N, nheads])
        Wz, Wx, WB, WC, Wdt = (W_in[a:b] for a, b in zip(parts[:-1], parts[1:]))
        p = {"Wz": Wz, "Wx": Wx, "WB": WB.reshape(G, N, -1), "WC": WC.reshape(G, N, -1), "Wdt": Wdt}
        if self.in_proj.bias is not None:
            b = in_compute_dtype(self.in_proj.bias[...])
            bz, bx, bB, bC, bdt = (b[a:c] for a, c in zip(parts[:-1], parts[1:]))
            p.update({"Wz_b": bz, "Wx_b": bx, "WB_b": bB.reshape(G, N), "WC_b": bC.reshape(G, N), "Wdt_b": bdt})
        w, cb = self.conv_weight[...], self._conv_bias()
        split = lambda a, i: None if a is None else a[D + i * G * N: D + (i + 1) * G * N].reshape(G, N, *a.shape[1:])  # noqa: E731
        p["conv_x"] = conv.conv_cell_params(w[:D], None if cb is None else cb[:D])
        p["conv_B"] = conv.conv_cell_params(split(w, 0), split(cb, 0))
        p["conv_C"] = conv.conv_cell_params(split(w, 1), split(cb, 1))
        dtype = W_in.dtype
        p["dt_bias"] = in_compute_dtype(self.dt_bias[...])
        p["A"] = in_compute_dtype(self._per_channel(-jnp.exp(self.A_log[...])))
        p["Dskip"] = in_compute_dtype(self._skip())
        p["E_head"] = jax.nn.one_hot(jnp.arange(D) // self.headdim, nheads, dtype=dtype)
        p["E_group"] = jax.nn.one_hot(jnp.arange(D) // (D // G), G, dtype=dtype)
        if self.norm_weight is not None:
            p["norm"] = in_compute_dtype(self.norm_weight[...])
        p["Wout"] = in_compute_dtype(self.out_proj.kernel[...])
        if self.out_proj.bias is not None:
            p["Wout_b"] = in_compute_dtype(self.out_proj.bias[...])
        step = functools.partial(mamba2_cell_step, K=self.d_conv, channels_per_group=D // G, eps=self.eps,
                                 norm_before_gate=self.norm_before_gate, rmsnorm=self.rmsnorm, dt_limit=self.dt_limit)
        return Cell(step, p, blockable=False, policy=POLICY)

    def cell_state(self, cache):
        """The conv histories of the x, B and C parts and ``h (B, D, N)``, in the compute dtype."""
        D, G, N = self.d_inner, self.ngroups, self.d_state
        dtype = compute_dtype(cache["lrnn_state"].dtype)
        conv_state = cache["conv_state"]
        batch = conv_state.shape[0]
        return {
            "conv_x": conv.conv_cell_state(conv_state[:, :D], dtype),
            "conv_B": conv.conv_cell_state(conv_state[:, D:D + G * N].reshape(batch, G, N, -1), dtype),
            "conv_C": conv.conv_cell_state(conv_state[:, D + G * N:].reshape(batch, G, N, -1), dtype),
            "h": cache["lrnn_state"].reshape(batch, D, N).astype(dtype),
        }

    def cell_cache(self, state, like):
        conv_like, h_like = like["conv_state"], like["lrnn_state"]
        batch, K = conv_like.shape[0], conv_like.shape[-1]
        G, N = self.ngroups, self.d_state
        grouped = jax.ShapeDtypeStruct((batch, G, N, K), conv_like.dtype)
        parts = [conv.conv_cell_cache(state["conv_x"], conv_like[:, :self.d_inner]),
                 conv.conv_cell_cache(state["conv_B"], grouped).reshape(batch, G * N, K),
                 conv.conv_cell_cache(state["conv_C"], grouped).reshape(batch, G * N, K)]
        return {"conv_state": jnp.concatenate(parts, axis=1), "lrnn_state": state["h"].reshape(h_like.shape).astype(h_like.dtype)}

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int = 1, dtype=None):
        """``{"conv_state": (batch_size, D + 2GN, d_conv), "lrnn_state": (batch_size, nheads, headdim, N)}`` zeros."""
        batch_size, _ = check_cache_size(batch_size, max_seqlen)
        state_dtype = self._state_dtype(dtype, False)
        return {
            "conv_state": jnp.zeros((batch_size, self.conv_dim, self.d_conv), state_dtype),
            "lrnn_state": jnp.zeros((batch_size, self.nheads, self.headdim, self.d_state), state_dtype),
        }

    # ------------------------------------------------------- speculative verification
    @property
    def verifies_with_ssu(self) -> bool:
        """Whether :meth:`verify_step` runs ``pallas_kernels.checkpointing_ssu`` (FlashInfer's checkpointed
        replay); not with a ``dt_limit`` clamp, which the op does not apply (then the generic replay runs)."""
        return self.dt_limit == (0.0, float("inf"))

    def verify_cache_from(self, checkpoint, num_tokens: int, dtype=None):
        """The verify cache of the checkpointed SSU (:mod:`lrnnx_jax.core.speculative`), or the generic one with a
        ``dt_limit`` clamp."""
        if not self.verifies_with_ssu:
            return super().verify_cache_from(checkpoint, num_tokens, dtype)
        return speculative.ssu_verify_cache(checkpoint, check_positive_int(num_tokens, "num_tokens"), self.conv_dim,
                                            self.nheads, self.headdim, self.ngroups, self.d_state, False, dtype)

    def verify(self, u, cache, num_accepted, tau, old_tau, config):
        """T drafted tokens through the checkpointed SSU (:mod:`lrnnx_jax.core.speculative`)."""
        if "old_conv_in" not in cache:
            return super().verify(u, cache, num_accepted, tau, old_tau, config)
        batch, T = u.shape[:2]
        D, G, N = self.d_inner, self.ngroups, self.d_state
        z, xBC_raw, dt = self._split_in_proj(u)
        conv_state, xBC = speculative.replay_conv(cache, num_accepted, xBC_raw, self.conv_weight[...], self._conv_bias())
        x, B, C = jnp.split(jax.nn.silu(xBC), [D, D + G * N], axis=-1)
        f = u.dtype
        y, new_cache = speculative.run_ssu(
            cache, num_accepted, conv_state, xBC_raw, x.reshape(batch, T, self.nheads, self.headdim), dt,
            -jnp.exp(self.A_log[...]).astype(f), B.reshape(batch, T, G, N), C.reshape(batch, T, G, N),
            D=None if self.D_has_hdim else self.D[...].astype(f), z=None, dt_bias=self.dt_bias[...].astype(f), config=config)
        y = y.reshape(batch, T, D)
        if self.D_has_hdim:
            y = y + self.D[...] * x
        return self.out_proj(self._norm(y, z)), new_cache

    def mamba_ssm_entries(self):
        """The ``mamba_ssm`` ``state_dict`` layout of this block (see :func:`lrnnx_jax.convert.from_mamba_ssm`)."""
        entries = {
            **lrnnx_linear_entries("in_proj", self.in_proj),
            "conv1d.weight": lrnnx_entry(self.conv_weight, shape=(self.conv_dim, 1, self.d_conv)),
            "dt_bias": lrnnx_entry(self.dt_bias),
            "A_log": lrnnx_entry(self.A_log),
            "D": lrnnx_entry(self.D),
            **lrnnx_linear_entries("out_proj", self.out_proj),
        }
        if self.conv_bias is not None:
            entries["conv1d.bias"] = lrnnx_entry(self.conv_bias)
        if self.norm_weight is not None:
            entries["norm.weight"] = lrnnx_entry(self.norm_weight)
        return entries
