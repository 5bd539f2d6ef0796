"""``selective_scan``: the selective SSM (Mamba / S6) over a sequence, forward and backward, for training.

For every batch row, channel ``d`` and state ``n`` (shapes below)::

    A_bar_t, gamma_t = discretization(A, delta_t, delta_A=delta_A_t)      (D, N)
    h_t = A_bar_t * h_{t-1} + gamma_t * B_t * u_t                          h_{-1} = h0
    y_t = (sum_n h_t C_t + D * u_t) * silu(z_t)

and where ``mask_t`` is False the step leaves the state unchanged (``A_bar = 1``, input 0; the
output is still read out, as :func:`lrnnx_jax.core.scan.chunked_scan` does). Discretizations
``"mamba"``, ``"zoh"``, ``"bilinear"``, ``"dirac"`` (event mode passes ``delta_A``), all by
:func:`pallas_kernels.kernel_math.discretize`. With ``delta_softplus`` (mamba_ssm's flag) ``delta`` is the step
before its softplus, which :func:`coefficients` applies: the kernels read the projection's output and return its
gradient, so neither the step after its softplus nor its gradient before it passes through memory.

The math of one step is written once, in :func:`coefficients` and :func:`readout`. The pure-JAX
:func:`reference` (a ``lax.scan`` over time), the forward kernel and the backward kernel all call
them; the backward kernel differentiates them in its body with ``jax.vjp``, so no derivative of a
discretization is written by hand.

Three tiers:

* :func:`reference`: the oracle, token by token in XLA (its autodiff keeps every state: use it on
  small shapes, and for float64, which never reaches a kernel);
* the model's XLA path (``lrnnx_jax.models.ltv.mamba.selective_scan``, the chunked associative scan),
  the fallback of the model's forward; it computes the same math with ``lrnnx_jax.core.discretization``;
* :func:`kernel_scan`: the Pallas kernels :func:`forward_kernel` and :func:`backward_kernel`, joined
  by ``jax.custom_vjp``.

**Forward kernel.** Grid ``(batch, cdiv(D, BLOCK_D))``. A program holds its ``(BLOCK_D, N)`` state
on chip over the whole sequence: a ``fori_loop`` over loads of ``FORWARD_LOAD_STEPS`` unrolled steps (a whole
number of chunks, :func:`load_group`; :func:`pallas_kernels.scan_common.pipelined_chunks`: a load's inputs are
issued one load ahead, its stores follow its arithmetic). It writes ``y`` ``(batch, L, D)``, the final state, and
the state at the start of each chunk ``(batch, L / chunk, D, N)`` (float32): never ``(batch, L, D, N)``.

**Backward kernel.** The same grid; the chunks in reverse, ``BACKWARD_LOAD_STEPS`` steps (a whole number of
chunks) per pipelined load. For each chunk a program reloads its checkpoint (loaded one load ahead with the
chunk's inputs and ``dy``), recomputes the chunk's
``chunk + 1`` states on chip (the chunk loop is unrolled, so the states stay in registers), then runs the
adjoint recurrence ``g_{t-1} = A_bar_t g_t + dh_t`` backwards through them, as mamba_ssm's CUDA backward
does, and stores the chunk's gradients. It writes ``du``, ``ddelta``, ``ddelta_A``, ``dz``
``(batch, L, D)``; per-program partial sums of ``dB``, ``dC`` ``(blocks, batch, L, N)`` and of ``dA``,
``dD`` ``(batch, D, N)``, ``(batch, D)``, reduced outside; and ``dh0``. Memory: ``O(batch L D)`` plus
the checkpoints (``batch (L/chunk) D N``) plus the partial ``dB``/``dC`` (``blocks batch L N``).

On a GPU both kernels take their exponentials by ``ex2.approx.ftz`` (:func:`kernel_exp`), about 1e-6 relative
from ``jnp.exp`` in the steps' range; the reference and interpret mode use ``jnp.exp``.

Both kernels compute in float32 and take float32, bfloat16 or float16 sequences (``A``, ``D``, ``h0``
in any of those; the state is float32). Gradients are returned in each input's dtype. The gradient
of ``h0`` is computed (a prefill from a cache differentiates through it). ``mask`` gets a zero
gradient.

:func:`selective_scan` is the dispatch point: :func:`kernel_scan` or :func:`reference`, as
:func:`choose` (``pallas_kernels.dispatch.choose_kernel`` with :data:`POLICY`) decides. The model
asks :func:`choose` itself and keeps its chunked XLA scan as its fallback.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels import kernel_math as km
from pallas_kernels import scan_common
from pallas_kernels.scan_common import ScanPolicy

OP = "selective_scan"
DISCRETIZATIONS = ("mamba", "zoh", "bilinear", "dirac")

# Tiling, chosen on an NVIDIA H200 (jax 0.11.2, Triton lowering): B=32, L=2048, D=256, N=16, float32, each kernel
# alone, median of 20 (benchmarks/benchmark_scan_tiling.py; benchmarks/results/scan_tiling_h200.json and
# scan_tiling_chunk4_h200.json; the first sweep, before and after pipelined_chunks, in train_scan_tuning_h200.json).
#   backward (tile, warps, chunk): at chunk 4 (128, 1) 1.44 ms, (256, 2) 1.76 / 1.87 (two runs), (64, 1) 1.87,
#            (512, 4) 1.96, (256, 1) 2.08, (128, 2) 2.44, (32, 1) 2.48, (256, 4) 2.53, (512, 2) 2.60, each compiling
#            in 2-3.4 s; at chunk 8 (64, 1) 1.72 but 15 s, (128, 2) 2.50 (the previous default, 15 s), (256, 2)
#            2.82, (32, 1) 2.64, (128, 1) 3.00, (64, 2) 3.80, (128, 4) 4.63, each compiling in 13-17 s;
#   forward  (tile, warps, chunk, steps per load): (256, 2, 4, 8) 0.74 ms, (512, 4, 4, 8) 0.73, (256, 2, 4, 16)
#            0.73 (compiles in 11 s against 2.6), (256, 2, 4, 4) 0.82; with 8-step chunks (256, 2, 8, 8) 0.61,
#            (512, 4, 8, 8) 0.65, (128, 1, 8, 8) 0.65, (128, 2, 8, 8) 0.81, (256, 1, 8, 8) 1.12, (512, 2, 8, 8) 1.24.
# The checkpoint interval ``chunk`` is the backward's unrolled chunk: 4, the fastest backward and the shortest
# compile (a Mamba training step compiled in 4.5 s, against 11-13 s at chunk 8); the forward loads two chunks at a
# time (``load_group``), its fastest setting at that interval. The backward loads one: (128, 1, 4) loading 4 steps
# 1.40 ms, loading 8 2.08 ms and 12.7 s to compile (scan_tiling_bwd_loads_h200.json; the Mamba training step took
# 3.64 ms with it, training_mamba_backward_load8_h200.json).
# Full tiles (D a multiple of the tile's channels, N a power of two) run without masks, and the input's product takes
# gamma * u first (:func:`coefficients`): in Mamba's training step (profile_training, device time, two runs each) the
# forward kernel took 0.439 ms against 0.483 before, the backward 1.074-1.076 against 1.064-1.066
# (benchmarks/results/scan_unmasked_h200/).

#: steps per chunk of the kernels: the forward checkpoints the state every ``chunk`` steps and the
#: backward keeps ``chunk + 1`` states in registers
DEFAULT_CHUNK = 4
#: steps per pipelined load of the forward and of the backward kernel (a whole number of chunks; at least one chunk)
FORWARD_LOAD_STEPS = 8
BACKWARD_LOAD_STEPS = 4
#: state elements (``BLOCK_D * BLOCK_N``) per program of the forward and of the backward kernel (the backward
#: holds ``chunk + 1`` such tiles), and warps per program (``KernelConfig.num_warps`` overrides both)
FORWARD_TILE, FORWARD_WARPS = 256, 2
BACKWARD_TILE, BACKWARD_WARPS = 128, 1
#: the largest padded state size the kernels take
MAX_BLOCK_N = 256


#: measured faster: ``"auto"`` takes the kernels on an NVIDIA GPU
POLICY = ScanPolicy(
    auto=True,
    evidence="NVIDIA H200, jax 0.11.2: Mamba(d_model=128, d_state=16) forward + backward at B=32, float32 "
             "(benchmarks/benchmark_training.py): 27.9 ms on the XLA path, 2.91 ms on the kernels at L=2048 (2.78-3.20 "
             "over ten later runs, each on a fresh allocation of the device) "
             "(training_point3_h200.json, training_mamba_point2_h200.json); 14.1 / 1.92 at L=1024, 7.55 / 1.02 at "
             "512, 3.88 / 1.05 at 256; 0.65-2.61 / 0.30-0.79 at L=8-128 (training_seq_sweep_h200.json); at L=2048, "
             "H=16, 32, 64, 256 (B=32) 3.89 / 1.54, 5.94 / 1.72, 11.8 / 2.00, 44.7 / 5.25; B=8, 16, 64, 128 (H=128) "
             "12.7 / 1.61, 16.1 / 1.99, 59.0 / 5.45, 102 / 9.89; d_model 1024, B=8, L=4096 103 / 12.5 "
             "(training_sweeps_mamba_rglru_h200.json, training_batch_mamba_h200.json, training_batch_rest_h200.json); "
             "with the exponentials on ex2.approx.ftz (kernel_exp) 2.83 and 2.85 ms at L=2048 "
             "(hardware_exp_h200/landed/)",
)


# ----------------------------------------------------------------------------- the step, once
def coefficients(discretization: str, A, delta, delta_A, B_t, u_t, m=None, delta_softplus: bool = False,
                 exp=jnp.exp):
    """``(A_bar, x)`` of ``h_t = A_bar h_{t-1} + x`` for one step, any leading axes ``(...)``.

    ``A`` ``(D, N)`` (or a tile), ``delta``, ``delta_A`` (None: ``delta``), ``u_t`` ``(..., D)``, ``B_t``
    ``(..., N)``, ``m`` None or a boolean ``(...)``: where False, ``A_bar = 1`` and ``x = 0``. With
    ``delta_softplus``, ``delta`` is the step before its softplus, applied here. ``exp``: the exponential
    (``jnp.exp``; the kernels on a GPU pass :func:`kernel_exp`'s).
    """
    if delta_softplus:
        delta = km.softplus(delta, exp)
    step_A = None if delta_A is None else delta_A[..., None]
    A_bar, gamma = km.discretize(discretization, A, delta[..., None], step_A, exp=exp)
    # gamma * u first: (..., D, 1) for "mamba" and "dirac", D multiplies instead of D x N, and the gradients of
    # delta and u share one sum over the states of g * B
    x = (gamma * u_t[..., None]) * B_t[..., None, :]
    A_bar = jnp.broadcast_to(A_bar, x.shape)
    if m is not None:
        on = m[..., None, None]
        A_bar = jnp.where(on, A_bar, 1.0)
        x = jnp.where(on, x, 0.0)
    return A_bar, x


def readout(h, C_t, u_t, D=None, z_t=None, exp=jnp.exp):
    """``y_t = (sum_n h_t C_t + D u_t) * silu(z_t)``: ``h (..., D, N)`` -> ``(..., D)`` (``exp``: the exponential of
    ``silu``, as :func:`coefficients`)."""
    y = jnp.sum(h * C_t[..., None, :], axis=-1)
    if D is not None:
        y = y + D * u_t
    if z_t is not None:
        y = y * km.silu(z_t, exp)
    return y


# ----------------------------------------------------------------------------- the reference
def reference(u, delta, A, B, C, D=None, z=None, delta_A=None, mask=None, h0=None, *, discretization="mamba",
              delta_softplus: bool = False):
    """The oracle: a ``lax.scan`` over time of :func:`coefficients` and :func:`readout`.

    Computes in float32 (float64 for float64 inputs). Returns ``(y (batch, L, D)`` in ``u.dtype``,
    ``h_last (batch, D, N)`` float32 or float64``)``. Differentiable; its gradients keep every state
    (``batch L D N``), so it is the oracle for small shapes, not a training path.
    """
    f = jnp.promote_types(jnp.result_type(u, delta, A), jnp.float32)
    batch, _, dim = u.shape
    N = A.shape[-1]
    h = jnp.zeros((batch, dim, N), f) if h0 is None else h0.astype(f)
    cast = lambda a: None if a is None else jnp.moveaxis(a.astype(f), 1, 0)  # noqa: E731  (time major)
    xs = dict(u=cast(u), delta=cast(delta), B=cast(B), C=cast(C), z=cast(z), delta_A=cast(delta_A),
              m=None if mask is None else jnp.moveaxis(mask.astype(bool), 1, 0))
    Af, Df = A.astype(f), None if D is None else D.astype(f)

    def step(h, s):
        a, x = coefficients(discretization, Af, s["delta"], s["delta_A"], s["B"], s["u"], s["m"], delta_softplus)
        h = a * h + x
        return h, readout(h, s["C"], s["u"], Df, s["z"])

    h, ys = jax.lax.scan(step, h, xs)
    return jnp.moveaxis(ys, 0, 1).astype(u.dtype), h


# ----------------------------------------------------------------------------- the kernels
def kernel_exp(config: dispatch.KernelConfig):
    """The exponential of the kernels' steps: :func:`pallas_kernels.kernel_math.hardware_exp` (``ex2.approx.ftz``) on a
    GPU, ``jnp.exp`` in interpret mode (which cannot run inline assembly). Measured on an H200 in Mamba's training
    step (B=32, L=2048, D=256, N=16, float32; benchmarks/results/hardware_exp_h200/): forward kernel 0.415-0.417 ms
    against 0.438 with libdevice's ``expf``, backward 1.021-1.028 against 1.076; ``jnp.exp2`` (non-``ftz``) instead
    made the backward slower, 1.155 (fast_exp_h200/)."""
    return jnp.exp if dispatch.interpret_mode(config) else km.hardware_exp


def load_group(chunk: int, load_steps: int) -> int:
    """Chunks per pipelined load of a kernel that loads ``load_steps`` steps at a time (at least one chunk)."""
    return max(1, load_steps // chunk)


def padded_length(length: int, chunk: int) -> int:
    """The length the kernels run: ``length`` rounded up to a whole number of both kernels' loads."""
    multiple = chunk * math.lcm(load_group(chunk, FORWARD_LOAD_STEPS), load_group(chunk, BACKWARD_LOAD_STEPS))
    return -(-length // multiple) * multiple


def _check_loads(kernel: str, length: int, chunk: int, group: int):
    if length % (chunk * group):
        raise ValueError(f"the {kernel} kernel takes L a multiple of {chunk * group} (chunk={chunk} times {group} "
                         f"chunks per load), got L={length}")


def _blocks(dim: int, N: int, tile: int):
    block_n = dispatch.next_power_of_two(N)
    block_d = min(dispatch.next_power_of_two(dim), max(1, tile // block_n))
    return block_d, block_n


def _setup(u, A, chunk, tile, inputs: dict):
    """What both kernels start with: ``(batch, length, dim, N, num_chunks, block_d, block_n)`` and the inputs that
    are present (``inputs`` in the kernel's argument order, the optional ones None when absent) as ``(names, arrays)``."""
    batch, length, dim = u.shape
    N = A.shape[-1]
    present = {k: v for k, v in inputs.items() if v is not None}
    return (batch, length, dim, N, length // chunk, *_blocks(dim, N, tile)), list(present), list(present.values())


def _load(plgpu, view, ok, other=0.0):
    """``view`` loaded, lanes where ``ok`` is False reading ``other`` (``ok`` None: every lane is in bounds)."""
    return plgpu.load(view) if ok is None else plgpu.load(view, mask=ok, other=other)


def _inside(ok, value):
    """``value``, zero where ``ok`` is False (the padded lanes; ``ok`` None: there are none)."""
    return value if ok is None else jnp.where(ok, value, 0.0)


def _program(pl, plgpu, ref, dim, N, block_d, block_n):
    """The program's indices, masks and loaders, shared by both kernels."""
    b, blk = pl.program_id(0), pl.program_id(1)
    if dim % block_d == 0 and N == block_n:  # no lane out of bounds: no masks (each costs a select per element)
        d_ok = n_ok = tile_ok = None
    else:
        d_ok = blk * block_d + jnp.arange(block_d) < dim
        n_ok = jnp.arange(block_n) < N
        tile_ok = d_ok[:, None] & n_ok[None, :]
    rows, cols = pl.ds(blk * block_d, block_d), pl.ds(0, block_n)
    f32 = jnp.float32

    def along_d(name, *lead):  # (BLOCK_D,) channels
        return _load(plgpu, ref[name].at[(*lead, rows)], d_ok).astype(f32)

    def along_n(name, *lead):  # (BLOCK_N,) states
        return _load(plgpu, ref[name].at[(*lead, cols)], n_ok).astype(f32)

    def step_inputs(t):
        """The per-step inputs of row ``b`` at time ``t``, float32."""
        s = dict(u=along_d("u", b, t), delta=along_d("delta", b, t), B=along_n("B", b, t), C=along_n("C", b, t))
        s["z"] = along_d("z", b, t) if "z" in ref else None
        s["delta_A"] = along_d("delta_A", b, t) if "delta_A" in ref else None
        s["m"] = ref["mask"][b, t] > 0 if "mask" in ref else None
        return s

    # padded lanes of A: -1, a finite nonzero value (zoh divides by A); their states stay 0
    A_tile = _load(plgpu, ref["A"].at[rows, cols], tile_ok, other=-1.0).astype(f32)
    D_vec = along_d("D") if "D" in ref else None
    return b, blk, d_ok, n_ok, tile_ok, rows, cols, A_tile, D_vec, step_inputs


def forward_kernel(u, delta, A, B, C, D=None, z=None, delta_A=None, mask=None, h0=None, *, discretization="mamba",
                   chunk: int = DEFAULT_CHUNK, config: Optional[dispatch.KernelConfig] = None,
                   delta_softplus: bool = False):
    """The forward kernel; ``L`` must be a whole number of its loads (:func:`padded_length`; :func:`kernel_scan` pads).

    Arguments as :func:`selective_scan` (``mask`` float32 1/0; ``h0`` required). Returns ``(y (batch, L, D)``
    ``u.dtype``, ``h_last (batch, D, N)`` float32, ``checkpoints (batch, L / chunk, D, N)`` float32: the state
    before each chunk``)``.
    """
    config = dispatch.resolve(config)
    pl, plgpu = dispatch.pallas_modules()
    (batch, length, dim, N, num_chunks, block_d, block_n), names, arrays = _setup(
        u, A, chunk, FORWARD_TILE, dict(u=u, delta=delta, A=A, B=B, C=C, h0=h0, D=D, z=z, delta_A=delta_A, mask=mask))
    group = load_group(chunk, FORWARD_LOAD_STEPS)
    _check_loads("forward", length, chunk, group)
    steps = chunk * group  # per pipelined load
    f32 = jnp.float32
    exp = kernel_exp(config)

    def body(*refs):
        ref = dict(zip(names, refs))
        y_ref, last_ref, ckpt_ref = refs[len(names):]
        b, _, d_ok, _, tile_ok, rows, cols, A_tile, D_vec, step_inputs = _program(
            pl, plgpu, ref, dim, N, block_d, block_n)
        h = _load(plgpu, ref["h0"].at[b, rows, cols], tile_ok).astype(f32)

        def load(k):
            return [step_inputs(k * steps + i) for i in range(steps)]

        def one_load(k, inputs, h):
            ys, checkpoints = [], []
            for i, s in enumerate(inputs):  # unrolled
                if i % chunk == 0:
                    checkpoints.append(h)
                a, x = coefficients(discretization, A_tile, s["delta"], s["delta_A"], s["B"], s["u"], s["m"],
                                    delta_softplus, exp)
                h = _inside(tile_ok, a * h + x)
                ys.append(readout(h, s["C"], s["u"], D_vec, s["z"], exp))
            for j, checkpoint in enumerate(checkpoints):
                plgpu.store(ckpt_ref.at[b, k * group + j, rows, cols], checkpoint, mask=tile_ok)
            for i, y in enumerate(ys):
                plgpu.store(y_ref.at[b, k * steps + i, rows], y.astype(y_ref.dtype), mask=d_ok)
            return h

        h = scan_common.pipelined_chunks(num_chunks // group, load, one_load, h)
        plgpu.store(last_ref.at[b, rows, cols], h, mask=tile_ok)

    out_shape = (jax.ShapeDtypeStruct((batch, length, dim), u.dtype), jax.ShapeDtypeStruct((batch, dim, N), f32),
                 jax.ShapeDtypeStruct((batch, num_chunks, dim, N), f32))
    call = scan_common.pallas_call(body, out_shape, (batch, pl.cdiv(dim, block_d)), config, OP + "_fwd", FORWARD_WARPS)
    return call(*arrays)


def backward_kernel(u, delta, A, B, C, D, z, delta_A, mask, checkpoints, dy, dh_last, *, discretization="mamba",
                    chunk: int = DEFAULT_CHUNK, config: Optional[dispatch.KernelConfig] = None,
                    delta_softplus: bool = False):
    """The backward kernel: the gradients from the cotangents ``dy (batch, L, D)`` and ``dh_last (batch, D, N)``.

    ``L`` a whole number of its loads (:func:`padded_length`); ``checkpoints`` from :func:`forward_kernel`. Returns a
    dict: ``du``,
    ``ddelta`` (and ``dz``, ``ddelta_A`` when given) ``(batch, L, D)`` in their inputs' dtypes; the float32
    partial sums ``dB``, ``dC`` ``(blocks, batch, L, N)``, ``dA`` ``(batch, D, N)``, ``dD`` ``(batch, D)`` (when
    ``D`` is given); and ``dh0`` ``(batch, D, N)`` float32. :func:`kernel_scan` reduces the partial sums.
    """
    config = dispatch.resolve(config)
    pl, plgpu = dispatch.pallas_modules()
    (batch, length, dim, N, num_chunks, block_d, block_n), names, arrays = _setup(
        u, A, chunk, BACKWARD_TILE, dict(u=u, delta=delta, A=A, B=B, C=C, ckpt=checkpoints, dy=dy, dh_last=dh_last,
                                         D=D, z=z, delta_A=delta_A, mask=mask))
    group = load_group(chunk, BACKWARD_LOAD_STEPS)
    _check_loads("backward", length, chunk, group)
    blocks = pl.cdiv(dim, block_d)
    f32 = jnp.float32
    exp = kernel_exp(config)
    seq = lambda a: jax.ShapeDtypeStruct((batch, length, dim), a.dtype)  # noqa: E731
    outs = {"du": seq(u), "ddelta": seq(delta)}
    if z is not None:
        outs["dz"] = seq(z)
    if delta_A is not None:
        outs["ddelta_A"] = seq(delta_A)
    outs["dB"] = outs["dC"] = jax.ShapeDtypeStruct((blocks, batch, length, N), f32)
    outs["dA"] = outs["dh0"] = jax.ShapeDtypeStruct((batch, dim, N), f32)
    if D is not None:
        outs["dD"] = jax.ShapeDtypeStruct((batch, dim), f32)
    out_names = list(outs)

    def body(*refs):
        ref = dict(zip(names, refs))
        out = dict(zip(out_names, refs[len(names):]))
        b, blk, d_ok, n_ok, tile_ok, rows, cols, A_tile, D_vec, step_inputs = _program(
            pl, plgpu, ref, dim, N, block_d, block_n)
        g = _load(plgpu, ref["dh_last"].at[b, rows, cols], tile_ok).astype(f32)
        dA = jnp.zeros((block_d, block_n), f32)
        dD = jnp.zeros((block_d,), f32)

        def step_grads(h_prev, h, s, dy_t, g):
            """One step backwards (``h = h_t``): ``g`` is the adjoint of ``h_t`` from the later steps."""
            coef_in = {k: v for k, v in (("A", A_tile), ("delta", s["delta"]), ("delta_A", s["delta_A"]),
                                          ("B", s["B"]), ("u", s["u"])) if v is not None}
            (a, _), coef_vjp = jax.vjp(
                lambda p: coefficients(discretization, p["A"], p["delta"], p.get("delta_A"), p["B"], p["u"], s["m"],
                                       delta_softplus, exp),
                coef_in)
            read_in = {k: v for k, v in (("h", h), ("C", s["C"]), ("u", s["u"]), ("D", D_vec), ("z", s["z"]))
                       if v is not None}
            _, read_vjp = jax.vjp(lambda p: readout(p["h"], p["C"], p["u"], p.get("D"), p.get("z"), exp), read_in)
            (dread,) = read_vjp(dy_t)
            g = _inside(tile_ok, g + dread["h"])  # the adjoint of h_t
            (dcoef,) = coef_vjp((g * h_prev, g))
            return dread, dcoef, _inside(tile_ok, a * g)  # the adjoint of h_{t-1}

        def load_chunk(c):
            """Chunk ``c``'s checkpoint, per-step inputs and output cotangents."""
            steps = [c * chunk + i for i in range(chunk)]
            return (_load(plgpu, ref["ckpt"].at[b, c, rows, cols], tile_ok),
                    [step_inputs(t) for t in steps],
                    [_load(plgpu, ref["dy"].at[b, t, rows], d_ok).astype(f32) for t in steps])

        def load(k):  # the ``group`` chunks of load ``k``
            return [load_chunk(k * group + j) for j in range(group)]

        def one_chunk(c, chunk_inputs, carry):
            g, dA, dD = carry
            h, inputs, dys = chunk_inputs
            states = [h]
            for s in inputs:  # unrolled: the chunk's states stay in registers
                a, x = coefficients(discretization, A_tile, s["delta"], s["delta_A"], s["B"], s["u"], s["m"],
                                    delta_softplus, exp)
                h = _inside(tile_ok, a * h + x)
                states.append(h)
            grads = [None] * chunk
            for i in reversed(range(chunk)):
                dread, dcoef, g = step_grads(states[i], states[i + 1], inputs[i], dys[i], g)
                along_d = {"du": dread["u"] + dcoef["u"], "ddelta": dcoef["delta"], "dz": dread.get("z"),
                           "ddelta_A": dcoef.get("delta_A")}
                grads[i] = ({name: value for name, value in along_d.items() if name in out}, dcoef["B"], dread["C"])
                dA = dA + dcoef["A"]
                if "D" in dread:
                    dD = dD + dread["D"]
            for i, (along_d, dB, dC) in enumerate(grads):  # the stores after the chunk's arithmetic
                t = c * chunk + i
                for name, value in along_d.items():
                    plgpu.store(out[name].at[b, t, rows], value.astype(out[name].dtype), mask=d_ok)
                plgpu.store(out["dB"].at[blk, b, t, cols], dB, mask=n_ok)
                plgpu.store(out["dC"].at[blk, b, t, cols], dC, mask=n_ok)
            return g, dA, dD

        def one_load(k, loaded, carry):
            for j in reversed(range(group)):  # the later chunk first
                carry = one_chunk(k * group + j, loaded[j], carry)
            return carry

        g, dA, dD = scan_common.pipelined_chunks(num_chunks // group, load, one_load, (g, dA, dD), reverse=True)
        plgpu.store(out["dh0"].at[b, rows, cols], g, mask=tile_ok)
        plgpu.store(out["dA"].at[b, rows, cols], dA, mask=tile_ok)
        if "dD" in out:
            plgpu.store(out["dD"].at[b, rows], dD, mask=d_ok)

    call = scan_common.pallas_call(body, tuple(outs.values()), (batch, blocks), config, OP + "_bwd", BACKWARD_WARPS)
    return dict(zip(out_names, call(*arrays)))


# ----------------------------------------------------------------------------- custom_vjp
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(static, u, delta, A, B, C, D, z, delta_A, mask, h0):
    return _scan_fwd(static, u, delta, A, B, C, D, z, delta_A, mask, h0)[0]


def _scan_fwd(static, u, delta, A, B, C, D, z, delta_A, mask, h0):
    discretization, chunk, config, delta_softplus = static
    length = u.shape[1]
    pad = padded_length(length, chunk) - length  # kernel_scan passes a mask when pad > 0
    seqs = [scan_common.pad_time(a, pad) for a in (u, delta, B, C, z, delta_A, mask)]
    pu, pdelta, pB, pC, pz, pdelta_A, pmask = seqs
    y, h_last, checkpoints = forward_kernel(pu, pdelta, A, pB, pC, D, pz, pdelta_A, pmask, h0,
                                            discretization=discretization, chunk=chunk, config=config,
                                            delta_softplus=delta_softplus)
    residuals = (pu, pdelta, A, pB, pC, D, pz, pdelta_A, pmask, h0, checkpoints)
    return (y[:, :length], h_last), residuals


def _scan_bwd(static, residuals, cotangents):
    discretization, chunk, config, delta_softplus = static
    u, delta, A, B, C, D, z, delta_A, mask, h0, checkpoints = residuals
    dy, dh_last = cotangents
    length = dy.shape[1]
    dy = scan_common.pad_time(dy, u.shape[1] - length)
    grads = backward_kernel(u, delta, A, B, C, D, z, delta_A, mask, checkpoints, dy, dh_last.astype(jnp.float32),
                            discretization=discretization, chunk=chunk, config=config, delta_softplus=delta_softplus)
    cut = lambda a, like: a[:, :length].astype(like.dtype)  # noqa: E731
    return (
        cut(grads["du"], u), cut(grads["ddelta"], delta), jnp.sum(grads["dA"], 0).astype(A.dtype),
        cut(jnp.sum(grads["dB"], 0), B), cut(jnp.sum(grads["dC"], 0), C),
        None if D is None else jnp.sum(grads["dD"], 0).astype(D.dtype),
        None if z is None else cut(grads["dz"], z),
        None if delta_A is None else cut(grads["ddelta_A"], delta_A),
        None if mask is None else jnp.zeros(mask.shape[:1] + (length,), mask.dtype),
        grads["dh0"].astype(h0.dtype),
    )


_scan.defvjp(_scan_fwd, _scan_bwd)


def kernel_scan(u, delta, A, B, C, D=None, z=None, delta_A=None, mask=None, h0=None, *, discretization="mamba",
                chunk: int = DEFAULT_CHUNK, config: Optional[dispatch.KernelConfig] = None,
                delta_softplus: bool = False):
    """The kernel pair under ``jax.custom_vjp``; same contract as :func:`selective_scan` (no dispatch).

    Under a data-parallel mesh the pair runs per shard (:func:`pallas_kernels.dispatch.per_shard`; the gradients of
    ``A`` and ``D`` are summed over the devices).

    ``L`` need not be a multiple of ``chunk``: the sequences are padded with masked steps (a copy).
    """
    config = dispatch.resolve(config)
    batch, _, dim = u.shape
    if h0 is None:
        h0 = jnp.zeros((batch, dim, A.shape[-1]), jnp.float32)
    if mask is None and padded_length(u.shape[1], chunk) != u.shape[1]:
        mask = jnp.ones(u.shape[:2], jnp.float32)  # the padded steps are masked
    if mask is not None:
        mask = mask.astype(jnp.float32)
    scan = functools.partial(_scan, (discretization, int(chunk), config, bool(delta_softplus)))
    args = (u, delta, A, B, C, D, z, delta_A, mask, h0)
    return dispatch.per_shard(scan, args, (0, 0, None, 0, 0, None, 0, 0, 0, 0), 0)  # forward and backward


# ----------------------------------------------------------------------------- dispatch
def unsupported_reason(u, delta, A, B, C, D=None, z=None, delta_A=None, h0=None, chunk: int = DEFAULT_CHUNK) -> Optional[str]:
    """Why the kernels cannot take these arguments, or None."""
    reason = scan_common.unsupported_dtype(dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_A=delta_A, h0=h0))
    if reason is not None:
        return reason
    batch, length, dim = u.shape
    N = A.shape[-1]
    if dispatch.next_power_of_two(N) > MAX_BLOCK_N:
        return f"d_state={N} > {MAX_BLOCK_N}"
    padded = padded_length(length, chunk)
    blocks = -(-dim // _blocks(dim, N, BACKWARD_TILE)[0])
    return scan_common.unsupported_size(batch * padded * dim, batch * (padded // chunk) * dim * N,
                                        blocks * batch * padded * N)


def choose(u, delta, A, B, C, D=None, z=None, delta_A=None, h0=None, *, chunk: int = DEFAULT_CHUNK,
           config: Optional[dispatch.KernelConfig] = None, policy: ScanPolicy = POLICY) -> bool:
    """Whether :func:`selective_scan` (and the model's forward) runs the kernels for these arguments under ``config``."""
    reason = unsupported_reason(u, delta, A, B, C, D, z, delta_A, h0, chunk)
    return dispatch.choose_kernel(OP, reason, dispatch.resolve(config), policy.slower_reason(), batch=u.shape[0])


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_A=None, mask=None, h0=None, *,
                   discretization: str = "mamba", chunk: int = DEFAULT_CHUNK,
                   config: Optional[dispatch.KernelConfig] = None, delta_softplus: bool = False):
    """The selective SSM over a sequence: the Pallas kernels (:func:`kernel_scan`) or :func:`reference`.

    Args:
      u, delta: ``(batch, L, D)``: the input and the step (after softplus; before it with ``delta_softplus``).
      A: ``(D, N)`` real (negative). B, C: ``(batch, L, N)``.
      D: optional ``(D,)`` skip. z: optional gate ``(batch, L, D)``: the output is multiplied by ``silu(z)``.
      delta_A: optional A-step of event mode ``(batch, L, D)``.
      mask: optional ``(batch, L)`` bool: where False the state is frozen.
      h0: optional ``(batch, D, N)`` initial state (zeros when None); differentiable.
      discretization: one of :data:`DISCRETIZATIONS`.
      chunk: steps per checkpoint of the kernels (see the module docstring).
      config: a :class:`~pallas_kernels.dispatch.KernelConfig`; the default when None. ``"auto"`` keeps the
        reference until :data:`POLICY` says the kernels were measured faster.
      delta_softplus: ``delta`` is the step before its softplus (mamba_ssm's flag), which the kernels apply as they
        load it: the step is never written to memory after its softplus, nor its gradient before it.

    Returns:
      ``(y (batch, L, D)`` in ``u.dtype``, ``h_last (batch, D, N)`` float32 (float64 on the reference for float64
      inputs)``)``.
    """
    _check(u, delta, A, B, C, D, z, delta_A, mask, h0, discretization, chunk)
    config = dispatch.resolve(config)
    if choose(u, delta, A, B, C, D, z, delta_A, h0, chunk=chunk, config=config):
        return kernel_scan(u, delta, A, B, C, D, z, delta_A, mask, h0, discretization=discretization, chunk=chunk,
                           config=config, delta_softplus=delta_softplus)
    return reference(u, delta, A, B, C, D, z, delta_A, mask, h0, discretization=discretization,
                     delta_softplus=delta_softplus)


def _check(u, delta, A, B, C, D, z, delta_A, mask, h0, discretization, chunk):
    if discretization not in DISCRETIZATIONS:
        raise ValueError(f"discretization must be one of {DISCRETIZATIONS}, got {discretization!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    if u.ndim != 3 or A.ndim != 2:
        raise ValueError(f"u must be (batch, L, D) and A (D, N), got {u.shape} and {A.shape}")
    batch, length, dim = u.shape
    N = A.shape[1]
    shapes = {"delta": (batch, length, dim), "z": (batch, length, dim), "delta_A": (batch, length, dim),
              "A": (dim, N), "B": (batch, length, N), "C": (batch, length, N), "D": (dim,), "mask": (batch, length),
              "h0": (batch, dim, N)}
    for name, a in (("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("delta_A", delta_A),
                    ("mask", mask), ("h0", h0)):
        if a is not None and tuple(a.shape) != shapes[name]:
            raise ValueError(f"{name} must have shape {shapes[name]}, got {tuple(a.shape)}")
    for name, a in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("delta_A", delta_A), ("h0", h0)):
        if a is not None and not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"{name} must have a real floating dtype, got {a.dtype}")
