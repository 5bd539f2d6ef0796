"""RG-LRU, the recurrent block of Griffin/Hawk (De et al., 2024), as in lrnnx's ``models.ltv.RGLRU``.

For the block input ``u_t`` (H,), with ``D = expand * H`` channels::

    g_t     = GELU(W_gate u_t)                               gate stream (exact, erf GELU)
    x_t     = conv(W_in u)_t                                 causal depthwise conv, no activation
    r_t     = sigmoid(W_r x_t + b_r),  i_t = sigmoid(W_i x_t + b_i)
    A_bar_t = a^(c r_t),  a = sigmoid(a_log)                 (D,), in (0, 1)
    h_t     = A_bar_t * h_{t-1} + sqrt(1 - A_bar_t^2) * (i_t * x_t)
    out_t   = W_out(g_t * h_t)

``log A_bar_t = c r_t log_sigmoid(a_log)`` and ``sqrt(1 - A_bar^2)`` is computed as
``sqrt(-expm1(2 log A_bar))``, accurate when ``A_bar`` is close to 1
(:func:`rglru_transition`). RG-LRU has no event mode.

The forward runs :func:`lrnnx_jax.core.scan.chunked_scan` on :func:`rglru_coefficients`,
from a zero state or from an inference cache (the conv history and ``h``); where
:func:`pallas_kernels.diagonal_scan.choose` selects them (``kernel_config``), the recurrence
runs on the training-scan kernels instead (``"auto"`` takes them on an NVIDIA GPU:
:data:`SCAN_POLICY`). The single
step is written once, as the cell :func:`rglru_cell_step` (see :mod:`pallas_kernels.cells`):
``model.step``, ``model.multi_step`` and the fused rollout of ``generate`` all run it, in
XLA or in a Pallas kernel; it shares :func:`rglru_transition` with the forward.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lrnnx_jax.core import conv
from lrnnx_jax.core.base import LRNN, in_compute_dtype, compute_dtype, lrnnx_entry, lrnnx_linear_entries, torch_linear
from lrnnx_jax.core.scan import DEFAULT_CHUNK_SIZE, chunked_scan
from lrnnx_jax.core.validation import check_cache_size, check_chunk_size, check_positive_int
from pallas_kernels import diagonal_scan, scan_common
from pallas_kernels.scan_common import ScanPolicy
from pallas_kernels import kernel_math as km
from pallas_kernels.cells import UNSPLIT, Cell, Collectives, KernelPolicy, Split

#: where ``use_kernels="auto"`` runs RG-LRU's cell kernels (measured on an H200, BENCHMARKS.md section 6)
POLICY = KernelPolicy(
    rollout_max_batch=512,
    step_max_batch=0,
    evidence=("H200 (H=128, 512 steps), the fused rollout split over programs (each holding a slice of D) against "
              "the compile-once XLA program: 4.9 vs 14.1 us per step at B=1 (8 programs per row, 4 warps), "
              "6.1 / 6.6 / 5.8 vs 15.2 / 11.9 / 12.2 at B=2 / 8 / 16 (8 warps), 5.6 vs 12.4 at B=32 (4 programs, "
              "8 warps); from 34 rows on, blocks of 16 rows over 4 programs each (tensor-core dots): 10.2-10.8 / "
              "10.4-11.6 / 10.2-11.2 vs 14.6 / 15.8 / 18.0 at B=48 / 128 / 512 (8 programs per block: 12.1-12.2); "
              "above 528 rows no split is resident on 132 SMs, and unsplit the rollout took 675 us against 44.6 at "
              "B=4096. The one-step kernel against the XLA step (unsplit): 14.7 vs "
              "13.7 us at B=1, 19.0 vs 21.6 at B=32 (mixed: XLA kept). The XLA program keeps unroll 8: at 2 it "
              "captured in 1.93 instead of 4.18 s at B=256 but stepped in 17.1 instead of 12.8 us. split_block: "
              "blocks of 8 rows (multiply-adds) over 8 programs 6.85 us at B=64 against 10.3 for blocks of 16 "
              "(dots) over 4 (over 4 programs 7.48; blocks of 4 19.6, of 2 31.1-31.4 at B=32; rows over 4 programs "
              "stay faster at B=32: 5.36-5.85 against 6.57-6.71). split_row_warps: rows over 4 programs (B=17-33) "
              "with 4 warps 4.50, 4.57, 4.58, 4.47, 4.58, 4.49, 4.85 us at B=32 against 4.90, 5.16, 5.02, 5.01, 5.08 "
              "with 8 (the rule) and 8.51, 8.69 with 2; rows over 8 programs (B=2-16) with 2 warps 3.96, 3.92, 4.14, "
              "4.30 at B=8 and 4.07, 3.98 at B=16 against 4.52, 4.57, 4.85, 4.85 and 4.82, 4.91 with 4 (the rule), "
              "at B=1 the same (3.83-4.28 against 3.90-4.21) (benchmarks/results/session15_h200/call3, "
              "session16_h200/call2, call4, call6, call7); blocks keep the rule (at B=256, blocks of 8 rows over 4 "
              "programs: 6.84-6.96 with 8 warps against 14.5-14.6 with 4, session16_h200/call3)"),
    split_block=8,
    split_row_warps=((4, 4), (8, 2)),
)

#: how the programs of RG-LRU's split rollout exchange their partial sums (``pallas_kernels.cells.Split.exchange``).
#: Measured on an H200 (H=128, 512 steps; µs per step, two alternating runs each,
#: ``benchmarks/results/split_exchange_h200/device_call_6``): the counter barrier 5.26-5.71 / 4.94-5.08 / 5.23-5.37
#: at B = 1 / 8 / 32 against 4.34-4.43 / 5.23-5.52 / 5.04-5.23 with tagged words (mixed); blocks of 16 rows
#: 10.0-10.4 against 13.6-14.0 at B = 64 / 256. With the barrier spinning on volatile loads instead of atomics
#: (session 15, ``benchmarks/results/session15_h200/call2``): 3.67-3.88 / 4.63-4.71 / 4.96-5.01 against 4.97-5.02 /
#: 4.51-5.70 / 5.29-5.31 before.
SPLIT_EXCHANGE = "barrier"


#: RG-LRU's training-scan kernels were measured faster than its XLA scan: ``"auto"`` takes them on an NVIDIA GPU
SCAN_POLICY = ScanPolicy(
    auto=True,
    evidence="NVIDIA H200, jax 0.11.2: RGLRU(d_model=128) forward + backward at B=32, L=2048, float32: 2.88 ms on the "
             "XLA scan, 1.29 ms on the kernels (benchmarks/benchmark_training.py; "
             "benchmarks/results/training_point2_h200.json); the sweeps at L=2048 (XLA / kernels, ms): H=16, 32, 64, 256 "
             "at B=32 1.87 / 0.51, 2.31 / 0.84, 2.18 / 0.87, 5.07 / 2.17; B=8, 16, 64 at H=128 1.67 / 0.72, "
             "2.28 / 1.20, 5.80 / 1.99, B=128 11.6 / 3.31; d_model 1024, B=8, L=4096 12.5 / 6.23 "
             "(training_dim_batch_rglru_h200.json, training_batch_rest_h200.json, training_batch128_rglru_h200.json, "
             "training_sweeps_mamba_rglru_h200.json)",
)


def rglru_transition(log_a, cr):
    """``(A_bar, sqrt(1 - A_bar^2))`` for ``A_bar = a^(c r) = exp(c r log a)``, elementwise.

    ``log a = log_sigmoid(a_log) <= 0``; ``cr = c r``. ``1 - A_bar^2 = -expm1(2 log A_bar)``
    stays accurate when ``A_bar`` is close to 1, and its floor at the smallest normal number
    keeps ``sqrt``'s gradient finite when it underflows. Elementwise ``jnp`` only: the
    forward (:func:`rglru_coefficients`) and the cell step (:func:`rglru_cell_step`) share it.
    """
    log_a_bar = cr * log_a
    one_minus_sq = jnp.maximum(-jnp.expm1(2 * log_a_bar), jnp.finfo(log_a_bar.dtype).tiny)
    return jnp.exp(log_a_bar), jnp.sqrt(one_minus_sq)


def rglru_coefficients(x, r, i, a_log, c):
    """The recurrence ``h_t = A_bar_t h_{t-1} + b_t`` of RG-LRU.

    Args:
      x: ``(..., D)`` conv output; ``r``, ``i``: ``(..., D)`` recurrent and input gates in (0, 1).
      a_log: ``(D,)``, ``a = sigmoid(a_log)``; c: the gate scale.

    Returns:
      ``(A_bar, b)``, each ``(..., D)``: ``A_bar = a^(c r)``, ``b = sqrt(1 - A_bar^2) i x``.
    """
    a_bar, gamma = rglru_transition(jax.nn.log_sigmoid(a_log), c * r)
    return a_bar, gamma * (i * x)


def _bias(params, name):
    return params[name] if name in params else 0.0


def rglru_cell_step(params, state, x, inputs, precision, *, c: float, comm: Collectives = UNSPLIT):
    """One step of the RG-LRU block, the model's cell (:mod:`pallas_kernels.cells`).

    ``x (..., H)`` with the leading row axes of ``state`` (``conv0..conv{K-1}`` and ``h``,
    each ``(..., D)``); ``params`` as :meth:`RGLRU.cell` builds them; ``inputs`` unused (no
    event mode). Returns ``(y (..., H), new_state)``. Only operations that lower in Pallas:
    ``log_sigmoid(a_log) = -softplus(-a_log)`` by :func:`pallas_kernels.kernel_math.softplus`.

    Split over programs (:func:`rglru_split`: each holds a slice of the ``D`` channels), the gates'
    ``(D, D)`` projections are cut by input rows and completed by ``comm.psum_scatter`` (each program
    keeps its channels' gates), and ``out_proj`` by ``comm.psum``.
    """
    p = params
    g = km.gelu(km.project(x, p["Wg"], 0, precision) + _bias(p, "Wg_b"))
    x_in = km.project(x, p["Wi"], 0, precision) + _bias(p, "Wi_b")
    xc, history = conv.conv_cell_step(p, state, x_in, conv.conv_taps(p))
    r_pre, i_pre = comm.psum_scatter((km.project(xc, p["Wr"], 0, precision), km.project(xc, p["Wig"], 0, precision)))
    r = km.sigmoid(r_pre + p["Wr_b"])
    i = km.sigmoid(i_pre + p["Wig_b"])
    A_bar, gamma = rglru_transition(-km.softplus(-p["a_log"]), c * r)
    h = (A_bar * state["h"] + gamma * (i * xc)).astype(state["h"].dtype)  # the state keeps its dtype
    out = comm.psum(km.project(g * h, p["Wout"], 0, precision)) + _bias(p, "Wout_b")
    return out, {**history, "h": h}


def rglru_split(d_inner: int, d_conv: int) -> Split:
    """:meth:`RGLRU.cell`'s split over the ``D`` channels: the input projections by output columns, the gates'
    ``(D, D)`` projections and ``out_proj`` by input rows, the per-channel vectors and the state along ``D``
    (``Wout_b`` stays whole)."""
    split = {"Wg": 1, "Wi": 1, "Wr": 0, "Wig": 0, "Wout": 0,
             **dict.fromkeys(["Wg_b", "Wi_b", "conv_b", "Wr_b", "Wig_b", "a_log"], 0),
             **{f"conv_w{k}": 0 for k in range(d_conv)}}
    return Split(d_inner, split, {"h": 0, **{f"conv{k}": 0 for k in range(d_conv)}}, exchange=SPLIT_EXCHANGE)




@functools.lru_cache(maxsize=None)
def _cell_step(c: float):
    """:func:`rglru_cell_step` for the gate scale ``c`` (one function per value)."""
    return functools.partial(rglru_cell_step, c=c)


class RGLRU(LRNN):
    """Real-Gated Linear Recurrent Unit block (gate stream, conv, RG-LRU, output projection).

    Args:
      d_model: H, input and output features.
      d_conv: kernel size of the causal depthwise conv.
      expand: ``D = expand * H`` recurrent channels.
      c: the gate scale of ``A_bar = a^(c r)``.
      a_init_range: ``(lo, hi)`` in (0, 1); at initialisation ``a = sigmoid(a_log)`` is
        uniform in it (lrnnx draws ``a_log = log U(lo, hi)`` instead; see
        docs/differences-from-lrnnx.md).
      conv_bias: bias of the conv; bias: biases of ``gate_proj``, ``in_proj`` and ``out_proj``.
      use_fast_path, layer_idx, device: accepted for lrnnx compatibility and unused.
      dtype: parameter dtype (float32 when None).
      chunk_size: chunk of the scan (None: unchunked, 1: sequential).
      kernel_config: the ``pallas_kernels.KernelConfig`` of the forward's training-scan kernels
        (:mod:`pallas_kernels.diagonal_scan`; ``"auto"`` takes them on an NVIDIA GPU); None: the default, read when
        the forward is traced.
      rngs: ``nnx.Rngs`` (the ``params`` stream is used).

    The inference cache is ``{"conv_state": (B, D, d_conv)`` (the last raw, pre-conv
    inputs of the conv, newest last), ``"lrnn_state": (B, D, 1)}``.
    """

    def __init__(
        self,
        d_model: int,
        d_conv: int = 4,
        expand: int = 1,
        c: float = 8.0,
        a_init_range: tuple[float, float] = (0.9, 0.999),
        conv_bias: bool = True,
        bias: bool = False,
        use_fast_path: bool = True,
        layer_idx=None,
        device=None,
        dtype=None,
        *,
        chunk_size: int | None = DEFAULT_CHUNK_SIZE,
        kernel_config=None,
        rngs: nnx.Rngs,
    ):
        H = self.d_model = check_positive_int(d_model, "d_model")
        self.d_conv = check_positive_int(d_conv, "d_conv")
        self.expand = check_positive_int(expand, "expand")
        lo, hi = a_init_range
        if not 0 < lo <= hi < 1:
            raise ValueError(f"a_init_range must satisfy 0 < lo <= hi < 1, got {tuple(a_init_range)}")
        if not c > 0:
            raise ValueError(f"c must be > 0, got {c}")
        D = self.d_inner = self.expand * H
        self.c, self.chunk_size = float(c), check_chunk_size(chunk_size)
        self.kernel_config = scan_common.model_config(kernel_config)
        param_dtype = dtype or jnp.float32
        self.gate_proj = torch_linear(H, D, use_bias=bias, rngs=rngs, param_dtype=param_dtype)
        self.in_proj = torch_linear(H, D, use_bias=bias, rngs=rngs, param_dtype=param_dtype)
        bound = 1 / math.sqrt(self.d_conv)  # torch Conv1d init, fan_in = d_conv (depthwise)
        self.conv_weight = nnx.Param(jax.random.uniform(rngs.params(), (D, self.d_conv), param_dtype, -bound, bound))
        self.conv_bias = (
            nnx.Param(jax.random.uniform(rngs.params(), (D,), param_dtype, -bound, bound)) if conv_bias else None
        )
        self.recurrent_gate_proj = torch_linear(D, D, use_bias=True, rngs=rngs, param_dtype=param_dtype)
        self.input_gate_proj = torch_linear(D, D, use_bias=True, rngs=rngs, param_dtype=param_dtype)
        a = jax.random.uniform(rngs.params(), (D, 1), param_dtype, lo, hi)
        self.a_log = nnx.Param(jnp.log(a) - jnp.log1p(-a))  # logit: sigmoid(a_log) = a
        self.out_proj = torch_linear(D, H, use_bias=bias, rngs=rngs, param_dtype=param_dtype)

    def _conv_bias(self):
        return None if self.conv_bias is None else self.conv_bias[...]

    def gates(self, x):
        """Conv output ``x (..., D)`` -> the recurrent and input gates ``(r, i)``, each ``(..., D)``."""
        return jax.nn.sigmoid(self.recurrent_gate_proj(x)), jax.nn.sigmoid(self.input_gate_proj(x))

    def coefficients(self, x):
        """Conv output ``x (..., D)`` -> ``(A_bar, b)`` ``(..., D, 1)`` of the recurrence."""
        r, i = self.gates(x)
        a_bar, b = rglru_coefficients(x, r, i, self.a_log[...][:, 0], self.c)
        return a_bar[..., None], b[..., None]

    def output(self, h, u):
        """``W_out(GELU(W_gate u) * y)`` with ``y = h`` summed over its size-1 state axis."""
        return self.out_proj(jax.nn.gelu(self.gate_proj(u), approximate=False) * jnp.sum(h, -1))

    def _forward(self, u, integration_timesteps, mask, lengths, return_cache, cache=None):
        raw = self.in_proj(u)
        conv_state = None if cache is None else cache["conv_state"]
        x = conv.causal_conv1d(raw, self.conv_weight[...], self._conv_bias(), conv_state=conv_state)
        if cache is None:
            h0 = jnp.zeros((u.shape[0], self.d_inner, 1), x.dtype)
        else:
            h0 = cache["lrnn_state"].astype(x.dtype)
        a, b = self.coefficients(x)  # on the kernels' path; dead code on the XLA path, which forms them per chunk
        scanned = diagonal_scan.model_scan(a[..., 0], b[..., 0], h0[..., 0], mask, config=self.kernel_config,
                                           policy=SCAN_POLICY)
        if scanned is None:
            h, h_last = chunked_scan(self.coefficients, lambda h, x: h, x, h0, mask, self.chunk_size)
        else:
            h, h_last = scanned[0][..., None], scanned[1][..., None].astype(h0.dtype)
        new_cache = None
        if return_cache:
            new_cache = {"conv_state": conv.conv_state_after(raw, self.d_conv, lengths, conv_state=conv_state),
                         "lrnn_state": h_last}
        return self.output(h, u), new_cache

    # ---------------------------------------------------------------- the cell
    def cell(self) -> Cell:
        """The block's step (:func:`rglru_cell_step`) and its parameters in the kernel layout: the
        projection kernels ``(in, out)`` (``Wg``, ``Wi`` ``(H, D)``; ``Wr``, ``Wig`` ``(D, D)``;
        ``Wout`` ``(D, H)``) and their biases, the conv taps and ``a_log (D,)``."""
        p = {}
        for name, linear in (("Wg", self.gate_proj), ("Wi", self.in_proj)):
            p[name] = in_compute_dtype(linear.kernel[...])
            if linear.bias is not None:
                p[name + "_b"] = in_compute_dtype(linear.bias[...])
        p.update(conv.conv_cell_params(self.conv_weight[...], self._conv_bias()))
        for name, linear in (("Wr", self.recurrent_gate_proj), ("Wig", self.input_gate_proj), ("Wout", self.out_proj)):
            p[name] = in_compute_dtype(linear.kernel[...])
            if linear.bias is not None:
                p[name + "_b"] = in_compute_dtype(linear.bias[...])
        p["a_log"] = in_compute_dtype(self.a_log[...][:, 0])
        return Cell(_cell_step(self.c), p, blockable=True, policy=POLICY, split=rglru_split(self.d_inner, self.d_conv))

    def cell_state(self, cache):
        """``{"conv0".."conv{K-1}": (B, D), "h": (B, D)}`` from the cache, in the compute dtype."""
        dtype = compute_dtype(cache["lrnn_state"].dtype)
        return {**conv.conv_cell_state(cache["conv_state"], dtype), "h": cache["lrnn_state"][..., 0].astype(dtype)}

    def cell_cache(self, state, like):
        return {"conv_state": conv.conv_cell_cache(state, like["conv_state"]),
                "lrnn_state": state["h"][..., None].astype(like["lrnn_state"].dtype)}

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int = 1, dtype=None):
        """``{"conv_state": (batch_size, D, d_conv), "lrnn_state": (batch_size, D, 1)}`` zeros."""
        batch_size, _ = check_cache_size(batch_size, max_seqlen)
        state_dtype = self._state_dtype(dtype, False)
        return {
            "conv_state": jnp.zeros((batch_size, self.d_inner, self.d_conv), state_dtype),
            "lrnn_state": jnp.zeros((batch_size, self.d_inner, 1), state_dtype),
        }

    def lrnnx_entries(self):
        entries = {
            **lrnnx_linear_entries("gate_proj", self.gate_proj),
            **lrnnx_linear_entries("in_proj", self.in_proj),
            "conv1d.weight": lrnnx_entry(self.conv_weight, shape=(self.d_inner, 1, self.d_conv)),
            **lrnnx_linear_entries("recurrent_gate_proj", self.recurrent_gate_proj),
            **lrnnx_linear_entries("input_gate_proj", self.input_gate_proj),
            "a_log": lrnnx_entry(self.a_log),
            **lrnnx_linear_entries("out_proj", self.out_proj),
        }
        if self.conv_bias is not None:
            entries["conv1d.bias"] = lrnnx_entry(self.conv_bias)
        return entries
