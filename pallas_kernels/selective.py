"""``selective_state_update``: one decode step of a selective SSM with a real diagonal state.

For every batch row ``b``, head ``h``, channel ``d`` and state ``n`` (shapes as
mamba's ``selective_state_update``)::

    delta   = dt + dt_bias, then softplus(delta) when dt_softplus
    A_bar, gamma = discretization(A, delta, delta_A=delta_A)
    state   = A_bar * state + gamma * B[b, g(h)] * x                 g(h) = h // (nheads / ngroups)
    out     = (sum_n state * C[b, g(h)] + D * x) * silu(z)

Discretizations: ``"mamba"``, ``"zoh"``, ``"bilinear"``, ``"dirac"`` (event mode
passes ``delta_A``), computed by :func:`pallas_kernels.kernel_math.discretize` in the
kernel and in the reference alike (it is tested against ``lrnnx_jax.core.discretization``).

This is a standalone array-level op (with mamba's signature) for users' own decode
loops; the models' steps do not call it: they run their cells (:mod:`pallas_kernels.cells`).

:func:`selective_state_update` is the one dispatch point: the Pallas kernel
(:func:`kernel`) or the pure-JAX :func:`reference`, as :mod:`pallas_kernels.dispatch`
decides. The kernel updates the state in place (``input_output_aliases``); under
``jax.jit`` donate the state for no copy to be made.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels import kernel_math as km

OP = "selective_state_update"
DISCRETIZATIONS = ("mamba", "zoh", "bilinear", "dirac")
_KERNEL_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def reference(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, *, delta_A=None,
              discretization="mamba", state_batch_indices=None, pad_slot_id=-1):
    """Pure-JAX step on head-form arrays (see :func:`selective_state_update` for the shapes).

    Computes in float32 (float64 for float64 inputs), with the discretizations of
    :func:`pallas_kernels.kernel_math.discretize` (the kernel's). Returns ``(out (batch, nheads, dim)
    x.dtype, new_state like state)``.
    """
    f = jnp.promote_types(jnp.result_type(state, x, dt), jnp.float32)
    rep = state.shape[1] // B.shape[1]
    slot, valid = dispatch.slots(state_batch_indices, pad_slot_id)
    delta = dt.astype(f)
    if dt_bias is not None:
        delta = delta + dt_bias.astype(f)
    if dt_softplus:
        delta = jax.nn.softplus(delta)
    step_A = None if delta_A is None else delta_A.astype(f)[..., None]
    A_bar, gamma = km.discretize(discretization, A.astype(f), delta[..., None], step_A)
    B_h = jnp.repeat(B.astype(f), rep, axis=1)[:, :, None, :]
    C_h = jnp.repeat(C.astype(f), rep, axis=1)[:, :, None, :]
    xf = x.astype(f)
    h = A_bar * state[slot].astype(f) + gamma * B_h * xf[..., None]
    y = jnp.sum(h * C_h, axis=-1)
    if D is not None:
        y = y + D.astype(f) * xf
    if z is not None:
        y = y * jax.nn.silu(z.astype(f))
    if state_batch_indices is None:
        return y.astype(x.dtype), h.astype(state.dtype)
    y = jnp.where(valid[:, None, None], y, 0)
    return y.astype(x.dtype), dispatch.write_slots(state, h, slot, valid)


def kernel(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, *, delta_A=None,
           discretization="mamba", state_batch_indices=None, pad_slot_id=-1,
           config: Optional[dispatch.KernelConfig] = None):
    """The Pallas kernel on head-form arrays; same contract as :func:`reference`.

    Grid ``(batch, nheads, cdiv(dim, BLOCK_D))``; each program updates a
    ``(BLOCK_D, BLOCK_N)`` tile of one state row (``BLOCK_N`` = ``dstate`` rounded up to
    a power of two, ``BLOCK_D * BLOCK_N ~ config.block_elems``) and writes it back in
    place. Out-of-range lanes are masked.
    """
    config = dispatch.resolve(config)
    pl, plgpu = dispatch.pallas_modules()
    slots, nheads, dim, dstate = state.shape
    batch = x.shape[0]
    rep = nheads // B.shape[1]
    block_n = dispatch.next_power_of_two(dstate)
    block_d = min(dispatch.next_power_of_two(dim), max(1, config.block_elems // block_n))
    optional = {"D": D, "z": z, "dt_bias": dt_bias, "delta_A": delta_A, "slots": state_batch_indices}
    names = ["state", "x", "dt", "A", "B", "C"] + [k for k, v in optional.items() if v is not None]
    args = [state, x, dt, A, B, C] + [v for v in optional.values() if v is not None]
    if state_batch_indices is not None:
        args[-1] = state_batch_indices.astype(jnp.int32)
    f32 = jnp.float32

    def body(*refs):
        ref = dict(zip(names, refs))
        out_ref, new_ref = refs[len(names):]
        b, head, block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        group = head // rep
        d_ok = block * block_d + jnp.arange(block_d) < dim
        n_ok = jnp.arange(block_n) < dstate
        tile_ok = d_ok[:, None] & n_ok[None, :]
        if "slots" in ref:
            slot = ref["slots"][b]
            valid = slot != pad_slot_id
            slot = jnp.where(valid, slot, 0)
            state_ok = tile_ok & valid
        else:
            slot, valid, state_ok = b, True, tile_ok
        rows, cols = pl.ds(block * block_d, block_d), pl.ds(0, block_n)

        def channels(name, *lead):
            return plgpu.load(ref[name].at[(*lead, rows)], mask=d_ok, other=0.0).astype(f32)

        def state_vector(name, *lead):  # B or C of one group, along dstate
            return plgpu.load(ref[name].at[(*lead, cols)], mask=n_ok, other=0.0).astype(f32)

        xv = channels("x", b, head)
        delta = channels("dt", b, head)
        if "dt_bias" in ref:
            delta = delta + channels("dt_bias", head)
        if dt_softplus:
            delta = km.softplus(delta)
        step_A = channels("delta_A", b, head)[:, None] if "delta_A" in ref else None
        A_tile = plgpu.load(ref["A"].at[head, rows, cols], mask=tile_ok, other=0.0).astype(f32)
        h = plgpu.load(ref["state"].at[slot, head, rows, cols], mask=state_ok, other=0.0).astype(f32)
        A_bar, gamma = km.discretize(discretization, A_tile, delta[:, None], step_A)
        h = A_bar * h + gamma * (state_vector("B", b, group)[None, :] * xv[:, None])
        h = jnp.where(tile_ok, h, 0.0)
        plgpu.store(new_ref.at[slot, head, rows, cols], h.astype(new_ref.dtype), mask=state_ok)
        y = jnp.sum(h * state_vector("C", b, group)[None, :], axis=1)
        if "D" in ref:
            y = y + channels("D", head) * xv
        if "z" in ref:
            y = y * km.silu(channels("z", b, head))
        y = jnp.where(valid, y, 0.0)
        plgpu.store(out_ref.at[b, head, rows], y.astype(out_ref.dtype), mask=d_ok)

    call = pl.pallas_call(
        body,
        out_shape=(jax.ShapeDtypeStruct((batch, nheads, dim), x.dtype), jax.ShapeDtypeStruct(state.shape, state.dtype)),
        grid=(batch, nheads, pl.cdiv(dim, block_d)),
        input_output_aliases={0: 1},
        interpret=dispatch.interpret_mode(config),
        compiler_params=dispatch.compiler_params(config),
        name=OP,
    )
    return call(*args)


def unsupported_reason(state, x, dt, A, B, C, D, z, dt_bias, delta_A) -> Optional[str]:
    """Why the kernel cannot take these (head-form) arguments, or None."""
    for name, a in (("state", state), ("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("dt_bias", dt_bias), ("delta_A", delta_A)):
        if a is not None and not any(a.dtype == t for t in _KERNEL_DTYPES):
            return f"{name} of dtype {a.dtype} (supported: float32, bfloat16, float16)"
    if state.size >= 2**31 or x.size >= 2**31:
        return "arrays of 2**31 elements or more (32-bit offsets)"
    if dispatch.next_power_of_two(state.shape[-1]) > 4096:
        return f"dstate={state.shape[-1]} > 4096"
    return None


def slower_than_reference(batch: int, state_batch_indices) -> Optional[str]:
    """Why ``"auto"`` keeps the reference although the kernel supports the call, or None.

    The op's own policy, measured on an H100 (BENCHMARKS.md §3): without state slots the
    reference is one XLA fusion that reads and writes the state once, as the kernel does, and it
    was as fast or faster from batch 32 on (Mamba D=2048: kernel 0.89-0.97x); the kernel was
    faster at batch 1 (1.08x) and with ``state_batch_indices``, where the reference gathers and
    scatters the state (1.96x at batch 4096).
    """
    if state_batch_indices is None and batch > 1:
        return f"batch {batch} without state_batch_indices (the XLA step was measured as fast or faster on an H100)"
    return None


def selective_state_update(
    state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus: bool = False, *,
    delta_A=None, discretization: str = "mamba", state_batch_indices=None, pad_slot_id: int = -1,
    config: Optional[dispatch.KernelConfig] = None,
):
    """One selective-SSM step: the Pallas kernel on NVIDIA GPUs, else the pure-JAX reference.

    Args:
      state: ``(slots, dim, dstate)`` or ``(slots, nheads, dim, dstate)``; float32
        (bfloat16 allowed). ``slots`` is the batch unless ``state_batch_indices`` is given.
      x, dt: ``(batch, dim)`` or ``(batch, nheads, dim)``, float32 or bfloat16.
      A: ``(dim, dstate)`` or ``(nheads, dim, dstate)`` real.
      B, C: ``(batch, dstate)`` or ``(batch, ngroups, dstate)``; ``nheads % ngroups == 0``.
      D, dt_bias: optional ``(dim,)`` or ``(nheads, dim)``.
      z: optional gate, shaped like ``x``: the output is multiplied by ``silu(z)``.
      dt_softplus: apply softplus to ``dt + dt_bias``.
      delta_A: optional A-step of event mode, shaped like ``x`` (used as is).
      discretization: one of :data:`DISCRETIZATIONS`.
      state_batch_indices: optional ``(batch,)`` integers: row ``b`` reads and writes
        state slot ``state_batch_indices[b]`` (distinct slots); rows equal to
        ``pad_slot_id`` are skipped (no write, zero output).
      config: a :class:`~pallas_kernels.dispatch.KernelConfig`; the default (:func:`~pallas_kernels.dispatch.get_config`,
        read at this call) when None. ``num_warps`` None: 4 warps per program.

    Returns:
      ``(out, new_state)``: ``out`` shaped like ``x`` in ``x.dtype``; ``new_state`` like ``state``.
    """
    state, x, dt, A, B, C, D, z, dt_bias, delta_A = _check(
        state, x, dt, A, B, C, D, z, dt_bias, delta_A, discretization, state_batch_indices
    )
    config = dispatch.resolve(config)
    reason = unsupported_reason(state, x, dt, A, B, C, D, z, dt_bias, delta_A)
    slower = slower_than_reference(x.shape[0], state_batch_indices)
    rows = x.shape[0] if state_batch_indices is None else None  # split over a data-parallel mesh
    use_kernel = dispatch.choose_kernel(OP, reason, config, slower, batch=rows, split_reason=dispatch.SLOTS_SPLIT_REASON)
    if not use_kernel:
        config = None  # the reference: one compiled program whatever the configuration
    return _step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, delta_A=delta_A, discretization=discretization,
                 state_batch_indices=state_batch_indices, pad_slot_id=pad_slot_id, config=config)


@functools.partial(jax.jit, static_argnames=("dt_softplus", "discretization", "pad_slot_id", "config"))
def _step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, *, delta_A, discretization, state_batch_indices,
          pad_slot_id, config):
    """Head-less arrays to the head form, then :func:`kernel` (``config`` given) or :func:`reference` (None)."""
    heads = state.ndim == 4
    if not heads:  # one head, one group
        state, x, dt, B, C, z, delta_A = (None if a is None else a[:, None] for a in (state, x, dt, B, C, z, delta_A))
        A, D, dt_bias = (None if a is None else a[None] for a in (A, D, dt_bias))
    options = dict(delta_A=delta_A, discretization=discretization, state_batch_indices=state_batch_indices,
                   pad_slot_id=pad_slot_id)
    if config is None:
        out, new_state = reference(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, **options)
    else:  # per shard under a data-parallel mesh (state_batch_indices never reach a kernel there)
        def rows_here(state, x, dt, B, C, z, delta_A, state_batch_indices, A, D, dt_bias):
            return kernel(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, delta_A=delta_A, discretization=discretization,
                          state_batch_indices=state_batch_indices, pad_slot_id=pad_slot_id, config=config)

        rows = (state, x, dt, B, C, z, delta_A, state_batch_indices)
        out, new_state = dispatch.per_shard(rows_here, rows + (A, D, dt_bias), (0,) * len(rows) + (None,) * 3, 0)
    if not heads:
        out, new_state = out[:, 0], new_state[:, 0]
    return out, new_state


def _check(state, x, dt, A, B, C, D, z, dt_bias, delta_A, discretization, state_batch_indices):
    """Validate shapes and options; returns the arrays as JAX arrays."""
    if discretization not in DISCRETIZATIONS:
        raise ValueError(f"discretization must be one of {DISCRETIZATIONS}, got {discretization!r}")
    arrays = [None if a is None else jnp.asarray(a) for a in (state, x, dt, A, B, C, D, z, dt_bias, delta_A)]
    state, x, dt, A, B, C, D, z, dt_bias, delta_A = arrays
    if state.ndim not in (3, 4):
        raise ValueError(f"state must have shape (slots, dim, dstate) or (slots, nheads, dim, dstate), got {state.shape}")
    heads = state.ndim == 4
    nheads, dim, dstate = state.shape[1:] if heads else (1,) + state.shape[1:]
    lead = (nheads,) if heads else ()
    batch = x.shape[0] if x.ndim else None
    layout = "(batch, nheads, dim)" if heads else "(batch, dim)"
    _expect("x", x, (batch, *lead, dim), layout)
    for name, a in (("dt", dt), ("z", z), ("delta_A", delta_A)):
        _expect(name, a, (batch, *lead, dim), layout)
    _expect("A", A, (*lead, dim, dstate), "(nheads, dim, dstate)" if heads else "(dim, dstate)")
    for name, a in (("D", D), ("dt_bias", dt_bias)):
        _expect(name, a, (*lead, dim), "(nheads, dim)" if heads else "(dim,)")
    groups = B.shape[1] if heads and B.ndim == 3 else 1
    for name, a in (("B", B), ("C", C)):
        _expect(name, a, (batch, groups, dstate) if heads else (batch, dstate),
                "(batch, ngroups, dstate)" if heads else "(batch, dstate)")
    if nheads % groups:
        raise ValueError(f"nheads={nheads} must be a multiple of ngroups={groups} (B and C)")
    for name, a in zip(("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "delta_A"), arrays):
        if a is not None and not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"{name} must have a real floating dtype, got {a.dtype}")
    dispatch.check_state_slots(state.shape[0], batch, state_batch_indices)
    return arrays


def _expect(name, a, shape, layout):
    if a is not None and tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {layout} = {tuple(shape)}, got {tuple(a.shape)}")
