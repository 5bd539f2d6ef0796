"""The block shared by S4 (DPLR) and S4D (diagonal), with lrnnx's parameters and initialisations.

The block (lrnnx's ``S4`` / ``S4D`` modules, ``d_model = H``)::

    v = GELU(W_g x)                             gate only                (B, L, H*gate)
    u = W_b x                                   bottleneck only          (B, L, H'), H' = H // bottleneck
    y[c, h] = (K_{c,h} * u[h]) + D[c, h] u[h]   the SSM, c = channels    (B, L, c, H')
    y = GELU(flatten (c h), or (h c))                                    (B, L, c*H')
    y = (W_o y) * v                             gate only; W_o: c*H' -> H*gate (identity if equal)
    y = dropout(GELU(y))
    y = GELU(W_out y)                           unless final_act=None    (B, L, H)

Every SSM (impulse response ``K_{c,h}``) is a
single-input linear time-invariant system of the input channel ``h``: S4 uses the
DPLR matrix ``A = Lambda - P P^*`` with the bilinear transform, S4D a diagonal
``A`` with ZOH or bilinear. Subclasses supply the SSM (``_ssm_forward`` from an
initial state, ``_ssm_cell_system``, ``state_size``); this module holds everything
else.

**The step** is written once, as the block's cell (:meth:`S4Layer.cell`,
:func:`block_step`; see ``pallas_kernels.cells``), which ``model.step``,
``model.multi_step`` and the fused Pallas rollout all run. Its SSM update, per channel
``h (S,)`` complex::

    h <- A_bar h - sum_{s < r} L_s (R_s . h) + B_bar u      y[c] = Re(C[c] h)

is S4's bilinear DPLR step in the ``O(N r)`` factored form of
``lrnnx_jax.models.lti.s4.dplr_factors`` (``dA = diag(A_bar) - L^T R``, full state
``S = N``), or S4D's diagonal step (``r = 0``, half state ``S = N/2``, the factor 2 in
``C``). The block around it reads the flattened ``(c h)`` (or ``(h c)``) features
through one parameter tile per channel, so the step needs no slicing or concatenation.

Initialisations of lrnnx (``lrnnx.ops.s4_utils``), rewritten in NumPy/JAX:

* HiPPO NPLR ``init="legs" | "legt" | "fourier"`` (diagonalised in float64),
* direct DPLR / diagonal ``init="diag-<x>" | "dplr-<x>"`` with
  ``<x> in {lin, inv, inv2, quad, real, rand, legs}`` (``"dplr"`` alone is ``"dplr-legs"``),
* combinations ``"hippo"`` (legs, fourier), ``"diag"`` (diag-inv, diag-lin) and
  ``"all"``, which split the ``n_ssm`` copies between them.

Parameters keep lrnnx's names, shapes and real views (``B``, ``C``, ``P`` as
``(..., 2)`` real/imaginary pairs), so lrnnx ``state_dict``s load unchanged; see
docs/differences-from-lrnnx.md for what differs.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, ClassVar, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrnnx_jax.core import hippo, lti, validation
from lrnnx_jax.core.base import LRNN, compute_dtype, in_compute_dtype, lrnnx_entry, lrnnx_linear_entries, torch_linear
from lrnnx_jax.core.scan import DEFAULT_CHUNK_SIZE
from pallas_kernels import complex_lib as cl
from pallas_kernels import kernel_math as km
from pallas_kernels.cells import UNSPLIT, Cell, Collectives, KernelPolicy, Split

TRANSFORMS = ("none", "exp", "relu", "sigmoid", "softplus")
NPLR_MEASURES = ("legs", "legt", "fourier", "fout")
DPLR_INITS = (
    "lin", "linear", "inv", "inverse", "inv2", "inverse2", "quad", "quadratic", "real", "rand", "random", "legs", "hippo",
)
COMBINATIONS = {
    "hippo": ("legs", "fourier"),
    "diag": ("diag-inv", "diag-lin"),
    "all": ("legs", "fourier", "diag-inv", "diag-lin"),
}
NPLR_ARGS = ("B_clip",)
DPLR_ARGS = ("real_random", "real_scale", "imag_random", "imag_scale", "B_init", "B_scale", "P_scale", "normalize")
B_INITS = ("constant", "random", "alternating", "unit-cw", "unit-ccw", "legs", "hippo")
#: how the programs of S4's split rollout exchange their partial sums (``pallas_kernels.cells.Split.exchange``).
#: Measured on an H200 (H=128, d_state 64, 512 steps; µs per step, two alternating runs each,
#: ``benchmarks/results/split_exchange_h200/device_call_6``): tagged words 3.13-3.17 / 3.04-3.13 / 3.74-3.81 at
#: B = 1 / 8 / 32 against 3.18-3.30 / 3.56-3.65 / 5.02-5.25 with the counter barrier. Again with the barrier spinning on
#: volatile loads (``benchmarks/results/session15_h200/call3``): tagged 3.08, 3.38 / 3.38, 3.34 / 3.88, 4.11 against
#: the barrier's 2.81, 2.83 / 3.76, 3.14 / 4.93, 5.00: the tagged words stay (faster at B=32, the issue's point).
#: Once more (``benchmarks/results/session16_h200/call2``), tagged 3.22, 3.32 / 3.49, 3.27 / 4.02, 4.04 against the
#: barrier's 3.27, 3.28 / 3.05, 3.30 / 5.40, 4.83 (and 3.26, 3.11 against 3.03, 3.40 at B=16): no batch size at which
#: the barrier is faster in every run.
SPLIT_EXCHANGE = "tagged"


# ------------------------------------------------------------------ transforms
def param_transform(p, transform: str):
    """Stored parameter -> positive value (lrnnx ``param_transform``)."""
    if transform == "none":
        return p
    if transform == "exp":
        return jnp.exp(p)
    if transform == "relu":
        return jax.nn.relu(p) + 1e-4
    if transform == "sigmoid":
        return jax.nn.sigmoid(p)
    return jax.nn.softplus(p)


def inv_transform(value, transform: str):
    """Positive value -> stored parameter, after clamping at 1e-4 (lrnnx ``inv_transform``)."""
    value = jnp.maximum(value, 1e-4)
    if transform in ("none", "relu"):
        return value
    if transform == "exp":
        return jnp.log(value)
    if transform == "sigmoid":
        return jnp.log(value) - jnp.log1p(-value)
    return jnp.log(jnp.expm1(value))


def _check_transform(value, name):
    if value not in TRANSFORMS:
        raise ValueError(f"{name} must be one of {TRANSFORMS}, got {value!r}")


def as_complex(real_view):
    """``(..., 2)`` real/imaginary pairs -> complex ``(...)``."""
    return jax.lax.complex(real_view[..., 0], real_view[..., 1])


def as_real_view(z):
    """Complex ``(...)`` -> ``(..., 2)`` real/imaginary pairs."""
    return jnp.stack([jnp.real(z), jnp.imag(z)], axis=-1)


# -------------------------------------------------------------- HiPPO (NumPy)
def hippo_transition(measure: str, N: int):
    """``(A (N, N), B (N,))`` of a HiPPO measure, float64 (lrnnx ``transition``)."""
    if measure == "legs":
        A, _, B = hippo.make_NPLR_HiPPO(N)
        return A, B
    if measure == "legt":
        R = np.sqrt(2 * np.arange(N) + 1.0)
        i, j = np.meshgrid(np.arange(N), np.arange(N), indexing="ij")
        A = -0.5 * R[:, None] * np.where(i < j, (-1.0) ** (i - j), 1.0) * R[None, :]
        return A, 0.5 * R
    # fourier
    d = np.stack([np.zeros(N // 2), np.arange(N // 2)], axis=-1).reshape(-1)[1:]
    B = np.zeros(N)
    B[0::2] = math.sqrt(2)
    B[0] = 1
    A = np.pi * (-np.diag(d, 1) + np.diag(d, -1)) - B[:, None] * B[None, :]
    return A, B


def rank_correction(measure: str, N: int, rank: int):
    """``P (rank, N)`` such that ``A + P^T P`` is normal, zero-padded to ``rank`` rows."""
    if measure == "legs":
        P = np.sqrt(0.5 + np.arange(N))[None]
    elif measure == "legt":
        if rank < 2:
            raise ValueError(f"init='legt' needs rank >= 2 (its low-rank correction has rank 2), got rank={rank}")
        full, odd = np.sqrt(1 + 2 * np.arange(N)), np.arange(N) % 2 == 1
        P = np.stack([np.where(odd, full, 0.0), np.where(odd, 0.0, full)]) / math.sqrt(2)
    else:
        P = np.zeros(N)
        P[0::2] = math.sqrt(2)
        P[0] = 1
        P = P[None]
    return np.concatenate([P, np.zeros((max(rank - P.shape[0], 0), N))])


def nplr(measure: str, N: int, rank: int = 1, B_clip: Optional[float] = 2.0):
    """The NPLR form of a HiPPO matrix, keeping one eigenvalue of each conjugate pair.

    Returns ``(W (N/2,), P (rank, N/2), B (N/2,), V (N, N/2))`` complex128 with
    ``A = V (W - P P^*) V^*`` on the conjugate-symmetric subspace; ``Im B`` is
    clipped to ``[-B_clip, B_clip]``.
    """
    A, B = hippo_transition(measure, N)
    P = rank_correction(measure, N, rank)
    AP = A + P.T @ P
    W_im, V = np.linalg.eigh(AP * -1j)
    order = np.argsort(W_im, kind="stable")
    W = np.mean(np.diagonal(AP)) + 1j * W_im[order][: N // 2]
    V = V[:, order][:, : N // 2].copy()
    if abs(W[-1]) < 1e-4:  # a zero eigenvalue has no conjugate partner: use a fixed pair vector
        V[:, -1] = 0.0
        V[0, -1] = 2**-0.5
        V[1, -1] = 2**-0.5 * 1j
    V_inv = V.conj().T
    B = V_inv @ B
    P = P @ V_inv.T
    if B_clip is not None:
        B = B.real + 1j * np.clip(B.imag, -B_clip, B_clip)
    return W, P, B, V


def dplr(
    key,
    init: str,
    N: int,
    rank: int,
    H: int,
    real_random: bool = False,
    real_scale: float = 1.0,
    imag_random: bool = False,
    imag_scale: float = 1.0,
    B_init: str = "constant",
    B_scale: float = 1.0,
    P_scale: float = 1.0,
    normalize: bool = False,
):
    """A directly constructed DPLR matrix (lrnnx ``dplr``).

    Returns ``(A (H, N/2), P (rank, H, N/2), B (H, N/2), V (H, N, N/2))`` complex.
    """
    k = jax.random.split(key, 5)
    n = jnp.broadcast_to(jnp.arange(N // 2, dtype=jnp.float32), (H, N // 2))
    real = jax.random.uniform(k[0], (H, N // 2)) if real_random else 0.5 * jnp.ones((H, N // 2))
    real = real_scale * real
    imag = N // 2 * jax.random.uniform(k[1], (H, N // 2)) if imag_random else n
    if init in ("random", "rand"):
        imag = jnp.exp(jax.random.normal(k[2], (H, N // 2)))
    elif init == "real":
        imag = 0 * imag
        real = jax.random.uniform(k[0], (H, N // 2)) * (N // 2) if real_random else 1 + n
    elif init in ("linear", "lin"):
        imag = math.pi * imag
    elif init in ("inverse", "inv"):
        imag = N / math.pi * (N / (1 + 2 * imag) - 1)
    elif init in ("inverse2", "inv2"):
        imag = N / math.pi * (N / (1 + imag) - 1)
    elif init in ("quadratic", "quad"):
        imag = (1 + 2 * imag) ** 2 / math.pi
    else:  # legs / hippo
        imag = jnp.broadcast_to(-nplr("legs", N)[0].imag, (H, N // 2))
    A = -real - 1j * (imag_scale * imag)
    if init in ("legs", "hippo"):
        B = jnp.broadcast_to(nplr("legs", N, rank)[2], (H, N // 2))
    elif B_init == "constant":
        B = jnp.ones((H, N // 2), jnp.complex64)
    elif B_init == "random":
        B = jax.random.normal(k[3], (H, N // 2), jnp.complex64)
    elif B_init == "alternating":
        if N % 4:
            raise ValueError(f"B_init='alternating' needs d_state divisible by 4, got {N}")
        B = jnp.tile(jnp.array([1.0, -1.0], jnp.complex64), (H, N // 4))
    elif B_init in ("unit-cw", "unit-ccw"):
        sign = -1 if B_init == "unit-cw" else 1
        B = jnp.broadcast_to(jnp.exp(sign * 2j * math.pi / N * jnp.arange(N // 2)), (H, N // 2))
    else:
        raise ValueError(f"B_init={B_init!r} needs the 'legs' init ('diag-legs' or 'dplr-legs'), got init {init!r}")
    B = B_scale * B
    if normalize:
        B = B / jnp.sqrt(2 * jnp.sum(jnp.abs(B / A) ** 2, axis=-1, keepdims=True))
    if B_init in ("legs", "hippo"):
        P = jnp.broadcast_to(nplr("legs", N, rank)[1][:, None], (rank, H, N // 2))
    else:
        P = P_scale * jax.random.normal(k[4], (rank, H, N // 2), jnp.complex64)
    V = jnp.broadcast_to(jnp.eye(N, N // 2), (H, N, N // 2))
    return A, P, B, V


def _single_init(key, init: str, N: int, rank: int, H: int, init_args: dict):
    if init.startswith("diag") or init.startswith("dplr"):
        parts = init[4:].split("-")
        name = parts[1] if len(parts) == 2 and parts[0] == "" else None
        if (len(parts) > 1 and name not in DPLR_INITS) or parts[0] != "":
            raise ValueError(f"init {init!r} is not 'diag-<x>' or 'dplr-<x>' with <x> in {DPLR_INITS}")
        unknown = sorted(set(init_args) - set(DPLR_ARGS))
        if unknown:
            raise TypeError(f"init={init!r} does not take {unknown}; it takes {DPLR_ARGS}")
        args = dict(init_args)
        if init.startswith("diag"):
            args["P_scale"] = 0.0
        if args.get("B_init", "constant") not in B_INITS:
            raise ValueError(f"B_init must be one of {B_INITS}, got {args['B_init']!r}")
        return dplr(key, name or "hippo", N, rank, H, **args)
    if init not in NPLR_MEASURES:
        raise ValueError(
            f"unknown init {init!r}; expected one of {NPLR_MEASURES}, {sorted(COMBINATIONS)}, 'diag-<x>' or 'dplr-<x>'"
        )
    unknown = sorted(set(init_args) - set(NPLR_ARGS))
    if unknown:
        raise TypeError(f"init={init!r} does not take {unknown}; it takes {NPLR_ARGS}")
    W, P, B, V = nplr("fourier" if init == "fout" else init, N, rank, **init_args)
    return (
        np.broadcast_to(W, (H, N // 2)),
        np.broadcast_to(P[:, None], (rank, H, N // 2)),
        np.broadcast_to(B, (H, N // 2)),
        np.broadcast_to(V, (H, N, N // 2)),
    )


def ssm_init(key, init: str, N: int, rank: int, n_ssm: int, init_args: dict):
    """``(A (S, N/2), P (rank, S, N/2), B (S, N/2), V (S, N, N/2))``, ``S = n_ssm`` split between the inits."""
    inits = COMBINATIONS.get(init, (init,))
    if n_ssm % len(inits):
        raise ValueError(f"n_ssm={n_ssm} SSM copies must be a multiple of the {len(inits)} inits of init={init!r}")
    keys = jax.random.split(key, len(inits))
    parts = [_single_init(k, name, N, rank, n_ssm // len(inits), init_args) for k, name in zip(keys, inits)]
    A, P, B, V = (jnp.concatenate([jnp.asarray(p[i]) for p in parts], axis=1 if i == 1 else 0) for i in range(4))
    if validation.is_concrete(A) and not (bool(jnp.all(jnp.real(A) < 1e-4)) and bool(jnp.all(jnp.imag(A) <= 0))):
        raise ValueError(f"init={init!r} with {init_args} gives an A with Re A >= 0 or Im A > 0")
    return A, P, B, V


def init_log_dt(key, H: int, N: int, dt_min, dt_max, dt_tie: bool, dt_transform: str, deterministic: bool):
    """The stored step ``inv_dt``: ``(H, 1)`` (``dt_tie``) or ``(H, N/2)``, log-uniform in ``[dt_min, dt_max]``."""
    lo, hi = math.log(dt_min), math.log(dt_max)
    if deterministic:
        return jnp.linspace(lo, hi, H)[:, None]
    log_dt = jax.random.uniform(key, (H, 1) if dt_tie else (H, N // 2), minval=lo, maxval=hi)
    return log_dt if dt_transform == "exp" else inv_transform(jnp.exp(log_dt), dt_transform)


class SSMParams(NamedTuple):
    """Decoded continuous-time SSM of every channel (``n_ssm`` copies tiled to ``H'``), half state ``N/2``.

    ``dt (H', 1 or N/2)`` real, ``A (H', N/2)``, ``B (H', N/2)``, ``C (c, H', N/2)``,
    ``P (rank, H', N/2)`` (S4 only, else None), all complex.
    """

    dt: Any
    A: Any
    B: Any
    C: Any
    P: Any


class Parameterization(NamedTuple):
    """How the stored SSM parameters map to :class:`SSMParams` (static; see :class:`S4Layer`)."""

    dt_fast: bool
    dt_transform: str
    real_transform: str
    imag_transform: str
    is_real: bool
    copies: int  # H' // n_ssm


@functools.partial(jax.jit, static_argnames="how")
def decode_ssm(stored: dict, how: Parameterization) -> SSMParams:
    """lrnnx's stored parameters (``inv_dt``, ``A_real``, [``A_imag``], ``B``, ``C``, [``P``]) -> :class:`SSMParams`."""
    inv_dt = stored["inv_dt"]
    dt = param_transform(jnp.sinh(inv_dt) if how.dt_fast else inv_dt, how.dt_transform)
    A = -param_transform(stored["A_real"], how.real_transform)
    if how.is_real:
        A, B, C = A + 0j, stored["B"][0] + 0j, stored["C"] + 0j
    else:
        A = A - 1j * param_transform(stored["A_imag"], how.imag_transform)
        B, C = as_complex(stored["B"][0]), as_complex(stored["C"])
    P = jnp.tile(as_complex(stored["P"]), (1, how.copies, 1)) if "P" in stored else None
    return SSMParams(dt, jnp.tile(A, (how.copies, 1)), jnp.tile(B, (how.copies, 1)), C, P)


def conj_pairs(z):
    """Half state ``(..., N/2)`` -> the full conjugate-symmetric state ``(..., N)``: ``[z, conj z]``."""
    return jnp.concatenate([z, jnp.conj(z)], axis=-1)


# ----------------------------------------------------------------------- cell
def _state_sum(z: cl.Planes) -> cl.Planes:
    """``sum_n z[..., n]`` of complex ``z (..., H', S)`` over the state, kept as ``(..., H', 1)``."""
    return cl.Planes(jnp.sum(z.re, axis=-1, keepdims=True), jnp.sum(z.im, axis=-1, keepdims=True))


def block_step(params, state, x, inputs, precision, *, channels: int, rank: int, has_input_linear: bool,
               gate: Optional[str], final_linear: bool, comm: Collectives = UNSPLIT):
    """The S4/S4D block's step (the cell of :meth:`S4Layer.cell`): ``x (..., H) -> (y (..., H), state)``.

    One row (``x (H,)``, ``state["h"] (H', S)``) or a block of rows (a leading ``(R,)``
    on both). The SSM state ``h`` of every channel (:class:`~pallas_kernels.complex_lib.Planes`)
    is updated as ``h <- a h - sum_{s < rank} L_s (R_s . h) + B u`` (``R_s . h`` summed
    over the state): S4's factored DPLR step or S4D's diagonal one (``rank = 0``). The
    SSM output of channel ``j`` is one block ``z_j (..., H')``; every linear map that
    reads the flattened features holds one tile per block (``name{j}``), so nothing is
    sliced or concatenated here. ``gate``: None, ``"blocks"`` (``W_o`` is the identity:
    ``v`` split into blocks, ``Wv{j}``) or ``"full"`` (``G{j}`` map the blocks to one gate
    vector). Without an output layer, ``O{j}`` are one-hot maps of the blocks to the
    output features (exact). ``inputs["drop{j}"]`` (training mode): dropout masks of the blocks.

    Split over programs (:meth:`S4Layer.cell`'s ``Split``; ``comm``), each program holds a slice of the ``H'`` SSM
    channels (their ``a``, ``B``, ``L``, ``R``, ``C``, ``D``, the ``Win`` columns, the ``Wv{j}`` columns and the rows
    of ``G{j}`` and ``O{j}``; without an input layer, ``x`` is its slice of the features, ``Split.splits_x``): the
    maps that read the blocks (the full gate and the output) sum their partial
    products over the programs (``comm.psum``).
    """
    p = params
    u = km.project(x, p["Win"], 0, precision) + p["Win_b"] if has_input_linear else x
    h = state["h"]
    h_new = cl.add(cl.mul(p["a"], h), cl.mul(p["B"], u[..., None]))
    for r in range(rank):
        h_new = cl.sub(h_new, cl.mul(p[f"L{r}"], _state_sum(cl.mul(p[f"R{r}"], h))))
    blocks = [km.gelu(jnp.sum(cl.real(cl.mul(p[f"C{j}"], h_new)), axis=-1) + p[f"D{j}"] * u) for j in range(channels)]
    if gate == "full":
        g = comm.psum(sum(km.project(z, p[f"G{j}"], 0, precision) for j, z in enumerate(blocks))) + p["G_b"]
        blocks = [g * km.gelu(km.project(x, p["Wv0"], 0, precision) + p["Wv0_b"])]
    elif gate == "blocks":
        blocks = [z * km.gelu(km.project(x, p[f"Wv{j}"], 0, precision) + p[f"Wv{j}_b"]) for j, z in enumerate(blocks)]
    blocks = [km.gelu(z) for z in blocks]
    if "drop0" in inputs:
        blocks = [z * inputs[f"drop{j}"] for j, z in enumerate(blocks)]
    # the output layer is a dense projection; the one-hot maps (no output layer) must stay exact
    output = km.project if final_linear else km.contract
    out = sum(output(z, p[f"O{j}"], 0, precision) for j, z in enumerate(blocks))
    if gate != "full":  # the blocks are slices of the split channels (a full gate formed one whole block)
        out = comm.psum(out)
    y = km.gelu(out + p["O_b"]) if final_linear else out
    return y, {"h": h_new.astype(h.dtype)}


# ---------------------------------------------------------------------- block
class S4Layer(LRNN):
    """The S4/S4D block of lrnnx (see the module docstring); subclasses provide the SSM.

    Args (lrnnx names and defaults):
      d_model: H, input and output features.
      bottleneck: if set, the SSM runs on ``H' = H // bottleneck`` features after a linear map ``H -> H'``.
      gate: if set, multiplicative gating with ``H * gate`` features.
      final_act: any string gives the output ``Linear + GELU`` (as in lrnnx, whatever the name);
        None gives no output layer (then the SSM output must already have H features).
      postact: deprecated alias of ``final_act`` (then ``final_act`` must be None).
      dropout, tie_dropout: dropout after the activations (``tie_dropout``: one mask per
        sequence, like ``Dropout1d``). Inactive by default; ``nnx.view(model, deterministic=False)``
        (or ``model.train()``) turns it on, drawing from ``rngs.dropout``.
      transposed: True for ``(B, H, L)`` input and output, False for ``(B, L, H)``.
      l_max: accepted for compatibility; kernels are computed at the input's length.
      channels: c, outputs of each SSM (``c * H'`` features before the output layer).
      d_state: N (even): the state of each SSM has ``N/2`` conjugate pairs.
      dt_min, dt_max, dt_tie, dt_transform, dt_fast: step initialisation and parameterisation.
      rank: rank of the low-rank term (S4; also used by the NPLR inits).
      n_ssm: number of distinct (A, B) copies, tiled over the H' channels (default H').
      init: initialisation of A, B (and P), see the module docstring.
      deterministic: deterministic C and dt initialisation.
      real_transform, imag_transform: parameterisation of ``-Re A`` and ``-Im A``.
      is_real: real-valued A, B, C.
      lr, wd, verbose: accepted for compatibility; optimiser settings live outside the model.
      method: full-sequence path, ``"auto"``, ``"fft"`` or ``"scan"``.
      chunk_size: chunk of the scan path (None: one chunk).
      rngs: ``nnx.Rngs``.
      **layer_args: ``swap_channels`` (flatten ``(h c)`` instead of ``(c h)``), ``drop_kernel``
        (only 0), and the init arguments ``B_clip`` (NPLR inits) or ``real_random``,
        ``real_scale``, ``imag_random``, ``imag_scale``, ``B_init``, ``B_scale``, ``P_scale``,
        ``normalize`` (``diag-*`` / ``dplr-*`` inits).
    """

    #: S4 registers the low-rank factor ``P``; S4D does not.
    low_rank: ClassVar[bool] = False
    #: whether the cell declares its split over the ``H'`` SSM channels (:meth:`cell`): S4, whose parameters (394 KB at
    #: H=128, N=64) do not fit one program; S4D's fused rollout was measured unsplit.
    split_channels: ClassVar[bool] = False
    #: lrnnx's kernel module holds references to the same parameters: duplicates, ignored on load.
    lrnnx_ignored_entries = tuple(f"layer.kernel.{name}" for name in ("inv_dt", "A_real", "A_imag", "B", "C"))

    def __init__(
        self,
        d_model: int,
        bottleneck: Optional[int] = None,
        gate: Optional[int] = None,
        final_act: Optional[str] = "glu",
        postact: Optional[str] = None,
        dropout: float = 0.0,
        tie_dropout: bool = False,
        transposed: bool = True,
        l_max: Optional[int] = None,
        channels: int = 1,
        d_state: int = 64,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_tie: bool = True,
        dt_transform: str = "exp",
        dt_fast: bool = False,
        rank: int = 1,
        n_ssm: Optional[int] = None,
        init: str = "legs",
        deterministic: bool = False,
        real_transform: str = "exp",
        imag_transform: str = "none",
        is_real: bool = False,
        lr: Optional[float] = None,
        wd: float = 0.0,
        verbose: bool = True,
        *,
        method: str = "auto",
        chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE,
        rngs: nnx.Rngs,
        **layer_args,
    ):
        d_model = validation.check_positive_int(d_model, "d_model")
        channels = validation.check_positive_int(channels, "channels")
        rank = validation.check_positive_int(rank, "rank")
        d_state = validation.check_positive_int(d_state, "d_state")
        if d_state % 2:
            raise ValueError(f"d_state must be a positive even number (N/2 conjugate pairs), got {d_state!r}")
        inner = d_model if bottleneck is None else d_model // validation.check_positive_int(bottleneck, "bottleneck")
        if inner < 1:
            raise ValueError(f"bottleneck={bottleneck} leaves no features of d_model={d_model}")
        n_ssm = inner if n_ssm is None else validation.check_positive_int(n_ssm, "n_ssm")
        if inner % n_ssm:
            raise ValueError(f"n_ssm={n_ssm} must divide the SSM width {inner} (d_model // bottleneck)")
        _check_transform(dt_transform, "dt_transform")
        _check_transform(real_transform, "real_transform")
        _check_transform(imag_transform, "imag_transform")
        if deterministic and (not dt_tie or dt_transform != "exp"):
            raise ValueError(
                f"deterministic=True needs dt_tie=True and dt_transform='exp', got {dt_tie=} and {dt_transform=}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        if postact is not None:
            if final_act is not None:
                raise ValueError("postact is the deprecated name of final_act: pass final_act=None with it")
            final_act = postact
        swap_channels = bool(layer_args.pop("swap_channels", False))
        if layer_args.pop("drop_kernel", 0.0):
            raise ValueError(
                "drop_kernel (dropout on the convolution kernel) is not supported: the scan and step paths have no kernel"
            )
        lti.resolve_method(method, 1, False)

        ssm_width = channels * inner
        gate_width = None if gate is None else d_model * validation.check_positive_int(gate, "gate")
        out_width = gate_width if gate is not None else ssm_width
        if final_act is None and out_width != d_model:
            raise ValueError(
                f"final_act=None leaves {out_width} output features (channels * d_model // bottleneck, or "
                f"d_model * gate), but the output must have d_model={d_model}"
            )

        self.d_model, self.d_inner, self.d_state = d_model, inner, d_state
        self.channels, self.rank, self.n_ssm = channels, rank, n_ssm
        self.bottleneck, self.gate, self.transposed, self.l_max = bottleneck, gate, transposed, l_max
        self.swap_channels, self.is_real, self.dt_fast = swap_channels, is_real, dt_fast
        self.dt_transform, self.real_transform, self.imag_transform = dt_transform, real_transform, imag_transform
        self.method, self.chunk_size = method, validation.check_chunk_size(chunk_size)

        k = jax.random.split(rngs.params(), 3)
        A, P, B, V = ssm_init(k[0], init, d_state, rank, n_ssm, layer_args)
        if deterministic:
            C = jnp.tile(jnp.conj(V[:, 0, :])[None], (channels, inner // n_ssm, 1))
        else:
            C = jax.random.normal(k[1], (channels, inner, d_state // 2), jnp.complex64)
        inv_dt = init_log_dt(k[2], inner, d_state, dt_min, dt_max, dt_tie, dt_transform, deterministic)
        self.inv_dt = nnx.Param(jnp.asarray(jnp.arcsinh(inv_dt) if dt_fast else inv_dt, jnp.float32))
        self.A_real = nnx.Param(jnp.asarray(inv_transform(-jnp.real(A), real_transform), jnp.float32))
        if is_real:
            self.B = nnx.Param(jnp.asarray(jnp.real(B)[None], jnp.float32))
            self.C = nnx.Param(jnp.asarray(jnp.real(C), jnp.float32))
        else:
            self.A_imag = nnx.Param(jnp.asarray(inv_transform(-jnp.imag(A), imag_transform), jnp.float32))
            self.B = nnx.Param(jnp.asarray(as_real_view(B)[None], jnp.float32))
            self.C = nnx.Param(jnp.asarray(as_real_view(jnp.conj(C)), jnp.float32))
        if self.low_rank:
            self.P = nnx.Param(jnp.asarray(as_real_view(P), jnp.float32))
        self.D = nnx.Param(jax.random.normal(rngs.params(), (channels, inner)))

        def linear(d_in, d_out):
            return torch_linear(d_in, d_out, use_bias=True, rngs=rngs)

        self.input_linear = linear(d_model, inner) if bottleneck is not None else None
        self.input_gate = linear(d_model, gate_width) if gate is not None else None
        self.output_gate = linear(ssm_width, gate_width) if gate is not None and ssm_width != gate_width else None
        self.output_linear = linear(out_width, d_model) if final_act is not None else None
        tied = (1,) if tie_dropout else ()  # (B, L, F): one mask per sequence
        self.drop = nnx.Dropout(dropout, broadcast_dims=tied, deterministic=True, rngs=rngs) if dropout > 0 else None

    # ------------------------------------------------------------- SSM (hooks)
    #: where ``use_kernels="auto"`` runs the block's kernels (see :meth:`cell`); each SSM declares its measurement
    kernel_policy: ClassVar[KernelPolicy] = KernelPolicy()

    @property
    def state_size(self) -> int:
        """Size of the last axis of the cache's ``lrnn_state``."""
        raise NotImplementedError

    def _ssm_forward(self, u, mask, lengths, return_state: bool, h0=None):
        """``u (B, L, H')`` from the state ``h0 (B, H', state_size)`` (None: zeros) ->
        ``(y (B, L, c, H'), state (B, H', state_size) or None)``."""
        raise NotImplementedError

    def _ssm_cell_system(self):
        """The discrete SSM of the cell: ``(A_bar, B_bar (H', S), C (c, H', S), low_rank)`` complex,
        ``S = state_size``, with ``low_rank`` a list of the ``(L_s, R_s) (H', S)`` pairs of
        ``dA = diag(A_bar) - sum_s L_s R_s^T`` (empty for a diagonal SSM)."""
        raise NotImplementedError

    # -------------------------------------------------------------- parameters
    def _ssm_names(self) -> list[str]:
        return ["inv_dt", "A_real"] + ([] if self.is_real else ["A_imag"]) + ["B", "C"] + (["P"] if self.low_rank else [])

    def ssm_params(self) -> SSMParams:
        """The decoded continuous-time parameters (see :class:`SSMParams`)."""
        how = Parameterization(
            self.dt_fast, self.dt_transform, self.real_transform, self.imag_transform, self.is_real,
            self.d_inner // self.n_ssm,
        )
        return decode_ssm({name: getattr(self, name)[...] for name in self._ssm_names()}, how)

    def lrnnx_entries(self):
        entries = {name: lrnnx_entry(getattr(self, name)) for name in self._ssm_names()}
        entries["D"] = lrnnx_entry(self.D)
        for prefix, linear in (
            ("input_linear", self.input_linear),
            ("input_gate.0", self.input_gate),
            ("output_gate", self.output_gate),
            ("output_linear.0", self.output_linear),
        ):
            if linear is not None:
                entries.update(lrnnx_linear_entries(prefix, linear))
        return entries

    # ------------------------------------------------------------------- block
    def __call__(self, x, integration_timesteps=None, lengths=None, *, cache=None, return_cache: bool = False):
        """``x (B, H, L)`` if ``transposed`` else ``(B, L, H)``; the output has the same layout.

        Starts from ``cache`` (an inference cache, e.g. of an earlier chunk; None: the zero
        state). lrnnx returns ``(y, state)``; this returns ``y`` (or ``(y, cache)`` with ``return_cache``).
        """
        return self._forward_call(self, x, integration_timesteps, lengths, cache=cache, return_cache=return_cache)

    def _forward_call(self, argument, x, integration_timesteps=None, lengths=None, *, cache=None,
                      return_cache: bool = False):
        if not self.transposed:
            return super()._forward_call(argument, x, integration_timesteps, lengths, cache=cache,
                                         return_cache=return_cache)
        x = x if hasattr(x, "shape") else jnp.asarray(x)
        if x.ndim != 3 or x.shape[1] != self.d_model:
            raise ValueError(
                f"x must have shape (B, H, L) with H={self.d_model} (transposed=True), got shape {tuple(x.shape)}"
            )
        out = super()._forward_call(argument, jnp.swapaxes(x, 1, 2), integration_timesteps, lengths, cache=cache,
                                    return_cache=return_cache)
        if return_cache:
            return jnp.swapaxes(out[0], 1, 2), out[1]
        return jnp.swapaxes(out, 1, 2)

    def _inputs(self, x, mask=None):
        """``x (B, T, H)`` -> ``(u (B, T, H'), v (B, T, H*gate) or None)``."""
        v = None if self.input_gate is None else jax.nn.gelu(self.input_gate(x), approximate=False)
        u = x if self.input_linear is None else self.input_linear(x)
        if mask is not None and self.input_linear is not None:
            u = jnp.where(mask[..., None], u, 0)  # the bias must not enter the SSM at padded steps
        return u, v

    def _outputs(self, y, u, v):
        """SSM output ``y (B, T, c, H')``, its input ``u`` and the gate ``v`` -> ``(B, T, H)``."""
        y = y + self.D[...] * u[:, :, None, :]
        if self.swap_channels:
            y = jnp.swapaxes(y, -1, -2)
        y = jax.nn.gelu(y.reshape(*y.shape[:2], -1), approximate=False)
        if v is not None:
            y = (y if self.output_gate is None else self.output_gate(y)) * v
        y = jax.nn.gelu(y, approximate=False)
        if self.drop is not None:
            y = self.drop(y)
        if self.output_linear is not None:
            y = jax.nn.gelu(self.output_linear(y), approximate=False)
        return y

    def _forward(self, x, integration_timesteps, mask, lengths, return_cache, cache=None):
        u, v = self._inputs(x, mask)
        h0 = None if cache is None else cache["lrnn_state"]
        y, state = self._ssm_forward(u, mask, lengths, return_cache, h0)
        if return_cache and h0 is not None:
            state = state.astype(h0.dtype)  # the cache keeps its format
        return self._outputs(y, u, v), ({"lrnn_state": state} if return_cache else None)

    # -------------------------------------------------------------------- cell
    def _channel_features(self) -> list:
        """Indices (NumPy) of each channel's ``H'`` SSM features in the flattened ``(c h)`` (or, with
        ``swap_channels``, ``(h c)``) vector."""
        c, Hs = self.channels, self.d_inner
        return [np.arange(Hs) * c + j if self.swap_channels else j * Hs + np.arange(Hs) for j in range(c)]

    def _feature_blocks(self) -> list:
        """Indices of the features of each output block of :func:`block_step` in the vector that the
        dropout and the output layer see: one block per channel, or one block of ``H * gate``
        features behind an output gate."""
        if self.output_gate is not None:
            return [np.arange(self.output_gate.out_features)]
        return self._channel_features()

    def cell(self) -> Cell:
        """The block's step as a ``pallas_kernels.cells.Cell``: :func:`block_step` and its parameters.

        Parameters (complex ones as ``Planes``; ``S`` the SSM state of :meth:`_ssm_cell_system`):
        ``a``, ``B`` (H', S); ``L{s}``, ``R{s}`` (H', S) for each low-rank term; per channel
        ``C{j}`` (H', S) and ``D{j}`` (H',); ``Win`` (H, H'), ``Win_b`` (bottleneck); the gate
        (``G{j}`` (H', H*gate), ``G_b``, ``Wv0`` (H, H*gate), ``Wv0_b``; or ``Wv{j}`` (H, H'),
        ``Wv{j}_b``); ``O{j}`` (block width, H), ``O_b`` (the output layer's rows of each
        block, or one-hot maps without an output layer). Not ``blockable``: the kernels run one
        row per program, the configuration measured (``kernel_policy``); the step itself also
        takes a block of rows (the XLA drivers run the batch as one).
        """
        A_bar, B_bar, C, low_rank = self._ssm_cell_system()
        ssm_dtype = jnp.real(A_bar).dtype

        p: dict = {"a": cl.split(A_bar, ssm_dtype), "B": cl.split(B_bar, ssm_dtype)}
        for r, (left, right) in enumerate(low_rank):
            p[f"L{r}"], p[f"R{r}"] = cl.split(left, ssm_dtype), cl.split(right, ssm_dtype)
        D = in_compute_dtype(self.D[...])
        for j in range(self.channels):
            p[f"C{j}"] = cl.split(C[j], ssm_dtype)
            p[f"D{j}"] = D[j]
        if self.input_linear is not None:
            p["Win"], p["Win_b"] = in_compute_dtype(self.input_linear.kernel[...]), in_compute_dtype(self.input_linear.bias[...])
        index = self._feature_blocks()
        gate = None
        if self.input_gate is not None:
            W_v, b_v = in_compute_dtype(self.input_gate.kernel[...]), in_compute_dtype(self.input_gate.bias[...])
            if self.output_gate is not None:
                gate = "full"
                W_o = in_compute_dtype(self.output_gate.kernel[...])
                for j, i in enumerate(self._channel_features()):
                    p[f"G{j}"] = W_o[i]
                p["G_b"] = in_compute_dtype(self.output_gate.bias[...])
                p["Wv0"], p["Wv0_b"] = W_v, b_v
            else:
                gate = "blocks"
                for j, i in enumerate(index):
                    p[f"Wv{j}"], p[f"Wv{j}_b"] = W_v[:, i], b_v[i]
        if self.output_linear is not None:
            W_out = in_compute_dtype(self.output_linear.kernel[...])
            p["O_b"] = in_compute_dtype(self.output_linear.bias[...])
        else:  # the flattened features are the output: a one-hot map (exact)
            W_out = jnp.eye(sum(len(i) for i in index), self.d_model, dtype=D.dtype)
        for j, i in enumerate(index):
            p[f"O{j}"] = W_out[i]
        step = functools.partial(block_step, channels=self.channels, rank=len(low_rank),
                                 has_input_linear=self.input_linear is not None, gate=gate,
                                 final_linear=self.output_linear is not None)
        return Cell(step, p, policy=self.kernel_policy, split=self._cell_split(p, gate))

    def _cell_split(self, params: dict, gate: Optional[str]) -> Optional[Split]:
        """The cell's split over the ``H'`` SSM channels (see :func:`block_step`), where :data:`split_channels`:
        the SSM's tiles and ``D{j}``, ``G{j}``, ``Win_b`` (and, with the block gate, ``Wv{j}_b``) along their first
        axis, ``Win`` (and ``Wv{j}``) along their second, and ``O{j}`` along their rows unless a full gate made one
        block of ``H * gate`` features (every program then forms it whole, and the output is not summed); without
        an input layer (``H' = H``) each program reads its slice of ``x`` (``splits_x``), and then there is no split
        with a gate, which reads the whole ``x``."""
        if not self.split_channels or self.input_linear is None and gate is not None:
            return None  # (a gate without an input layer reads the whole x besides each program's slice: unsplit)
        axes = {r"a|B|[LRCDG]\d+|Win_b": 0, r"Win": 1}
        if gate == "blocks":
            axes.update({r"Wv\d+": 1, r"Wv\d+_b": 0})
        if gate != "full":
            axes[r"O\d+"] = 0
        along = {name: axis for name in params for pattern, axis in axes.items() if re.fullmatch(pattern, name)}
        return Split(channels=self.d_inner, params=along, state={"h": 0}, splits_x=self.input_linear is None,
                     exchange=SPLIT_EXCHANGE)

    def cell_state(self, cache):
        """``{"h": Planes (B, H', state_size)}`` of ``cache["lrnn_state"]``."""
        h = cache["lrnn_state"]
        return {"h": cl.split(h, compute_dtype(jnp.real(h).dtype))}

    def cell_cache(self, state, like):
        return {"lrnn_state": cl.merge(state["h"], like["lrnn_state"].dtype)}

    def cell_inputs(self, shape, integration_timesteps=None):
        """``{}``; in training mode with active dropout, a fresh dropout mask of each block
        (``drop{j}``, ``shape + (block width,)``) from the model's rngs: with ``tie_dropout``
        one mask per row for the ``T`` tokens of a ``(B, T)`` call (a fresh one every call)."""
        if not self.dropout_active():
            return {}
        index = self._feature_blocks()
        width = sum(len(i) for i in index)
        tokens = shape[1] if len(shape) > 1 else 1
        mask = self.drop(jnp.ones((shape[0], tokens, width), self.D[...].dtype)).reshape(*shape, width)
        return {f"drop{j}": mask[..., i] for j, i in enumerate(index)}

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int = 1, dtype=None):
        """``{"lrnn_state": (batch_size, H', state_size) complex zeros}``."""
        batch_size, _ = validation.check_cache_size(batch_size, max_seqlen)
        return {"lrnn_state": jnp.zeros((batch_size, self.d_inner, self.state_size), self._state_dtype(dtype, True))}
