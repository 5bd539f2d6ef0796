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

The forward never forms ``B_t`` or ``C_t``. Both are linear in ``x_t``, so the drive is a
quadratic form and the readout a bilinear one, each one contraction of per-token features
with a fixed weight::

    (B_t^T x_t)_n = sum_{i,h} x_i x_h WB[i, h, n]      features x_i x_h, i <= h by blocks
    (C_t s_t)_h   = sum_{i,n} x_i s_n WC[i, h, n]      features x_i s_n

where ``WB, WC (H, H, N)`` are the ``B`` and ``C`` parts of ``x_proj``. The quadratic form is
symmetric in ``(i, h)``: :func:`drive_features` keeps the products of channel blocks ``a <= b``
(up to :data:`DRIVE_BLOCKS` equal blocks: 10 of the 16 block pairs for 4 blocks) and :func:`drive_weights`
folds ``WB[b, a]`` into ``WB[a, b]``, so the drive costs 5/8 of ``H^2 N`` multiply-adds per token.
The features are elementwise products of ``x`` and ``s``: the chunked forward saves only the
contractions' small outputs and recomputes the features in the backward (a ``jax.checkpoint``
policy), so the backward repeats no contraction and memory stays ``O(B * chunk * H * N)``.
The contractions carry ``x_proj``'s weights, so they run at its precision: the default matmul
precision, as every ``nnx.Linear`` (TF32 on a GPU unless ``jax.default_matmul_precision`` says
otherwise). The features round ``x_i x_h`` where ``x_proj`` rounds ``x_i``: the same order of error.

The state is shared by the channels, so the recurrence is elementwise over ``N`` lanes:
where :func:`pallas_kernels.diagonal_scan.choose` selects them (``kernel_config``), it runs
on the training-scan kernels, with ``A_bar``, the drive and the readout formed ``chunk_size``
steps at a time (rematerialised in the backward: the same memory bound); ``"auto"`` keeps
the XLA scan (measured no faster on an H200: :data:`pallas_kernels.diagonal_scan.POLICY`).

The step is written once, as the cell :func:`s7_step` (:meth:`S7.cell`), which
``step``, ``multi_step`` and the fused kernels of ``generate`` run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrnnx_jax.core import hippo
from lrnnx_jax.core.base import LRNN, compute_dtype, in_compute_dtype, lrnnx_entry, lrnnx_linear_entries, torch_linear
from lrnnx_jax.core.scan import DEFAULT_CHUNK_SIZE, chunked_scan
from lrnnx_jax.core.validation import check_cache_size, check_chunk_size, check_positive_int
from pallas_kernels import diagonal_scan, scan_common
from pallas_kernels import kernel_math as km
from pallas_kernels.cells import Cell, KernelPolicy


#: the parts of the ``x_proj`` output, in order
PARTS = ("a", "B", "C", "d", "beta")
#: the most channel blocks of the drive's symmetric quadratic form (:func:`drive_blocks`, :func:`drive_features`)
DRIVE_BLOCKS = 4
#: what the chunked forward keeps for the backward: the outputs of the contractions (never the features, which are
#: elementwise products recomputed from ``x`` and the states)
SAVE_CONTRACTIONS = jax.checkpoint_policies.dots_with_no_batch_dims_saveable

#: where ``use_kernels="auto"`` runs S7's kernels on an NVIDIA GPU
POLICY = KernelPolicy(
    rollout_max_batch=512,
    step_max_batch=0,
    evidence="H200 (H=32, N=32, the largest S7 whose weights fit on chip): the fused rollout took 6.8 / 7.1 us per step "
             "against 13.4 / 15.9 for the XLA program at B=32 / 128; on an H100 it was slower above batch 512 (167 "
             "against 68 at B=4096). The one-step kernel was not measured faster: the XLA step is kept. The XLA "
             "program (H=128, N=64) at unroll 2 against 8: capture 1.32 vs 4.10 s at B=1 (17.5 vs 17.9 us per step), "
             "3.20 vs 6.81 s at B=32 (31.7 vs 34.6 us)",
    xla_unroll=2,
)


def s7_transition(a):
    """``A_bar = 1 - 1 / (a^2 + 1/2)`` elementwise (the single definition: the forward and the cell;
    elementwise arithmetic only, so it lowers in Pallas kernels)."""
    return 1.0 - 1.0 / (a * a + 0.5)


