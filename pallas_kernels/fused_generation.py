"""Fused generation: the whole closed-loop rollout of one layer in one Pallas kernel.

``generate`` runs ``y_t = step(x_t)``, ``x_{t+1} = y_t`` for ``num_steps`` steps. Even as
one XLA program, every step costs several kernel launches and a loop iteration
for very little work. Here one ``pallas_call`` runs all the steps: each program
owns one batch row (or a block of rows), loads the parameters once, keeps the
state on chip, writes each output and feeds it back as the next input without
leaving the kernel. Rows are independent, so there is no grid-wide sync.

**Cells.** A model enters the kernel as a :class:`Cell`: its parameters in the
kernel layout (float32, padded to powers of two with zeros that keep the padded
lanes at zero), its state, and a pure ``step`` written with the operations that
lower in Pallas (elementwise ``jnp``, reductions, :func:`mv`). One driver,
:func:`run_cell`, builds the ``pallas_call`` for every cell. The cells:

* **diagonal** (LRU, S5 LTI and LTV with event mode, Centaurus in every mode):
  ``h = A_bar h + B_bar x``, ``y = Re(C h) + skip(x)``, complex values as
  :class:`~pallas_kernels.complex_lib.Planes`. ``(A_bar, B_bar, C)`` come from the
  model's own ``discrete_system`` (the single definitions of the discretizations);
  in event mode ``A_bar`` of every step is computed from the known timesteps
  before the kernel and streamed in.
* **mamba** (Mamba/S6, every discretization, event mode, conv state): in_proj,
  the causal conv, x_proj, dt_proj, the selective update with the in-kernel
  discretization of :mod:`pallas_kernels.kernel_math`, the gate and out_proj.
* **rglru** (RG-LRU): gate and input projections, conv, the gates, the RG-LRU
  update (``kernel_math``'s ``"rglru"``) and out_proj.
* **s4** (S4 and S4D): the S4 block (bottleneck, input gate, channels, output gate,
  GELUs, output layer) around the per-channel SSMs: S4D's diagonal ones from its
  ``discrete_system``, S4's DPLR ones in the ``O(N r)`` factored form of
  :func:`lrnnx_jax.models.lti.s4.dplr_factors` (``A_bar h - sum_s L_s (R_s . h)``,
  never the dense ``N x N`` matrix).
* **s7** (S7): in_proj, the per-token ``B_t``, ``C_t`` contracted in the kernel from
  the ``2 H^2 N`` weights of ``x_proj`` (held as two ``(H, H, N)`` tiles, so only
  small ``H, N`` fit on chip), the ``"s7"`` transition of ``kernel_math``, the gate
  and the residual.

For whatever does not fit on chip, :func:`fused_generate_supported` gives the
reason and the caller keeps the compile-once XLA program.

**Accuracy.** With one row per program (the default up to :data:`MAX_ROWS_PATH_BATCH`
rows) every product is an IEEE float32 multiply-add, so the rollout equals the
unfused ``generate`` at ``precision="highest"`` up to float32 rounding. Blocks of
rows (diagonal cells, large batches) use tensor-core dots in 3-pass TF32
(``TF32_TF32_F32_X3``, float32 accuracy); ``FusedConfig(precision="fast")`` is the
explicit, less precise 1-pass TF32 option.

Public API: :func:`fused_generate_supported`, :func:`fused_generate`,
:func:`use_fused_kernel` (the ``use_kernels`` switch of :mod:`pallas_kernels.dispatch`)
and :func:`fused_program` (a program builder with the interface of
``lrnnx_jax.generation.PROGRAM_BUILDERS``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import complex_lib as cl
from pallas_kernels import dispatch
from pallas_kernels import kernel_math as km

OP = "fused_generation"
PRECISIONS = ("highest", "ieee", "fast")
#: up to this batch a diagonal cell runs one row per program (exact float32 FMAs); above,
#: blocks of rows with tensor-core dots (a better use of the GPU when every SM has many rows)
MAX_ROWS_PATH_BATCH = 256
#: rows per program of the block path when ``FusedConfig.block_batch`` is None
DEFAULT_BLOCK_BATCH = 16
#: largest padded parameter tile (elements) and padded parameter total (float32 numbers)
#: that a program holds: 64 K numbers (256 KiB) is the register file of an SM
MAX_TILE = 1 << 16
MAX_PARAMS = 1 << 17
#: parameter numbers per warp kept in registers for the whole loop (80 registers per
#: thread); the largest other parameters are re-read every step (from L1/L2)
HOIST_PER_WARP = 2560
#: Triton addresses an array with 32-bit offsets
MAX_ELEMENTS = 2**31 - 1
#: above this batch, ``"auto"`` keeps the XLA program for a one-row-per-program Mamba, RG-LRU or S7
#: cell that re-reads parameters every step (every row streams them from L2 at every step)
MAX_STREAMING_BATCH = 512
#: lanes of a padded axis: powers of two, at least this many (tensor-core tiles are >= 16)
MIN_LANES = 16
#: the dot algorithms of the block path on the GPU
GPU_PRECISION = {
    "highest": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
    "ieee": jax.lax.DotAlgorithmPreset.F32_F32_F32,
    "fast": jax.lax.DotAlgorithmPreset.TF32_TF32_F32,
}


@dataclasses.dataclass(frozen=True)
class FusedConfig:
    """Tuning of the fused kernels, in one hashable value.

    Attributes:
      block_batch: rows per program: 1 (exact float32 FMAs, one SM-resident program
        per row), or a power of two >= 16 (tensor-core dots; diagonal cells only).
        None: 1 up to :data:`MAX_ROWS_PATH_BATCH` rows, else :data:`DEFAULT_BLOCK_BATCH`.
      num_warps: warps per program (a power of two); None picks by the parameter size.
      precision: the dots of the block path: ``"highest"`` (3-pass TF32 on the tensor
        cores, float32 accuracy), ``"ieee"`` (float32 multiply-adds, slower) or ``"fast"``
        (1-pass TF32: about 1e-3 relative per product; an explicit opt-in). The
        one-row path always uses float32 multiply-adds.
      interpret: Pallas interpret mode; None: as the process-wide
        :class:`~pallas_kernels.dispatch.KernelConfig` says (by default: when not on an NVIDIA GPU).
    """

    block_batch: Optional[int] = None
    num_warps: Optional[int] = None
    precision: str = "highest"
    interpret: Optional[bool] = None

    def __post_init__(self):
        if self.block_batch is not None and self.block_batch != 1:
            _check_power_of_two("block_batch", self.block_batch, MIN_LANES, "1 or ")
        if self.num_warps is not None:
            _check_power_of_two("num_warps", self.num_warps, 1)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.interpret not in (None, True, False):
            raise ValueError(f"interpret must be None, True or False, got {self.interpret!r}")


def _check_power_of_two(name, value, minimum, also=""):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or value & (value - 1):
        raise ValueError(f"{name} must be {also}a power of two >= {minimum}, got {value!r}")


DEFAULT_CONFIG = FusedConfig()


# ----------------------------------------------------------------------------- kernel math
def mv(v, W, axis: int, precision=None):
    """``v`` contracted with ``W`` (2-D) along ``W``'s ``axis``.

    ``v (K,)`` (one row: multiply-adds and a reduction, exact float32) or ``(R, K)``
    (a block of rows: a dot with ``precision``). ``W`` is ``(M, K)`` for ``axis=1``
    and ``(K, M)`` for ``axis=0``; the result is ``(M,)`` or ``(R, M)``.
    """
    if v.ndim == 1:
        return jnp.sum(W * (v[None, :] if axis == 1 else v[:, None]), axis=axis)
    return jax.lax.dot_general(v, W, (((1,), (axis,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def erf(x):
    """float32 ``erf`` by a rational approximation (abs. error < 5e-7); ``lax.erf`` has no Triton lowering."""
    x = jnp.clip(x, -4.0, 4.0)
    x2 = x * x
    p = -2.72614225801306e-10
    for c in (2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05, -7.34990630326855e-04,
              -2.95459980854025e-03, -1.60960333262415e-02):
        p = p * x2 + c
    q = -1.45660718464996e-05
    for c in (-2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03, -1.42647390514189e-02):
        q = q * x2 + c
    return x * p / q


def gelu(x):
    """Exact (erf) GELU, ``x/2 (1 + erf(x/sqrt 2))``."""
    return 0.5 * x * (1.0 + erf(x * (1.0 / math.sqrt(2.0))))


def sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def _bias(p, name):
    return p[name] if name in p else 0.0


# ----------------------------------------------------------------------------- cells
class Cell(NamedTuple):
    """One model's step inside the kernel.

    Attributes:
      step: ``(params, x, state, inputs, precision) -> (y, state)``; ``x``, ``y`` are
        ``(Hp,)`` for one row or ``(R, Hp)`` for a block; ``state`` and ``inputs`` are
        dicts of per-row values (leading ``R`` axis in a block).
      params: shared arrays, float32, padded.
      state: initial per-row state ``(Bp, ...)``.
      row_inputs: per-row constants ``(Bp, ...)``.
      step_inputs: per-row, per-step values ``(Bp, T, ...)``.
      width: ``(H, Hp)``, the features and their padded count.
      blockable: whether ``step`` also takes blocks of rows (dots).
    """

    step: Callable
    params: dict
    state: dict
    row_inputs: dict
    step_inputs: dict
    width: tuple
    blockable: bool


def _lanes(n: int) -> int:
    return max(MIN_LANES, dispatch.next_power_of_two(n))


def _pad(a, shape, value=0.0):
    a = jnp.asarray(a, jnp.float32)
    return jnp.pad(a, [(0, s - d) for s, d in zip(shape, a.shape)], constant_values=value)


def _pad_rows(a, rows: int):
    return jnp.pad(a, [(0, rows - a.shape[0])] + [(0, 0)] * (a.ndim - 1))


def _planes(z, shape, prefix, out: dict):
    """Store complex (or real) ``z`` padded to ``shape`` as ``prefix_re`` (and ``prefix_im`` if complex)."""
    if jnp.iscomplexobj(z):
        planes = cl.split(z)
        out[prefix + "_re"], out[prefix + "_im"] = _pad(planes.re, shape), _pad(planes.im, shape)
    else:
        out[prefix + "_re"] = _pad(z, shape)


def _value(values, prefix):
    """``Planes`` (or a real array) from the ``prefix_re``/``prefix_im`` entries of ``values``."""
    re = values[prefix + "_re"]
    return cl.Planes(re, values[prefix + "_im"]) if prefix + "_im" in values else re


# --- diagonal: LRU, S5 (LTI, LTV), Centaurus
def diagonal_step(p, x, s, inputs, precision):
    """``h = A_bar h + B_bar x``; ``y = Re(C h) + skip``. ``B_bar``, ``C^T`` are ``(Np, Hp)`` tiles."""
    a = _value(inputs if "a_re" in inputs else p, "a")
    h = cl.Planes(s["h_re"], s["h_im"])
    u = mv(x, p["B_re"], 1, precision)
    if "B_im" in p:
        u = cl.Planes(u, mv(x, p["B_im"], 1, precision))
    h = cl.add(cl.mul(a, h), u)
    y = mv(h.re, p["CT_re"], 0, precision)
    if "CT_im" in p:
        y = y - mv(h.im, p["CT_im"], 0, precision)
    if "D" in p:
        y = y + p["D"] * x
    if "DT" in p:
        y = y + mv(x, p["DT"], 1, precision)
    return y, {"h_re": h.re, "h_im": h.im}


def _diagonal_system(model, taus):
    """``(A_bar, B_bar (N, H), C (H, N), skip)`` from the model's ``discrete_system``.

    ``taus``: None, ``(B,)`` or ``(B, T)``; ``A_bar`` is then ``(N,)``, ``(B, N)`` or
    ``(B, T, N)``. ``skip`` is ``("diag", D (H,))``, ``("full", D (H, H))`` (``y += x @ D``) or None.
    """
    from lrnnx_jax.models.lti import lru, s5 as lti_s5
    from lrnnx_jax.models.ltv import s5 as ltv_s5

    if isinstance(model, lru.LRU):
        return (*model.discrete_system(), ("diag", model.D[...]))
    if isinstance(model, lti_s5.S5):
        return (*model.discrete_system(taus), ("full", model.D[...]))
    if isinstance(model, ltv_s5.S5):
        return (*model.discrete_system(taus), ("diag", model.D[...]))
    return (*model.discrete_system(), None)  # Centaurus (no event mode)


def diagonal_cell(model, batch, taus=None, cache=None) -> Cell:
    """The :class:`Cell` of a diagonal model; ``cache`` (the model's) gives the initial state."""
    rows = batch
    A_bar, B_bar, C, skip = _diagonal_system(model, taus)
    N, H = B_bar.shape
    Np, Hp = _lanes(N), _lanes(H)
    params, row_inputs, step_inputs = {}, {}, {}
    _planes(B_bar, (Np, Hp), "B", params)
    _planes(C.T, (Np, Hp), "CT", params)
    if A_bar.ndim == 1:
        _planes(A_bar, (Np,), "a", params)
    elif A_bar.ndim == 2:
        _planes(A_bar, (rows, Np), "a", row_inputs)
    else:
        _planes(A_bar, (rows, A_bar.shape[1], Np), "a", step_inputs)
    if skip is not None:
        kind, D = skip
        if kind == "diag":
            params["D"] = _pad(D, (Hp,))
        else:
            params["DT"] = _pad(D.T, (Hp, Hp))
    h = jnp.zeros((rows, N), jnp.complex64) if cache is None else cache["lrnn_state"].reshape(rows, N)
    h = cl.split(h)
    state = {"h_re": _pad(h.re, (rows, Np)), "h_im": _pad(h.im, (rows, Np))}
    return Cell(diagonal_step, params, state, row_inputs, step_inputs, (H, Hp), True)


def diagonal_cache(model, state, cache_like):
    """The model's cache from the kernel's final state."""
    ref = cache_like["lrnn_state"]
    N = math.prod(ref.shape[1:])
    h = cl.merge(cl.Planes(state["h_re"][:, :N], state["h_im"][:, :N]), ref.dtype)
    return {"lrnn_state": h.reshape(ref.shape)}


# --- shared by the gated blocks: the causal depthwise conv over K separate history vectors
def _conv_step(p, s, x_in, K):
    """``x_in`` enters the history ``conv0..conv{K-1}`` (oldest first); returns ``(conv output, history)``."""
    history = [s[f"conv{k}"] for k in range(1, K)] + [x_in]
    out = _bias(p, "conv_b")
    for k in range(K):
        out = out + p[f"conv_w{k}"] * history[k]
    return out, {f"conv{k}": history[k] for k in range(K)}


def _conv_params(model, Dp, params):
    w = model.conv_weight[...]
    for k in range(w.shape[1]):
        params[f"conv_w{k}"] = _pad(w[:, k], (Dp,))
    if model.conv_bias is not None:
        params["conv_b"] = _pad(model.conv_bias[...], (Dp,))


def _conv_state(cache, rows, D, Dp, K):
    conv = jnp.zeros((rows, D, K), jnp.float32) if cache is None else cache["conv_state"]
    return {f"conv{k}": _pad(conv[:, :, k], (rows, Dp)) for k in range(K)}


def _conv_cache(state, ref, D, K):
    return jnp.stack([state[f"conv{k}"][:, :D] for k in range(K)], axis=-1).astype(ref.dtype)


def _linear(linear, kernel_shape, p, name):
    """Store an ``nnx.Linear``'s kernel (``(in, out)``) padded to ``kernel_shape``, and its bias as ``name_b``."""
    p[name] = _pad(linear.kernel[...], kernel_shape)
    if linear.bias is not None:
        p[name + "_b"] = _pad(linear.bias[...], kernel_shape[1:])


# --- Mamba
def mamba_step(discretization: str, K: int):
    """The Mamba block's step for one row (see :mod:`lrnnx_jax.models.ltv.mamba`)."""

    def step(p, x, s, inputs, precision):
        x_in = mv(x, p["Win_x"], 1) + _bias(p, "Win_x_b")
        z = mv(x, p["Win_z"], 1) + _bias(p, "Win_z_b")
        pre, conv = _conv_step(p, s, x_in, K)
        u = km.silu(pre)
        r = mv(u, p["Wx_r"], 1)
        B_t = mv(u, p["Wx_B"], 1)
        C_t = mv(u, p["Wx_C"], 1)
        delta = km.softplus(mv(r, p["Wdt"], 0) + p["Wdt_b"])
        delta_A = None if "tau" not in inputs else (inputs["tau"] * p["dtA"])[:, None]
        A_bar, gamma = km.discretize(discretization, p["A"], delta[:, None], delta_A)
        h = A_bar * s["h"] + gamma * B_t[None, :] * u[:, None]
        y = (jnp.sum(h * C_t[None, :], axis=1) + p["Dskip"] * u) * km.silu(z)
        out = mv(y, p["Wout"], 0) + _bias(p, "Wout_b")
        return out, {**conv, "h": h}

    return step


def mamba_cell(model, batch, taus=None, cache=None) -> Cell:
    rows = batch
    H, D, N, R, K = model.d_model, model.d_inner, model.d_state, model.dt_rank, model.d_conv
    Hp, Dp, Np, Rp = _lanes(H), _lanes(D), _lanes(N), _lanes(R)
    p: dict = {}
    W_in = model.in_proj.kernel[...]
    p["Win_x"], p["Win_z"] = _pad(W_in[:, :D].T, (Dp, Hp)), _pad(W_in[:, D:].T, (Dp, Hp))
    if model.in_proj.bias is not None:
        b = model.in_proj.bias[...]
        p["Win_x_b"], p["Win_z_b"] = _pad(b[:D], (Dp,)), _pad(b[D:], (Dp,))
    _conv_params(model, Dp, p)
    W_x = model.x_proj.kernel[...]
    p["Wx_r"], p["Wx_B"], p["Wx_C"] = (_pad(W_x[:, a:b].T, (n, Dp)) for a, b, n in
                                       ((0, R, Rp), (R, R + N, Np), (R + N, R + 2 * N, Np)))
    _linear(model.dt_proj, (Rp, Dp), p, "Wdt")
    p["A"] = _pad(model._A(), (Dp, Np), value=-1.0)  # padded lanes: a finite, nonzero A (zoh divides by A)
    p["Dskip"] = _pad(model.D[...], (Dp,))
    _linear(model.out_proj, (Dp, Hp), p, "Wout")
    row_inputs, step_inputs = {}, {}
    if taus is not None:
        p["dtA"] = _pad(jax.nn.softplus(model.dtA_proj.bias[...]), (Dp,))
        (row_inputs if taus.ndim == 1 else step_inputs)["tau"] = jnp.asarray(taus, jnp.float32)
    h = jnp.zeros((rows, D, N), jnp.float32) if cache is None else cache["lrnn_state"]
    state = {**_conv_state(cache, rows, D, Dp, K), "h": _pad(h, (rows, Dp, Np))}
    return Cell(mamba_step(model.discretization, K), p, state, row_inputs, step_inputs, (H, Hp), False)


def mamba_cache(model, state, cache_like):
    D, N, K = model.d_inner, model.d_state, model.d_conv
    return {"conv_state": _conv_cache(state, cache_like["conv_state"], D, K),
            "lrnn_state": state["h"][:, :D, :N].astype(cache_like["lrnn_state"].dtype)}


# --- RG-LRU
def rglru_step(c: float, K: int):
    """The RG-LRU block's step for one row (see :mod:`lrnnx_jax.models.ltv.rglru`)."""

    def step(p, x, s, inputs, precision):
        g = gelu(mv(x, p["Wg"], 0) + _bias(p, "Wg_b"))
        x_in = mv(x, p["Wi"], 0) + _bias(p, "Wi_b")
        xc, conv = _conv_step(p, s, x_in, K)
        r = sigmoid(mv(xc, p["Wr"], 0) + p["Wr_b"])
        i = sigmoid(mv(xc, p["Wig"], 0) + p["Wig_b"])
        A_bar, gamma = km.discretize("rglru", p["a_log"], c * r)
        h = A_bar * s["h"] + gamma * (i * xc)
        out = mv(g * h, p["Wout"], 0) + _bias(p, "Wout_b")
        return out, {**conv, "h": h}

    return step


def rglru_cell(model, batch, taus=None, cache=None) -> Cell:
    rows = batch
    H, D, K = model.d_model, model.d_inner, model.d_conv
    Hp, Dp = _lanes(H), _lanes(D)
    p: dict = {}
    _linear(model.gate_proj, (Hp, Dp), p, "Wg")
    _linear(model.in_proj, (Hp, Dp), p, "Wi")
    _conv_params(model, Dp, p)
    _linear(model.recurrent_gate_proj, (Dp, Dp), p, "Wr")
    _linear(model.input_gate_proj, (Dp, Dp), p, "Wig")
    p["a_log"] = _pad(model.a_log[...][:, 0], (Dp,))
    _linear(model.out_proj, (Dp, Hp), p, "Wout")
    h = jnp.zeros((rows, D), jnp.float32) if cache is None else cache["lrnn_state"][:, :, 0]
    state = {**_conv_state(cache, rows, D, Dp, K), "h": _pad(h, (rows, Dp))}
    return Cell(rglru_step(model.c, K), p, state, {}, {}, (H, Hp), False)


def rglru_cache(model, state, cache_like):
    D, K = model.d_inner, model.d_conv
    return {"conv_state": _conv_cache(state, cache_like["conv_state"], D, K),
            "lrnn_state": state["h"][:, :D, None].astype(cache_like["lrnn_state"].dtype)}


# --- S4 and S4D: the S4 block around per-channel SSMs (diagonal plus low rank, or diagonal)
def _row_sum(z: cl.Planes) -> cl.Planes:
    """``sum_n z[:, n]`` of complex ``z (H'p, Np)``, kept as ``(H'p, 1)``."""
    return cl.Planes(jnp.sum(z.re, axis=1, keepdims=True), jnp.sum(z.im, axis=1, keepdims=True))


def s4_block_step(channels: int, rank: int, has_input_linear: bool, gate: Optional[str], final_linear: bool):
    """The S4 block's step for one row (see :mod:`lrnnx_jax.models.lti.s4_layer`).

    The SSM state ``h (H'p, Np)`` of every channel is updated as
    ``h <- A_bar h - sum_{s < rank} L_s (R_s . h) + B_bar u`` (``R_s . h`` summed over
    the state): S4's DPLR step in the ``O(N r)`` form of
    :func:`lrnnx_jax.models.lti.s4.dplr_factors`, or S4D's diagonal step (``rank = 0``).
    The SSM output of channel ``j`` is one block ``z_j (H'p,)``; every linear map
    that reads the flattened ``(c h)`` (or ``(h c)``) features is stored as one
    row block per channel (``name{j}``), so no concatenation is needed in the kernel.
    ``gate``: None, ``"blocks"`` (``W_o`` is the identity: ``v`` split into blocks) or
    ``"full"`` (``W_o`` maps the blocks to one gate vector).
    """

    def step(p, x, s, inputs, precision):
        u = mv(x, p["Win"], 0) + p["Win_b"] if has_input_linear else x
        h = cl.Planes(s["h_re"], s["h_im"])
        h_new = cl.add(cl.mul(_value(p, "a"), h), cl.mul(_value(p, "B"), u[:, None]))
        for r in range(rank):
            h_new = cl.sub(h_new, cl.mul(_value(p, f"L{r}"), _row_sum(cl.mul(_value(p, f"R{r}"), h))))
        blocks = [gelu(jnp.sum(cl.real(cl.mul(_value(p, f"C{j}"), h_new)), axis=1) + p[f"D{j}"] * u)
                  for j in range(channels)]
        if gate == "full":
            g = sum(mv(z, p[f"G{j}"], 0) for j, z in enumerate(blocks)) + p["G_b"]
            blocks = [g * gelu(mv(x, p["Wv0"], 0) + p["Wv0_b"])]
        elif gate == "blocks":
            blocks = [z * gelu(mv(x, p[f"Wv{j}"], 0) + p[f"Wv{j}_b"]) for j, z in enumerate(blocks)]
        out = sum(mv(gelu(z), p[f"O{j}"], 0) for j, z in enumerate(blocks)) + _bias(p, "O_b")
        return (gelu(out) if final_linear else out), {"h_re": h_new.re, "h_im": h_new.im}

    return step


def _s4_ssm(model):
    """``(A_bar, B_bar, C, low_rank)`` of an S4 or S4D block: ``A_bar, B_bar (H', S)``, ``C (c, H', S)``.

    S4: the full state (``S = N``, conjugate pairs both present), ``C`` as is, and
    ``low_rank`` the ``rank`` pairs ``(L_s, R_s) (H', N)`` of ``dA = diag(A_bar) - sum_s
    L_s R_s^T`` (per channel) from :func:`lrnnx_jax.models.lti.s4.dplr_factors`. S4D: one half of
    each pair (``S = N/2``), the factor 2 in ``C``, no low-rank pairs.
    """
    from lrnnx_jax.models.lti import s4

    if isinstance(model, s4.S4):
        system = model.discrete_system()
        left, right, dB = s4.dplr_factors(system.A_bar, system.gamma, system.P, system.B)
        return system.A_bar, dB, system.C, list(zip(left, jnp.moveaxis(right, 1, 0)))
    return (*model.discrete_system(), [])


def s4_block_cell(model, batch, taus=None, cache=None) -> Cell:
    """The :class:`Cell` of an S4 or S4D block; ``cache`` (the model's) gives the initial state."""
    rows = batch
    A_bar, B_bar, C, low_rank = _s4_ssm(model)
    Hs, S = A_bar.shape
    c, H = C.shape[0], model.d_model
    Hsp, Sp, Hp = _lanes(Hs), _lanes(S), _lanes(H)
    p: dict = {}
    _planes(A_bar, (Hsp, Sp), "a", p)
    _planes(B_bar, (Hsp, Sp), "B", p)
    for r, (left, right) in enumerate(low_rank):
        _planes(left, (Hsp, Sp), f"L{r}", p)
        _planes(right, (Hsp, Sp), f"R{r}", p)
    for j in range(c):
        _planes(C[j], (Hsp, Sp), f"C{j}", p)
        p[f"D{j}"] = _pad(model.D[...][j], (Hsp,))
    if model.input_linear is not None:
        _linear(model.input_linear, (Hp, Hsp), p, "Win")
    # positions of channel j's H' features in the flattened (c h) or (h c) vector
    index = [jnp.arange(Hs) * c + j if model.swap_channels else j * Hs + jnp.arange(Hs) for j in range(c)]
    gate = None
    if model.input_gate is not None:
        W_v, b_v = model.input_gate.kernel[...], model.input_gate.bias[...]
        if model.output_gate is not None:
            gate, width = "full", W_v.shape[1]
            W_o, b_o = model.output_gate.kernel[...], model.output_gate.bias[...]
            for j in range(c):
                p[f"G{j}"] = _pad(W_o[index[j]], (Hsp, _lanes(width)))
            p["G_b"] = _pad(b_o, (_lanes(width),))
            p["Wv0"], p["Wv0_b"] = _pad(W_v, (Hp, _lanes(width))), _pad(b_v, (_lanes(width),))
            index = [jnp.arange(width)]
        else:
            gate = "blocks"
            for j in range(c):
                p[f"Wv{j}"], p[f"Wv{j}_b"] = _pad(W_v[:, index[j]], (Hp, Hsp)), _pad(b_v[index[j]], (Hsp,))
    width = sum(int(i.shape[0]) for i in index)
    if model.output_linear is not None:
        W_out = model.output_linear.kernel[...]
        p["O_b"] = _pad(model.output_linear.bias[...], (Hp,))
    else:  # the flattened features are the output: a one-hot map (exact)
        W_out = jnp.eye(width, H, dtype=jnp.float32)
    for j, i in enumerate(index):
        p[f"O{j}"] = _pad(W_out[i], (_lanes(int(i.shape[0])), Hp))
    h = jnp.zeros((rows, Hs, S), jnp.complex64) if cache is None else cache["lrnn_state"]
    h = cl.split(h)
    state = {"h_re": _pad(h.re, (rows, Hsp, Sp)), "h_im": _pad(h.im, (rows, Hsp, Sp))}
    step = s4_block_step(c, len(low_rank), model.input_linear is not None, gate, model.output_linear is not None)
    return Cell(step, p, state, {}, {}, (H, Hp), False)


def s4_block_cache(model, state, cache_like):
    ref = cache_like["lrnn_state"]
    Hs, S = ref.shape[1:]
    return {"lrnn_state": cl.merge(cl.Planes(state["h_re"][:, :Hs, :S], state["h_im"][:, :Hs, :S]), ref.dtype)}


# --- S7
def s7_step(p, u, s, inputs, precision):
    """The S7 step for one row (see :mod:`lrnnx_jax.models.ltv.s7`): ``u (Hp,)``, state ``s (Np,)``.

    ``B_t, C_t (Hp, Np)`` are the contractions of ``x = W_in u`` with the 3-D ``x_proj``
    blocks ``WB, WC (Hp (input i), Hp (channel h), Np)``.
    """
    x = mv(u, p["Win"], 0)
    B_t = jnp.sum(p["WB"] * x[:, None, None], axis=0)
    C_t = jnp.sum(p["WC"] * x[:, None, None], axis=0)
    A_bar, gamma = km.discretize("s7", None, mv(x, p["Wa"], 0) + p["base"])
    h = A_bar * s["s"] + gamma * (jnp.sum(B_t * x[:, None], axis=0) + mv(x, p["Wbeta"], 0))
    y = jnp.sum(C_t * h[None, :], axis=1) + mv(x, p["Wd"], 0) * x
    return sigmoid(mv(gelu(y), p["Wg"], 0)) * y + u, {"s": h}


def s7_cell(model, batch, taus=None, cache=None) -> Cell:
    """The :class:`Cell` of S7: ``2 H^2 N`` numbers of ``x_proj`` weights, so only small ``H, N`` fit on chip."""
    rows = batch
    H, N = model.d_model, model.d_state
    Hp, Np = _lanes(H), _lanes(N)
    W_x = model.x_proj.kernel[...]  # (H, N + 2 H N + H + N): a, B, C, d, beta, with B and C flattened (h n)
    p: dict = {"Win": _pad(model.in_proj.kernel[...], (Hp, Hp)), "Wg": _pad(model.gate_proj.kernel[...], (Hp, Hp)),
               "base": _pad(model.base_params[...], (Np,))}
    p["Wa"], p["Wbeta"] = _pad(W_x[:, :N], (Hp, Np)), _pad(W_x[:, -N:], (Hp, Np))
    p["WB"] = _pad(W_x[:, N:N + H * N].reshape(H, H, N), (Hp, Hp, Np))
    p["WC"] = _pad(W_x[:, N + H * N:N + 2 * H * N].reshape(H, H, N), (Hp, Hp, Np))
    p["Wd"] = _pad(W_x[:, N + 2 * H * N:-N], (Hp, Hp))
    s = jnp.zeros((rows, N), jnp.float32) if cache is None else cache["lrnn_state"]
    return Cell(s7_step, p, {"s": _pad(s, (rows, Np))}, {}, {}, (H, Hp), False)


def s7_cache(model, state, cache_like):
    ref = cache_like["lrnn_state"]
    return {"lrnn_state": state["s"][:, :model.d_state].astype(ref.dtype)}


class Family(NamedTuple):
    name: str
    cell: Callable  # (model, batch, taus, cache) -> Cell
    cache: Callable  # (model, final state, cache_like) -> cache


FAMILIES = {
    "diagonal": Family("diagonal", diagonal_cell, diagonal_cache),
    "mamba": Family("mamba", mamba_cell, mamba_cache),
    "rglru": Family("rglru", rglru_cell, rglru_cache),
    "s4": Family("s4", s4_block_cell, s4_block_cache),
    "s7": Family("s7", s7_cell, s7_cache),
}


def family_of(model) -> Optional[Family]:
    """The cell family of ``model``, or None when it has no fused kernel."""
    from lrnnx_jax.models.lti import centaurus, lru, s4, s4d, s5 as lti_s5
    from lrnnx_jax.models.ltv import mamba, rglru, s5 as ltv_s5, s7

    if isinstance(model, (lru.LRU, lti_s5.S5, ltv_s5.S5, centaurus.CentaurusBase)):
        return FAMILIES["diagonal"]
    if isinstance(model, mamba.Mamba):
        return FAMILIES["mamba"]
    if isinstance(model, rglru.RGLRU):
        return FAMILIES["rglru"]
    if isinstance(model, (s4.S4, s4d.S4D)):
        return FAMILIES["s4"]
    if isinstance(model, s7.S7):
        return FAMILIES["s7"]
    return None


# ----------------------------------------------------------------------------- driver
def effective_block_batch(blockable: bool, batch: int, config: FusedConfig) -> int:
    """Rows per program for a cell (``blockable``: it has the block path) under ``config``."""
    if not blockable:
        return 1
    if config.block_batch is not None:
        return config.block_batch
    return 1 if batch <= MAX_ROWS_PATH_BATCH else DEFAULT_BLOCK_BATCH


def _auto_num_warps(param_shapes: dict, block: int, config: FusedConfig) -> int:
    """4 warps for a block of rows; for one row, enough warps to hold the parameters in registers (<= 16)."""
    if config.num_warps is not None:
        return config.num_warps
    if block > 1:
        return 4
    total = sum(math.prod(s) for s in param_shapes.values())
    return int(min(16, max(4, dispatch.next_power_of_two(-(-total // HOIST_PER_WARP)))))


def split_hoisted(param_shapes: dict, num_warps: int) -> tuple[list, list]:
    """Names of the parameters kept in registers (the smallest, up to ``num_warps *
    HOIST_PER_WARP`` numbers) and of those re-read every step."""
    hoisted, streamed, total = [], [], 0
    for name in sorted(param_shapes, key=lambda n: (math.prod(param_shapes[n]), n)):
        total += math.prod(param_shapes[name])
        (hoisted if total <= num_warps * HOIST_PER_WARP else streamed).append(name)
    return sorted(hoisted), sorted(streamed)


def run_cell(cell: Cell, x0, num_steps: int, *, config: FusedConfig = DEFAULT_CONFIG, time_major: bool = False,
             num_valid=None):
    """Run ``num_steps`` closed-loop steps of ``cell`` in one ``pallas_call``.

    Args:
      cell: a :class:`Cell` whose per-row arrays have ``x0.shape[0]`` rows.
      x0: ``(B, H)`` float32, the first input.
      num_steps: T, the output length (static).
      config: a :class:`FusedConfig`.
      time_major: outputs ``(T, B, H)`` instead of ``(B, T, H)``.
      num_valid: optional int32 scalar <= T: only that many steps run (the rest of
        the output is unspecified) and the state is the one after them.

    Returns:
      ``(ys, state)``: the outputs (float32) and the final state (per-row arrays as in ``cell.state``).
    """
    pl, plgpu = dispatch.pallas_modules()
    batch = x0.shape[0]
    H, Hp = cell.width
    block = effective_block_batch(cell.blockable, batch, config)
    rows = -(-batch // block) * block
    interpret = dispatch.interpret_mode(
        dispatch.get_config() if config.interpret is None else dispatch.KernelConfig(interpret=config.interpret))
    precision = jax.lax.Precision.HIGHEST if interpret else GPU_PRECISION[config.precision]
    param_shapes = {k: tuple(v.shape) for k, v in cell.params.items()}
    num_warps = _auto_num_warps(param_shapes, block, config)
    hoisted, streamed = split_hoisted(param_shapes, num_warps)
    groups = {
        "params": dict(cell.params),
        "state": {k: _pad_rows(v, rows) for k, v in cell.state.items()},
        "row": {k: _pad_rows(v, rows) for k, v in cell.row_inputs.items()},
        "step": {k: _pad_rows(v, rows) for k, v in cell.step_inputs.items()},
    }
    if num_valid is not None:
        groups["count"] = {"n": jnp.reshape(jnp.asarray(num_valid, jnp.int32), (1,))}
    names = [(g, k) for g in groups for k in sorted(groups[g])]
    largest = max([batch * num_steps * H] + [a.size for a in groups["step"].values()])
    if largest > MAX_ELEMENTS:
        raise ValueError(
            f"the fused kernel addresses arrays with 32-bit offsets, but {batch} rows x {num_steps} steps make an array "
            f"of {largest} elements; generate fewer steps per call (lrnnx_jax.generation.generate runs them in chunks)")
    x0p = _pad(_pad_rows(x0, rows), (rows, Hp))
    state_names = sorted(cell.state)

    def body(x0_ref, *refs):
        n_in = len(names)
        ref = dict(zip(names, refs[:n_in]))
        ys_ref, state_out = refs[n_in], dict(zip(state_names, refs[n_in + 1:]))
        program = pl.program_id(0)
        zero = 0 * program  # traced: the ragged output lanes are masked, not bounds-checked
        lane_ok = jnp.arange(Hp) < H
        if block == 1:
            sel, ok = program, lane_ok
        else:
            start = program * block
            sel = pl.ds(start, block)
            ok = (start + jnp.arange(block) < batch)[:, None] & lane_ok[None, :]
        params = {k: ref["params", k][...] for k in hoisted}
        x = x0_ref[sel]
        state = {k: ref["state", k][sel] for k in state_names}
        row_inputs = {k: ref["row", k][sel] for k in groups["row"]}

        def loop(t, carry):
            x, state = carry
            p = dict(params, **{k: ref["params", k][...] for k in streamed})
            inputs = dict(row_inputs, **{k: ref["step", k][sel, t] for k in groups["step"]})
            y, state = cell.step(p, x, state, inputs, precision)
            where = (t, sel) if time_major else (sel, t)
            plgpu.store(ys_ref.at[(*where, pl.ds(zero, Hp))], y, mask=ok)
            return y, state

        count = ref["count", "n"][0] if "count" in groups else num_steps
        _, state = jax.lax.fori_loop(0, count, loop, (x, state))
        for k in state_names:
            state_out[k][sel] = state[k]

    out_shape = (
        jax.ShapeDtypeStruct((num_steps, batch, H) if time_major else (batch, num_steps, H), jnp.float32),
        *(jax.ShapeDtypeStruct(groups["state"][k].shape, jnp.float32) for k in state_names),
    )
    call = pl.pallas_call(
        body,
        out_shape=out_shape,
        grid=(rows // block,),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        name=OP,
    )
    ys, *final = call(x0p, *(groups[g][k] for g, k in names))
    return ys, {k: v[:batch] for k, v in zip(state_names, final)}


# ----------------------------------------------------------------------------- public API
def _padded_sizes(cell_shapes: dict) -> tuple[int, int]:
    sizes = [math.prod(s) for s in cell_shapes.values()]
    return max(sizes), sum(sizes)


@functools.lru_cache(maxsize=64)
def _param_shapes(treedef, leaf_types, family_name: str, event_mode: bool):
    """Padded parameter shapes of a model's cell (traced abstractly: nothing is computed)."""

    def shapes(leaves):
        model = jax.tree.unflatten(treedef, leaves)
        taus = jnp.ones((1,), jnp.float32) if event_mode else None
        return FAMILIES[family_name].cell(model, 1, taus, None).params

    out = jax.eval_shape(shapes, [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in leaf_types])
    return {k: tuple(v.shape) for k, v in out.items()}


def fused_generate_supported(model, batch_size: int, event_mode: bool, dtype=None) -> Optional[str]:
    """None when :func:`fused_generate` can run this model, else the reason it cannot.

    Args:
      model: an lrnnx_jax model (concrete, or abstract from ``nnx.eval_shape``).
      batch_size: B.
      event_mode: whether ``integration_timesteps`` will be given.
      dtype: the dtype of ``x`` (float32 when None).

    The reasons: a model without a fused kernel, event mode on a model without
    one, a dtype other than float32 (input or parameters), parameters that do not
    fit on chip (a padded tile over :data:`MAX_TILE` numbers or a total over
    :data:`MAX_PARAMS`, e.g. a large H, d_inner or d_state, and S7 beyond small H
    and N: its ``x_proj`` holds ``2 H^2 N`` weights). Where a supported kernel was
    measured slower than the XLA program is :func:`slower_than_xla`'s business.
    """
    name = type(model).__name__
    family = family_of(model)
    if family is None:
        return f"{name} (no fused kernel)"
    if event_mode and not getattr(model, "supports_integration_timesteps", False):
        return f"event mode on {name}, which has no integration_timesteps"
    from lrnnx_jax.core.base import dropout_active

    if dropout_active(model):
        return f"{name} with active dropout (in training mode; the kernels run the model in eval mode)"
    if dtype is not None and jnp.dtype(dtype) != jnp.float32:
        return f"x of dtype {jnp.dtype(dtype).name} (the fused kernels generate in float32)"
    leaves, treedef = jax.tree.flatten(model)
    wide = [leaf.dtype for leaf in leaves if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact)
            and leaf.dtype not in (jnp.float32, jnp.complex64)]  # (random-state leaves are not parameters)
    if wide:
        return f"parameters of dtype {jnp.dtype(wide[0]).name} (the fused kernels take float32/complex64 parameters)"
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        return f"batch_size={batch_size!r} (expected a positive integer)"
    leaf_types = tuple((tuple(leaf.shape), leaf.dtype) for leaf in leaves)  # arrays or abstract values
    shapes = _param_shapes(treedef, leaf_types, family.name, bool(event_mode))
    largest, total = _padded_sizes(shapes)
    if largest > MAX_TILE or total > MAX_PARAMS:
        big = max(shapes, key=lambda k: math.prod(shapes[k]))
        return (f"{name} parameters too large for one program: {total} padded numbers (largest tile {big} "
                f"{shapes[big]}) over the on-chip limits of {MAX_TILE} per tile and {MAX_PARAMS} in total")
    return None


def slower_than_xla(model, batch_size: int) -> Optional[str]:
    """Why the fused kernel is not chosen under ``use_kernels="auto"`` although it supports the model.

    These are the cases measured slower than the compile-once XLA program on an H100
    (benchmarks/results/fused_generation_*h100.txt, B=1, 32, 256 and 4096, H=128 (S7: H=32, N=32
    and H=16, N=64), 512 steps); ``use_kernels="always"`` still runs them fused.
    """
    name = type(model).__name__
    if name == "Mamba":
        return "Mamba (fused 31 us/step vs 16.6 us/step for the XLA program at B=32 on an H100)"
    if name == "RGLRU":
        return "RGLRU (fused 11.7 us/step, no faster than the XLA program's 11.9 at B=32, 869 vs 43 at B=4096 on an H100)"
    if name == "S7" and batch_size > MAX_STREAMING_BATCH:
        return "S7 above batch 512 (fused 167 us/step vs 68 for the XLA program at B=4096, H=32, N=32 on an H100)"
    if batch_size > MAX_ROWS_PATH_BATCH:
        if type(model).__module__ == "lrnnx_jax.models.lti.s5":
            return "LTI S5 on the block path (fused 302 us/step vs 39 us/step for the XLA program at B=4096 on an H100)"
        if name == "CentaurusDWS":
            return "CentaurusDWS on the block path (fused 783 us/step vs 52 us/step for the XLA program at B=4096 on an H100)"
    return None


def use_fused_kernel(model, batch_size: int, event_mode: bool, dtype=None,
                     kernel_config: Optional[dispatch.KernelConfig] = None) -> bool:
    """The switch: :func:`pallas_kernels.dispatch.choose_kernel` on :func:`fused_generate_supported`.

    Under ``use_kernels="auto"`` the cases of :func:`slower_than_xla` keep the XLA program.
    """
    config = dispatch.get_config() if kernel_config is None else kernel_config
    if config.use_kernels == "auto" and slower_than_xla(model, batch_size) is not None:
        return False
    return dispatch.choose_kernel(OP, fused_generate_supported(model, batch_size, event_mode, dtype), kernel_config)


def _check_inputs(model, x0, num_steps, integration_timesteps):
    from lrnnx_jax.core import validation

    x0 = validation.check_token(x0, model.d_model, name="x0")
    num_steps = validation.check_positive_int(num_steps, "num_steps")
    if x0.dtype != jnp.float32:
        raise TypeError(f"x0 must be float32 for the fused kernels, got {x0.dtype}")
    batch = x0.shape[0]
    taus = None
    if integration_timesteps is not None:
        if not getattr(model, "supports_integration_timesteps", False):
            raise ValueError(f"{type(model).__name__} has no event mode; pass integration_timesteps=None")
        taus = jnp.asarray(integration_timesteps, jnp.float32)
        if taus.ndim != 2 or taus.shape[0] != batch or taus.shape[1] not in (1, num_steps):
            raise ValueError(f"integration_timesteps must have shape (B, 1) or (B, num_steps) = ({batch}, 1) or "
                             f"({batch}, {num_steps}), got {tuple(taus.shape)}")
        taus = taus[:, 0] if taus.shape[1] == 1 else taus
    return x0, num_steps, taus


def _unsupported(model, batch, event_mode):
    reason = fused_generate_supported(model, batch, event_mode)
    if reason is not None:
        raise ValueError(f"fused_generate does not support {reason}; use lrnnx_jax.generation.generate")


def fused_generate(model, x0, num_steps: int, integration_timesteps=None, *, config: Optional[FusedConfig] = None):
    """Closed-loop generation from a fresh (zero) state in one fused kernel.

    Same results as ``lrnnx_jax.generation.generate(model, x0, num_steps,
    integration_timesteps=...)`` up to float32 rounding. Jittable (``num_steps``
    static); the parameters are arguments of the kernel, read from ``model``.

    Args:
      model: a model :func:`fused_generate_supported` accepts.
      x0: ``(B, H)`` float32, the first input.
      num_steps: number of generated steps.
      integration_timesteps: event mode only, ``(B, 1)`` (reused every step) or ``(B, num_steps)``.
      config: a :class:`FusedConfig`.

    Returns:
      ``(B, num_steps, H)`` float32.

    Raises:
      ValueError/TypeError: for bad arguments or a model it does not support (with the reason).
    """
    x0, num_steps, taus = _check_inputs(model, x0, num_steps, integration_timesteps)
    _unsupported(model, x0.shape[0], taus is not None)
    leaves, treedef = jax.tree.flatten(model)
    return _rollout(treedef, num_steps, config or DEFAULT_CONFIG, leaves, x0, taus)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _rollout(treedef, num_steps: int, config: FusedConfig, leaves, x0, taus):
    """The rollout from a zero state, compiled once per model structure, shapes and config."""
    model = jax.tree.unflatten(treedef, leaves)
    cell = family_of(model).cell(model, x0.shape[0], taus, None)
    return run_cell(cell, x0, num_steps, config=config)[0]


def fused_program(spec, config: Optional[FusedConfig] = None) -> Callable:
    """A generation program running the fused kernel, for ``lrnnx_jax.generation.PROGRAM_BUILDERS``.

    ``spec`` is a ``lrnnx_jax.generation.ProgramSpec`` (only ``treedef`` and
    ``config.chunk_size`` are read); the program has the interface of
    ``lrnnx_jax.generation.xla_program``: ``(leaves, x, cache, taus, num_valid) ->
    (ys (chunk_size, B, H), x_next, cache)``, with ``taus (B, chunk_size)`` or None.
    It runs ``num_valid`` steps from ``cache`` (the model's cache format) and returns
    the state after them. Check :func:`use_fused_kernel` (or
    :func:`fused_generate_supported`, with the dtype) before building it.
    """
    chunk = spec.config.chunk_size
    config = config or DEFAULT_CONFIG

    def program(leaves, x, cache, taus, num_valid):
        model = jax.tree.unflatten(spec.treedef, leaves)
        family = family_of(model)
        cell = family.cell(model, x.shape[0], taus, cache)
        ys, state = run_cell(cell, x, chunk, config=config, time_major=True, num_valid=num_valid)
        x_next = jax.lax.dynamic_index_in_dim(ys, num_valid - 1, axis=0, keepdims=False)
        return ys, x_next, family.cache(model, state, cache)

    return program


STEP_OP = "fused_step"


def fused_step(model, x_t, cache, integration_timesteps=None, *, reference: Callable,
               config: Optional[dispatch.KernelConfig] = None):
    """One step of a model's whole block in one kernel launch: the state-update kernel of the
    models that have no single state-update op (S4D and S4, whose SSM sits inside the S4 block).

    The one-step rollout of the model's :class:`Cell` (:func:`run_cell` with ``num_steps=1``, one
    row per program, float32 multiply-adds). The switch is the one of the state-update ops
    (:func:`pallas_kernels.dispatch.choose_kernel` on :func:`fused_generate_supported`);
    otherwise ``reference(x_t, cache, integration_timesteps)``, the model's pure-JAX step, runs.

    Args:
      model: the model (inside its ``_step``).
      x_t: ``(B, H)`` float32 (other dtypes take the reference).
      cache: the model's inference cache.
      integration_timesteps: ``(B,)`` or None.
      reference: the pure-JAX step, ``(x_t, cache, integration_timesteps) -> (y_t, cache)``.
      config: a :class:`~pallas_kernels.dispatch.KernelConfig`; the process default when None.

    Returns:
      ``(y_t (B, H) float32, new_cache)``.
    """
    batch = x_t.shape[0]
    reason = fused_generate_supported(model, batch, integration_timesteps is not None, x_t.dtype)
    if not dispatch.choose_kernel(STEP_OP, reason, config):
        return reference(x_t, cache, integration_timesteps)
    kernel_config = dispatch.get_config() if config is None else config
    family = family_of(model)
    cell = family.cell(model, batch, integration_timesteps, cache)
    ys, state = run_cell(cell, x_t, 1, config=FusedConfig(block_batch=1, interpret=dispatch.interpret_mode(kernel_config)))
    return ys[:, 0], family.cache(model, state, cache)
