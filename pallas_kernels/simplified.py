"""``simplified_state_update``: one step of a diagonal complex SSM (S5, LRU, S4D, Centaurus).

With the discretization fused in, for every batch row ``b``::

    A_bar, gamma = discretization(A, delta, integration_timesteps[b])
    state   = A_bar * state + gamma * (B x[b])                 state (P,) complex
    out[b]  = kappa * Re(C state) + D * x[b]                  kappa = 2 with conj_sym, else 1

``discretization`` is ``"zoh"``, ``"bilinear"``, ``"dirac"``, ``"mamba"``, ``"async"`` (event
ZOH) or ``"no_discretization"`` (``A`` and ``B`` are already ``A_bar`` and ``B_bar``).
Event mode scales the A-step of row ``b`` by ``integration_timesteps[b]``. The kernel and
the reference both discretize with :func:`pallas_kernels.kernel_math.discretize` (tested
against ``lrnnx_jax.core.discretization``).

This is a standalone array-level op for users' own decode loops; the models' steps do
not call it: they run their cells (:mod:`pallas_kernels.cells`).

Complex arrays live as :class:`~pallas_kernels.complex_lib.Planes` inside the
kernel. The state may be passed as a complex array (converted at the boundary)
or as ``Planes``, which the kernel updates in place (``input_output_aliases``;
donate them under ``jax.jit``).

:func:`simplified_state_update` is the one dispatch point between :func:`kernel`
(Pallas) and :func:`reference` (pure JAX, complex arithmetic).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels import complex_lib as cl
from pallas_kernels import dispatch
from pallas_kernels import kernel_math as km

OP = "simplified_state_update"
DISCRETIZATIONS = ("zoh", "bilinear", "dirac", "mamba", "async", "no_discretization")
#: state and feature sizes are processed in chunks of at most this many lanes
CHUNK = 64
#: largest number of (state chunk, feature chunk) pairs one program unrolls
MAX_CHUNK_PAIRS = 16
#: by default one row per program up to this batch, blocks of rows above (:func:`rows_per_program`)
ROW_PATH_MAX_BATCH = 256


def _discrete(A, B, delta, integration_timesteps, discretization):
    """``(A_bar, B_bar)`` by :func:`pallas_kernels.kernel_math.discretize` (on complex arrays);
    ``A_bar`` is ``(P,)``, or ``(batch, P)`` in event mode or for a per-row ``A``."""
    if discretization == "no_discretization":
        return A, B
    delta_A = None if integration_timesteps is None else delta * integration_timesteps[:, None]
    A_bar, gamma = km.discretize(discretization, A, delta, delta_A)
    return A_bar, jnp.broadcast_to(gamma, delta.shape)[:, None] * B


def reference(state, x, A, B, C, delta=None, D=None, *, integration_timesteps=None, discretization="zoh",
              conj_sym=False, state_batch_indices=None, pad_slot_id=-1):
    """Pure-JAX step; same contract as :func:`simplified_state_update`.

    Computes in complex64 (complex128 for float64 inputs), contractions at ``HIGHEST``."""
    planes = cl.is_planes(state)
    h_all = cl.merge(state) if planes else state
    real = jnp.promote_types(jnp.result_type(x, jnp.real(h_all)), jnp.float32)
    ctype = jnp.result_type(real, jnp.complex64)
    h_all = h_all.astype(ctype)
    slot, valid = dispatch.slots(state_batch_indices, pad_slot_id)
    A_bar, B_bar = _discrete(
        A.astype(ctype), B.astype(ctype), None if delta is None else delta.astype(real),
        None if integration_timesteps is None else integration_timesteps.astype(real), discretization,
    )
    kappa = 2.0 if conj_sym else 1.0
    xf = x.astype(real)
    h = A_bar * h_all[slot] + jnp.einsum("bi,pi->bp", xf.astype(ctype), B_bar, precision="highest")
    y = jnp.real(jnp.einsum("bp,op->bo", h, kappa * C.astype(ctype), precision="highest"))
    if D is not None:
        y = y + D.astype(real) * xf
    if state_batch_indices is None:
        new_state = cl.split(h, state.dtype) if planes else h.astype(state.dtype)
        return y.astype(x.dtype), new_state
    y = jnp.where(valid[:, None], y, 0)
    if planes:
        new_state = cl.Planes(*(dispatch.write_slots(s, n, slot, valid) for s, n in zip(state, cl.split(h, state.dtype))))
    else:
        new_state = dispatch.write_slots(state, h, slot, valid)
    return y.astype(x.dtype), new_state


def rows_per_program(batch: int, config: dispatch.KernelConfig) -> int:
    """``config.block_batch``, or by default 1 up to ``ROW_PATH_MAX_BATCH`` rows, then 16.

    Measured on an H100 (P=64, H=128; BENCHMARKS.md §3): one row per program is 1.2-1.9x faster than
    XLA up to batch 256 and 2x slower at 4096, where blocks of 16 rows are 1.35x faster than XLA.
    """
    return config.block_batch or (1 if batch <= ROW_PATH_MAX_BATCH else 16)


def kernel(state: cl.Planes, x, A, B, C, delta=None, D=None, *, integration_timesteps=None, discretization="zoh",
           conj_sym=False, state_batch_indices=None, pad_slot_id=-1, config: Optional[dispatch.KernelConfig] = None):
    """The Pallas kernel; ``state`` must be ``Planes``. Same contract as :func:`reference`.

    Grid ``(cdiv(batch, BLOCK_B),)``: each program takes ``BLOCK_B`` rows, computes
    ``B x`` and ``C state`` over chunks of :data:`CHUNK` lanes, and writes its state rows
    back in place. One row per program (``BLOCK_B = 1``, the default up to
    ``ROW_PATH_MAX_BATCH`` rows) and blocks of 2-8 rows use float32 multiply-adds; blocks of 16 rows or more use
    tensor-core dots at :func:`pallas_kernels.dispatch.dot_precision` (``config.precision``:
    3-pass TF32 by default, float32 accuracy, ~2e-7 relative on an H100 and 4-15x faster there
    than IEEE float32 FMA dots; ``HIGHEST`` in interpret mode).
    """
    config = dispatch.resolve(config)
    pl, plgpu = dispatch.pallas_modules()
    slots, P = state.shape
    batch, H_in = x.shape
    H_out = C.shape[0]
    block_b = rows_per_program(batch, config)
    chunk_p = min(dispatch.next_power_of_two(max(P, 16)), CHUNK)
    chunk_h = min(dispatch.next_power_of_two(max(H_in, H_out, 16)), CHUNK)
    n_p, n_in, n_out = pl.cdiv(P, chunk_p), pl.cdiv(H_in, chunk_h), pl.cdiv(H_out, chunk_h)
    A_planes = cl.split(A)
    B_planes = cl.split(B)
    C_planes = cl.split(C)
    inputs = {"state_re": state.re, "state_im": state.im, "x": x, "A_re": A_planes.re, "A_im": A_planes.im,
              "B_re": B_planes.re, "C_re": C_planes.re}
    if jnp.iscomplexobj(B):
        inputs["B_im"] = B_planes.im
    if jnp.iscomplexobj(C):
        inputs["C_im"] = C_planes.im
    optional = {"delta": delta, "D": D, "tau": integration_timesteps, "slots": state_batch_indices}
    inputs.update({k: v for k, v in optional.items() if v is not None})
    if state_batch_indices is not None:
        inputs["slots"] = state_batch_indices.astype(jnp.int32)
    names = list(inputs)
    row_wise_A = A.ndim == 2
    kappa = 2.0 if conj_sym else 1.0
    f32 = jnp.float32
    precision = dispatch.block_precision(config, block_b)

    def dot(a, b):  # a (m, k) . b (n, k) -> (m, n), float32 accumulation
        if block_b == 1:  # one row: float32 multiply-adds and a reduction (no tensor-core tile of one row)
            return jnp.sum(b * a, axis=1)[None, :]
        return km.contract(a, b, 1, precision)  # a block: a dot, or multiply-adds below DOT_MIN_ROWS

    def body(*refs):
        ref = dict(zip(names, refs))
        out_ref, new_re_ref, new_im_ref = refs[len(names):]
        row0 = pl.program_id(0) * block_b
        rows = row0 + jnp.arange(block_b)
        row_ok = rows < batch
        row_block = pl.ds(row0, block_b)
        if "slots" in ref:
            slot = plgpu.load(ref["slots"].at[row_block], mask=row_ok, other=pad_slot_id)
            valid = row_ok & (slot != pad_slot_id)
        else:
            slot, valid = rows, row_ok
        slot = jnp.where(valid, slot, slots)  # masked rows point past the end

        def lanes(start, size, limit):
            start = start + 0 * pl.program_id(0)  # traced: the ragged last chunk is masked, not bounds-checked
            index = start + jnp.arange(size)
            return index, pl.ds(start, size), index < limit

        def tile(name, r_block, r_ok, c_block, c_ok):
            return plgpu.load(ref[name].at[r_block, c_block], mask=r_ok[:, None] & c_ok[None, :], other=0.0).astype(f32)

        def vector(name, block, ok):
            return plgpu.load(ref[name].at[block], mask=ok, other=0.0).astype(f32)

        xs = []
        for i in range(n_in):
            _, h_block, h_ok = lanes(i * chunk_h, chunk_h, H_in)
            xs.append(tile("x", row_block, row_ok, h_block, h_ok))
        tau = vector("tau", row_block, row_ok)[:, None] if "tau" in ref else None

        # Each stage issues all of its loads before the first product, so that they overlap.
        new_states = []
        for p in range(n_p):
            p_index, p_block, p_ok = lanes(p * chunk_p, chunk_p, P)
            h_lanes = [lanes(i * chunk_h, chunk_h, H_in) for i in range(n_in)]
            B_re = [tile("B_re", p_block, p_ok, h_block, h_ok) for _, h_block, h_ok in h_lanes]
            B_im = [tile("B_im", p_block, p_ok, h_block, h_ok) for _, h_block, h_ok in h_lanes] if "B_im" in ref else None
            if row_wise_A:
                A_chunk = cl.Planes(tile("A_re", row_block, row_ok, p_block, p_ok), tile("A_im", row_block, row_ok, p_block, p_ok))
            else:
                A_chunk = cl.Planes(vector("A_re", p_block, p_ok)[None, :], vector("A_im", p_block, p_ok)[None, :])
            step = vector("delta", p_block, p_ok)[None, :] if "delta" in ref else None
            ok = valid[:, None] & p_ok[None, :]
            where = (slot[:, None], p_index[None, :])
            h = cl.Planes(*(plgpu.load(ref[n].at[where], mask=ok, other=0.0).astype(f32) for n in ("state_re", "state_im")))
            u = sum(dot(x_i, B_i) for x_i, B_i in zip(xs, B_re))
            if B_im is not None:
                u = cl.Planes(u, sum(dot(x_i, B_i) for x_i, B_i in zip(xs, B_im)))
            A_bar, gamma = km.discretize(discretization, A_chunk, step, None if tau is None else step * tau)
            h = cl.where(ok, cl.add(cl.mul(A_bar, h), cl.mul(gamma, u)), 0.0)
            plgpu.store(new_re_ref.at[where], h.re.astype(new_re_ref.dtype), mask=ok)
            plgpu.store(new_im_ref.at[where], h.im.astype(new_im_ref.dtype), mask=ok)
            new_states.append((h, p_block, p_ok))

        for o in range(n_out):
            _, h_block, h_ok = lanes(o * chunk_h, chunk_h, H_out)
            C_re = [tile("C_re", h_block, h_ok, p_block, p_ok) for _, p_block, p_ok in new_states]
            C_im = [tile("C_im", h_block, h_ok, p_block, p_ok) for _, p_block, p_ok in new_states] if "C_im" in ref else None
            skip = vector("D", h_block, h_ok)[None, :] * xs[o] if "D" in ref else None
            y = sum(dot(h.re, C_i) for (h, _, _), C_i in zip(new_states, C_re))
            if C_im is not None:
                y = y - sum(dot(h.im, C_i) for (h, _, _), C_i in zip(new_states, C_im))
            y = kappa * y
            if skip is not None:
                y = y + skip
            y = jnp.where(valid[:, None], y, 0.0)
            plgpu.store(out_ref.at[row_block, h_block], y.astype(out_ref.dtype), mask=row_ok[:, None] & h_ok[None, :])

    call = pl.pallas_call(
        body,
        out_shape=(
            jax.ShapeDtypeStruct((batch, H_out), x.dtype),
            jax.ShapeDtypeStruct(state.shape, state.dtype),
            jax.ShapeDtypeStruct(state.shape, state.dtype),
        ),
        grid=(pl.cdiv(batch, block_b),),
        input_output_aliases={0: 1, 1: 2},
        interpret=dispatch.interpret_mode(config),
        compiler_params=dispatch.compiler_params(config),
        name=OP,
    )
    out, new_re, new_im = call(*(inputs[n] for n in names))
    return out, cl.Planes(new_re, new_im)


def unsupported_reason(state, x, A, B, C, delta, D, integration_timesteps) -> Optional[str]:
    """Why the kernel cannot take these arguments (``state`` complex or ``Planes``), or None."""
    for name, a, allowed in (
        ("state", state.re, (jnp.float32, jnp.bfloat16)) if cl.is_planes(state) else ("state", state, (jnp.complex64,)),
        ("x", x, (jnp.float32, jnp.bfloat16, jnp.float16)),
        ("A", A, (jnp.float32, jnp.complex64)),
        ("B", B, (jnp.float32, jnp.complex64)),
        ("C", C, (jnp.float32, jnp.complex64)),
        ("delta", delta, (jnp.float32,)),
        ("D", D, (jnp.float32, jnp.bfloat16)),
        ("integration_timesteps", integration_timesteps, (jnp.float32, jnp.bfloat16)),
    ):
        if a is not None and not any(a.dtype == t for t in allowed):
            return f"{name} of dtype {a.dtype} (supported: {', '.join(jnp.dtype(t).name for t in allowed)})"
    P, H = state.shape[1], max(x.shape[1], C.shape[0])
    pairs = -(-P // CHUNK) * -(-H // CHUNK)
    if pairs > MAX_CHUNK_PAIRS:
        return f"d_state={P} with {H} features ({pairs} chunk pairs of {CHUNK} lanes > {MAX_CHUNK_PAIRS})"
    return None


def simplified_state_update(
    state, x, A, B, C, delta=None, D=None, *, integration_timesteps=None, discretization: str = "zoh",
    conj_sym: bool = False, state_batch_indices=None, pad_slot_id: int = -1,
    config: Optional[dispatch.KernelConfig] = None,
):
    """One diagonal complex SSM step: the Pallas kernel on NVIDIA GPUs, else the pure-JAX reference.

    Args:
      state: ``(slots, P)`` complex, or :class:`~pallas_kernels.complex_lib.Planes` of
        two ``(slots, P)`` float32 (or bfloat16) arrays, updated in place by the kernel.
      x: ``(batch, H_in)`` real input (float32 or bfloat16).
      A: ``(P,)`` continuous-time diagonal (complex or real); with
        ``"no_discretization"`` the discrete ``A_bar``, ``(P,)`` or per row ``(batch, P)``.
      B: ``(P, H_in)`` input matrix (complex or real), multiplied by the
        discretization's ``gamma`` (with ``"no_discretization"``: ``B_bar``).
      C: ``(H_out, P)`` output matrix (complex or real).
      delta: ``(P,)`` positive steps (required unless ``"no_discretization"``).
      D: optional ``(H,)`` skip (``H_in == H_out``).
      integration_timesteps: optional ``(batch,)`` event-mode time since the last
        event; the A-step of row ``b`` is ``delta * integration_timesteps[b]``.
      discretization: one of :data:`DISCRETIZATIONS`.
      conj_sym: output ``2 Re(C state)`` (each state stands for a conjugate pair).
      state_batch_indices, pad_slot_id: as in
        :func:`~pallas_kernels.selective.selective_state_update`.
      config: a :class:`~pallas_kernels.dispatch.KernelConfig`; the default (:func:`~pallas_kernels.dispatch.get_config`,
        read at this call) when None. ``block_batch`` sets the rows per program
        (:func:`rows_per_program`), ``precision`` the dots of blocks of rows, ``num_warps``
        None: 4 warps per program.

    Returns:
      ``(out (batch, H_out) in x.dtype, new_state)`` with ``new_state`` in the form of ``state``.
    """
    state, x, A, B, C, delta, D, integration_timesteps = _check(
        state, x, A, B, C, delta, D, integration_timesteps, discretization, state_batch_indices
    )
    options = dict(integration_timesteps=integration_timesteps, discretization=discretization, conj_sym=conj_sym,
                   state_batch_indices=state_batch_indices, pad_slot_id=pad_slot_id)
    config = dispatch.resolve(config)
    reason = unsupported_reason(state, x, A, B, C, delta, D, integration_timesteps)
    rows = x.shape[0] if state_batch_indices is None else None  # split over a data-parallel mesh
    if not dispatch.choose_kernel(OP, reason, config, batch=rows, split_reason=dispatch.SLOTS_SPLIT_REASON):
        config = None  # the reference: one compiled program whatever the configuration
    return _step(state, x, A, B, C, delta, D, config=config, **options)


@functools.partial(jax.jit, static_argnames=("discretization", "conj_sym", "pad_slot_id", "config"))
def _step(state, x, A, B, C, delta, D, *, integration_timesteps, discretization, conj_sym, state_batch_indices,
          pad_slot_id, config):
    """:func:`kernel` (``config`` given; a complex state is converted at the boundary) or :func:`reference` (None)."""
    options = dict(integration_timesteps=integration_timesteps, discretization=discretization, conj_sym=conj_sym,
                   state_batch_indices=state_batch_indices, pad_slot_id=pad_slot_id)
    if config is None:
        return reference(state, x, A, B, C, delta, D, **options)

    def rows_here(planes, x, integration_timesteps, state_batch_indices, A, B, C, delta, D):
        return kernel(planes, x, A, B, C, delta, D, integration_timesteps=integration_timesteps,
                      discretization=discretization, conj_sym=conj_sym, state_batch_indices=state_batch_indices,
                      pad_slot_id=pad_slot_id, config=config)

    # per shard under a data-parallel mesh (state_batch_indices never reach a kernel there); A per row: (batch, P)
    planes = state if cl.is_planes(state) else cl.split(state)
    rows = (planes, x, integration_timesteps, state_batch_indices)
    out, new_state = dispatch.per_shard(rows_here, rows + (A, B, C, delta, D),
                                        (0,) * len(rows) + (0 if A.ndim == 2 else None, None, None, None, None), 0)
    return out, (new_state if cl.is_planes(state) else cl.merge(new_state, state.dtype))


def _check(state, x, A, B, C, delta, D, integration_timesteps, discretization, state_batch_indices):
    """Validate shapes and options; returns the arrays as JAX arrays."""
    if discretization not in DISCRETIZATIONS:
        raise ValueError(f"discretization must be one of {DISCRETIZATIONS}, got {discretization!r}")
    if cl.is_planes(state):
        state = cl.Planes(jnp.asarray(state.re), jnp.asarray(state.im))
        if state.re.shape != state.im.shape or state.re.dtype != state.im.dtype:
            raise ValueError(f"state planes must match, got re {state.re.dtype}{state.re.shape} and im {state.im.dtype}{state.im.shape}")
    else:
        state = jnp.asarray(state)
        if not jnp.iscomplexobj(state):
            raise TypeError(f"state must be complex or Planes(re, im), got {state.dtype}")
    x, A, B, C = (jnp.asarray(a) for a in (x, A, B, C))
    delta, D, integration_timesteps = (None if a is None else jnp.asarray(a) for a in (delta, D, integration_timesteps))
    if len(state.shape) != 2:
        raise ValueError(f"state must have shape (slots, P), got {tuple(state.shape)}")
    P = state.shape[1]
    if x.ndim != 2:
        raise ValueError(f"x must have shape (batch, H_in), got {tuple(x.shape)}")
    batch, H_in = x.shape
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must have a real floating dtype, got {x.dtype}")
    A_shapes = [(P,)] + ([(batch, P)] if discretization == "no_discretization" else [])
    if tuple(A.shape) not in A_shapes:
        raise ValueError(f"A must have shape {' or '.join(map(str, A_shapes))}, got {tuple(A.shape)}")
    if B.shape != (P, H_in):
        raise ValueError(f"B must have shape (P, H_in) = {(P, H_in)}, got {tuple(B.shape)}")
    if C.ndim != 2 or C.shape[1] != P:
        raise ValueError(f"C must have shape (H_out, P={P}), got {tuple(C.shape)}")
    if discretization == "no_discretization":
        if delta is not None or integration_timesteps is not None:
            raise ValueError("discretization='no_discretization' takes A_bar and B_bar: pass delta=None and integration_timesteps=None")
    elif delta is None or delta.shape != (P,):
        raise ValueError(f"delta must have shape (P,) = ({P},) for discretization={discretization!r}, got {None if delta is None else tuple(delta.shape)}")
    if discretization == "async" and integration_timesteps is None:
        raise ValueError("discretization='async' needs integration_timesteps")
    if integration_timesteps is not None and integration_timesteps.shape != (batch,):
        raise ValueError(f"integration_timesteps must have shape (batch,) = ({batch},), got {tuple(integration_timesteps.shape)}")
    if D is not None and (D.shape != (H_in,) or C.shape[0] != H_in):
        raise ValueError(f"D must have shape (H,) with H = H_in = H_out, got D {tuple(D.shape)}, x {tuple(x.shape)}, C {tuple(C.shape)}")
    dispatch.check_state_slots(state.shape[0], batch, state_batch_indices)
    return state, x, A, B, C, delta, D, integration_timesteps