def drive_blocks(H: int) -> int:
    """The number ``k`` of equal channel blocks of the drive's quadratic form: the largest power of two up to
    :data:`DRIVE_BLOCKS` that divides ``H``."""
    k = DRIVE_BLOCKS
    while H % k:
        k //= 2
    return k


def drive_features(x):
    """``x (..., H)`` -> the products ``x_i x_h`` of channel blocks ``a <= b`` ``(..., F)``: for each block pair (in
    ``np.triu_indices`` order) the ``(w, w)`` outer product of the two blocks, flattened; ``k`` blocks of ``w = H / k``
    channels (:func:`drive_blocks`), ``F = k (k + 1) / 2 * w^2``. One broadcast product (its backward one reduction)."""
    H = x.shape[-1]
    k = drive_blocks(H)
    blocks = x.reshape(x.shape[:-1] + (k, H // k))
    first, second = np.triu_indices(k)
    return (blocks[..., first, :, None] * blocks[..., second, None, :]).reshape(x.shape[:-1] + (-1,))


def drive_weights(WB):
    """``WB (H, H, N)`` -> ``(F, N)``: for the block pair ``(a, b)``, ``WB[a, b]`` plus (``a != b``) ``WB[b, a]``
    transposed, so that ``drive_features(x) @ drive_weights(WB) = sum_{i,h} x_i x_h WB[i, h]``."""
    H, _, N = WB.shape
    k = drive_blocks(H)
    tiles = WB.reshape(k, H // k, k, H // k, N)  # [a, i, b, h, n]
    first, second = np.triu_indices(k)
    direct = tiles[first, :, second]  # (pairs, i in a, h in b, N)
    mirrored = jnp.swapaxes(tiles[second, :, first], 1, 2)  # WB[b, a] transposed: (pairs, i in a, h in b, N)
    off_diagonal = jnp.asarray(first != second, WB.dtype)[:, None, None, None]
    return (direct + off_diagonal * mirrored).reshape(-1, N)


def readout_features(x, s):
    """``x (..., H)``, ``s (..., N)`` -> the products ``x_i s_n`` ``(..., H N)``."""
    return (x[..., :, None] * s[..., None, :]).reshape(x.shape[:-1] + (-1,))


def readout_weights(WC):
    """``WC (H, H, N)`` (input channel, output channel, state) -> ``(H N, H)``, so that
    ``readout_features(x, s) @ readout_weights(WC) = C_t s``."""
    H, _, N = WC.shape
    return jnp.swapaxes(WC, 1, 2).reshape(H * N, H)


def s7_step(params, state, u, inputs, precision):
    """One S7 step (the cell of :meth:`S7.cell`): ``u (..., H)``, ``state["s"] (..., N)``.

    ``...`` is no axis (one row: a kernel program) or the rows of a block. The per-token
    ``B_t (..., N, H)`` and ``C_t (..., H, N)`` are the contractions of ``x = W_in u`` with the 3-D blocks
    ``WB (H (input), N, H (channel))`` and ``WC (H (input), H (channel), N)`` of ``x_proj``: each is laid out so
    that the sum it feeds (the drive over the channels, the readout over the states) runs along its last axis.
    Returns ``(out (..., H), {"s": (..., N)})``.

    Every contraction is with the weights of a projection (``in_proj``, ``x_proj``, ``gate_proj``), so a
    block of rows runs all of them at the projection precision (:func:`pallas_kernels.kernel_math.project`),
    as the forward does (:meth:`S7._contract`): JAX's default matmul precision in the XLA drivers.
    """
    p, s = params, state["s"]
    x = km.project(u, p["Win"], 0, precision)
    # B_t and C_t first: the order of the pre-cells kernel, measured faster on an H200 (it sets the
    # live ranges of the large per-token tiles in the kernel)
    B_t = km.project(x, p["WB"], 0, precision)
    C_t = km.project(x, p["WC"], 0, precision)
    A_bar = s7_transition(km.project(x, p["Wa"], 0, precision) + p["base"])
    drive = jnp.sum(B_t * x[..., None, :], axis=-1) + km.project(x, p["Wbeta"], 0, precision)
    h = (A_bar * s + drive).astype(s.dtype)
    y = jnp.sum(C_t * h[..., None, :], axis=-1) + km.project(x, p["Wd"], 0, precision) * x
    out = km.sigmoid(km.project(km.gelu(y), p["Wg"], 0, precision)) * y + u
    return out, {"s": h}


class S7(LRNN):
    """Selective and simplified SSM with input-dependent ``A, B, C, D`` and bias.

    Args:
      d_model: H, input and output features.
      d_state: N, real state size (shared by all channels).
      J: number of HiPPO blocks of the base of ``a``; must divide ``d_state``.
      use_fast_path, layer_idx, device: accepted for lrnnx compatibility and unused.
      dtype: parameter dtype (float32 when None).
      chunk_size: chunk of the scan (None: unchunked, 1: sequential).
      kernel_config: the ``pallas_kernels.KernelConfig`` of the forward's training-scan kernels
        (:mod:`pallas_kernels.diagonal_scan`; ``use_kernels="always"`` opts in); None: the default, read when
        the forward is traced.
      rngs: ``nnx.Rngs`` (the ``params`` stream is used).

    The inference cache is ``{"lrnn_state": (B, N)}``; the cell's state ``{"s": (B, N)}``.
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
        kernel_config=None,
        rngs: nnx.Rngs,
    ):
        H = self.d_model = check_positive_int(d_model, "d_model")
        N = self.d_state = check_positive_int(d_state, "d_state")
        J = check_positive_int(J, "J")
        if N % J:
            raise ValueError(f"d_state must be divisible by J (the number of HiPPO blocks), got d_state={N}, J={J}")
        self.J, self.chunk_size = J, check_chunk_size(chunk_size)
        self.kernel_config = scan_common.model_config(kernel_config)
        param_dtype = dtype or jnp.float32
        self.in_proj = torch_linear(H, H, use_bias=False, rngs=rngs, param_dtype=param_dtype)
        self.x_proj = nnx.Linear(
            H, N + 2 * H * N + H + N, use_bias=False, kernel_init=nnx.initializers.normal(0.02),
            param_dtype=param_dtype, rngs=rngs,
        )
        self.gate_proj = torch_linear(H, H, use_bias=False, rngs=rngs, param_dtype=param_dtype)
        base = np.tile(np.real(hippo.make_DPLR_HiPPO(N // J)[0]), J)
        self.base_params = nnx.Param(jnp.asarray(base, param_dtype))

    def _weight(self, part: str):
        """The ``part`` columns of ``x_proj``'s kernel ``(H, size)``; ``"B"`` and ``"C"`` as ``(H, H, N)``."""
        H, N = self.d_model, self.d_state
        sizes = (N, H * N, H * N, H, N)
        index = PARTS.index(part)
        start = sum(sizes[:index])
        kernel = self.x_proj.kernel[...][:, start : start + sizes[index]]
        return kernel.reshape(H, H, N) if part in ("B", "C") else kernel

    def _contract(self, features, weight):
        """``features (..., F) @ weight (F, O)`` at the default matmul precision: the weights are ``x_proj``'s, so the
        contraction runs at the precision ``x_proj`` (an ``nnx.Linear``) runs at, as lrnnx forms ``B_t``, ``C_t``
        (``jax.default_matmul_precision`` selects it; on a GPU XLA's default is TF32)."""
        return jnp.einsum("...i,io->...o", features, weight.astype(features.dtype))

    def coefficients(self, x, weights=None):
        """``x (..., H)`` (after ``in_proj``) -> ``(A_bar (..., N), B_t^T x + beta (..., N))``.

        ``weights``: :meth:`contraction_weights` (computed here when None)."""
        w = self.contraction_weights() if weights is None else weights
        A_bar = s7_transition(self._contract(x, w["a"]) + self.base_params[...])
        return A_bar, self._contract(drive_features(x), w["drive"]) + self._contract(x, w["beta"])

    def readout(self, s, x, weights=None):
        """``s (..., N)``, ``x (..., H)`` -> ``y = C_t s + d_t * x`` (..., H)."""
        w = self.contraction_weights() if weights is None else weights
        return self._contract(readout_features(x, s), w["readout"]) + self._contract(x, w["d"]) * x

    def contraction_weights(self) -> dict:
        """The fixed weights of the forward's contractions: ``"a"``, ``"beta"`` ``(H, N)``, ``"d"`` ``(H, H)``,
        ``"drive"`` (:func:`drive_weights`) and ``"readout"`` (:func:`readout_weights`)."""
        return {"a": self._weight("a"), "beta": self._weight("beta"), "d": self._weight("d"),
                "drive": drive_weights(self._weight("B")), "readout": readout_weights(self._weight("C"))}

    def output(self, y, u):
        """The gate and the residual: ``sigmoid(W_g GELU(y)) * y + u``."""
        return jax.nn.sigmoid(self.gate_proj(jax.nn.gelu(y, approximate=False))) * y + u

    def _by_chunks(self, fn, *sequences):
        """``fn`` of ``(B, L, ...)`` sequences, ``chunk_size`` steps at a time, its features recomputed in the
        backward (``jax.checkpoint`` with :data:`SAVE_CONTRACTIONS`), so they exist one chunk at a time; one call
        when unchunked."""
        if self.chunk_size is None:
            return fn(*sequences)
        time_major = [jnp.moveaxis(a, 1, 0) for a in sequences]
        body = jax.checkpoint(lambda chunk: fn(*chunk), policy=SAVE_CONTRACTIONS)
        out = jax.lax.map(body, time_major, batch_size=self.chunk_size)
        return jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1), out)

    def _forward(self, u, integration_timesteps, mask, lengths, return_cache, cache):
        x = self.in_proj(u)
        if cache is None:
            s0 = jnp.zeros((u.shape[0], self.d_state), x.dtype)
        else:
            s0 = cache["lrnn_state"].astype(x.dtype)
        w = self.contraction_weights()  # once, outside the chunks
        coefficients = lambda x: self.coefficients(x, w)  # noqa: E731
        readout = lambda s, x: self.readout(s, x, w)  # noqa: E731
        scanned = diagonal_scan.model_scan(*self._by_chunks(coefficients, x), s0, mask, config=self.kernel_config)
        if scanned is None:
            y, s = chunked_scan(coefficients, readout, x, s0, mask, self.chunk_size, checkpoint_policy=SAVE_CONTRACTIONS)
        else:
            states, s = scanned
            y = self._by_chunks(readout, states, x)
        if not return_cache:
            return self.output(y, u), None
        # the dtype of the given cache (as ``step`` returns it), else the compute dtype
        return self.output(y, u), {"lrnn_state": s if cache is None else s.astype(cache["lrnn_state"].dtype)}

    # ------------------------------------------------------------- the cell
    def cell(self) -> Cell:
        """The S7 step as a :class:`pallas_kernels.cells.Cell` (see :func:`s7_step`).

        The parameters hold ``2 H^2 N`` numbers of ``x_proj`` weights (the 3-D blocks ``WB``
        and ``WC``), so the fused kernels take only small ``H, N``.
        """
        W = {part: in_compute_dtype(self._weight(part)) for part in PARTS}
        params = {
            "Win": in_compute_dtype(self.in_proj.kernel[...]),
            "Wa": W["a"],
            "base": in_compute_dtype(self.base_params[...]),
            "WB": jnp.swapaxes(W["B"], 1, 2),
            "WC": W["C"],
            "Wd": W["d"],
            "Wbeta": W["beta"],
            "Wg": in_compute_dtype(self.gate_proj.kernel[...]),
        }
        return Cell(s7_step, params, policy=POLICY)

    def cell_state(self, cache):
        s = cache["lrnn_state"]
        return {"s": s.astype(compute_dtype(s.dtype))}

    def cell_cache(self, state, like):
        return {"lrnn_state": state["s"].astype(like["lrnn_state"].dtype)}

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int = 1, dtype=None):
        """``{"lrnn_state": (batch_size, N) zeros}``."""
        batch_size, _ = check_cache_size(batch_size, max_seqlen)
        return {"lrnn_state": jnp.zeros((batch_size, self.d_state), self._state_dtype(dtype, False))}

    def lrnnx_entries(self):
        return {
            **lrnnx_linear_entries("in_proj", self.in_proj),
            **lrnnx_linear_entries("x_proj", self.x_proj),
            **lrnnx_linear_entries("gate_proj", self.gate_proj),
            "base_params": lrnnx_entry(self.base_params),
        }
