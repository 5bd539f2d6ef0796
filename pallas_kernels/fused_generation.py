"""The fused Pallas driver: many steps of a cell in one kernel.

``generate`` runs ``y_t = step(x_t)``, ``x_{t+1} = y_t`` for ``num_steps`` steps. Even as
one XLA program, every step costs several kernel launches and a loop iteration
for very little work. Here one ``pallas_call`` runs all the steps: each program
owns one batch row (or a block of rows), loads the parameters once, keeps the
state on chip, writes each output and feeds it back as the next input (or reads the
next given input) without leaving the kernel. Rows are independent, so there is no
grid-wide sync.

:func:`run_cell` is the one driver, for every :class:`~pallas_kernels.cells.Cell`. It
pads every parameter, state and input axis to a power of two of at least
:data:`MIN_LANES` lanes (with zeros, or the cell's ``pad_values``), so the cell's
step function runs unchanged on the padded tiles. It serves:

* the closed-loop rollout of ``generate`` (:func:`fused_generate`, :func:`fused_program`);
* the one-step kernel of ``model.step`` and the multi-token kernel of
  ``model.multi_step`` (given inputs), through :mod:`pallas_kernels.drivers`.

Whatever does not fit on chip gets a reason from :func:`unsupported_reason`, and the
caller keeps the XLA driver.

**Accuracy.** With one row per program (the default up to :data:`MAX_ROWS_PATH_BATCH`
rows) every product is an IEEE float32 multiply-add, so the rollout equals the
XLA drivers at ``precision="highest"`` up to float32 rounding. Blocks of
rows (cells that declare ``blockable``, large batches) use tensor-core dots at
``KernelConfig.precision`` (3-pass TF32 by default, float32 accuracy).

This module runs cells through the model protocol of ``lrnnx_jax.core.base.LRNN``
(``cell``, ``cell_state``, ``cell_cache``, ``cell_inputs``) and knows no model.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import dispatch
from pallas_kernels.cells import Cell

OP = "fused_generation"
#: up to this batch a program owns one row (exact float32 FMAs); above, blockable cells take
#: blocks of rows with tensor-core dots (a better use of the GPU when every SM has many rows)
MAX_ROWS_PATH_BATCH = 256
#: rows per program of the block path when ``KernelConfig.block_batch`` is None
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
#: lanes of a padded axis: powers of two, at least this many (tensor-core tiles are >= 16)
MIN_LANES = 16


def lanes(n: int) -> int:
    """The padded size of an axis of ``n`` elements."""
    return max(MIN_LANES, dispatch.next_power_of_two(n))


def _pad(a, lead: int, value=0.0):
    """``a`` as float32 with every axis after the first ``lead`` padded to :func:`lanes`."""
    a = jnp.asarray(a, jnp.float32)
    widths = [(0, 0)] * lead + [(0, lanes(d) - d) for d in a.shape[lead:]]
    return jnp.pad(a, widths, constant_values=value)


def _pad_rows(a, rows: int):
    return jnp.pad(a, [(0, rows - a.shape[0])] + [(0, 0)] * (a.ndim - 1))


def padded_params(cell: Cell) -> dict:
    """The cell's parameters padded for the kernel (float32; ``pad_values`` by top-level name)."""
    return {name: jax.tree.map(lambda a, v=cell.pad_values.get(name, 0.0): _pad(a, 0, v), value)
            for name, value in cell.params.items()}


def effective_block_batch(blockable: bool, batch: int, config: dispatch.KernelConfig) -> int:
    """Rows per program for a cell (``blockable``: it has the block path) under ``config``."""
    if not blockable:
        return 1
    if config.block_batch is not None:
        return config.block_batch
    return 1 if batch <= MAX_ROWS_PATH_BATCH else DEFAULT_BLOCK_BATCH


def _auto_num_warps(param_sizes: list, block: int, config: dispatch.KernelConfig) -> int:
    """4 warps for a block of rows; for one row, enough warps to hold the parameters in registers (<= 16)."""
    if config.num_warps is not None:
        return config.num_warps
    if block > 1:
        return 4
    total = sum(param_sizes)
    return int(min(16, max(4, dispatch.next_power_of_two(-(-total // HOIST_PER_WARP)))))


def split_hoisted(param_sizes: list, num_warps: int) -> tuple[list, list]:
    """Indices of the parameter leaves kept in registers (the smallest, up to ``num_warps *
    HOIST_PER_WARP`` numbers) and of those re-read every step."""
    hoisted, streamed, total = [], [], 0
    for i in sorted(range(len(param_sizes)), key=lambda i: (param_sizes[i], i)):
        total += param_sizes[i]
        (hoisted if total <= num_warps * HOIST_PER_WARP else streamed).append(i)
    return sorted(hoisted), sorted(streamed)


def run_cell(cell: Cell, state, x0, num_steps: int, row_inputs=None, step_inputs=None, *,
             config: dispatch.KernelConfig, xs=None, time_major: bool = False, num_valid=None):
    """Run ``num_steps`` steps of ``cell`` in one ``pallas_call``.

    Args:
      cell: a :class:`~pallas_kernels.cells.Cell`.
      state: the initial state, a pytree of per-row arrays ``(B, ...)``.
      x0: ``(B, H)``, the first input.
      num_steps: T, the output length (static).
      row_inputs: per-row inputs constant over the steps, pytree of ``(B, ...)``.
      step_inputs: per-row, per-step inputs, pytree of ``(B, T, ...)``.
      config: the :class:`~pallas_kernels.dispatch.KernelConfig`.
      xs: given inputs ``(B, T, H)`` (teacher forcing: the multi-token step); None: closed
        loop, each output is the next input and ``x0`` the first.
      time_major: outputs ``(T, B, H)`` instead of ``(B, T, H)``.
      num_valid: optional int32 scalar <= T: only that many steps run (the rest of
        the output is unspecified) and the state is the one after them.

    Returns:
      ``(ys, state)``: the outputs (float32) and the final state (per-row arrays as ``state``).

    Under a data-parallel mesh each device runs the kernel on its rows (:func:`pallas_kernels.dispatch.per_shard`).
    """

    def rows_here(params, state, x0, row_inputs, step_inputs, xs, num_valid):
        return _run_rows(cell._replace(params=params), state, x0, num_steps, row_inputs, step_inputs, config=config,
                         xs=xs, time_major=time_major, num_valid=num_valid)

    return dispatch.per_shard(rows_here, (cell.params, state, x0, row_inputs, step_inputs, xs, num_valid),
                              (None, 0, 0, 0, 0, 0, None), (1 if time_major else 0, 0))


def _run_rows(cell: Cell, state, x0, num_steps: int, row_inputs, step_inputs, *, config: dispatch.KernelConfig, xs,
              time_major: bool, num_valid):
    """:func:`run_cell` on the rows of one device."""
    pl, plgpu = dispatch.pallas_modules()
    batch, H = x0.shape
    Hp = lanes(H)
    block = effective_block_batch(cell.blockable, batch, config)
    rows = -(-batch // block) * block
    interpret = dispatch.interpret_mode(config)
    precision = dispatch.dot_precision(config)
    params = padded_params(cell)
    groups = {
        "params": params,
        "state": jax.tree.map(lambda a: _pad_rows(_pad(a, 1), rows), state),
        "row": jax.tree.map(lambda a: _pad_rows(_pad(a, 1), rows), row_inputs or {}),
        "step": jax.tree.map(lambda a: _pad_rows(_pad(a, 2), rows), step_inputs or {}),
    }
    if xs is not None:
        groups["xs"] = _pad_rows(_pad(xs, 2), rows)
    if num_valid is not None:
        groups["count"] = jnp.reshape(jnp.asarray(num_valid, jnp.int32), (1,))
    flat, treedefs = {}, {}
    for name, tree in groups.items():
        flat[name], treedefs[name] = jax.tree.flatten(tree)
    order = [(g, i) for g in groups for i in range(len(flat[g]))]
    largest = max([batch * num_steps * H] + [a.size for a in flat["step"]] + [a.size for a in flat.get("xs", [])])
    if largest > MAX_ELEMENTS:
        raise ValueError(
            f"the fused kernel addresses arrays with 32-bit offsets, but {batch} rows x {num_steps} steps make an array "
            f"of {largest} elements; run fewer steps per call (lrnnx_jax.generation.generate runs them in chunks)")
    param_sizes = [a.size for a in flat["params"]]
    num_warps = _auto_num_warps(param_sizes, block, config)
    hoisted, streamed = split_hoisted(param_sizes, num_warps)
    x0p = _pad_rows(_pad(x0, 1), rows)
    n_state = len(flat["state"])

    def body(x0_ref, *refs):
        ref = dict(zip(order, refs[:len(order)]))
        ys_ref, state_out = refs[len(order)], refs[len(order) + 1:]
        program = pl.program_id(0)
        zero = 0 * program  # traced: the ragged output lanes are masked, not bounds-checked
        lane_ok = jnp.arange(Hp) < H
        if block == 1:
            sel, ok = program, lane_ok
        else:
            start = program * block
            sel = pl.ds(start, block)
            ok = (start + jnp.arange(block) < batch)[:, None] & lane_ok[None, :]
        kept = {i: ref["params", i][...] for i in hoisted}
        x = x0_ref[sel]
        state = [ref["state", i][sel] for i in range(n_state)]
        rows_in = [ref["row", i][sel] for i in range(len(flat["row"]))]

        def loop(t, carry):
            x, state = carry
            if xs is not None:
                x = ref["xs", 0][sel, t]
            p = [kept[i] if i in kept else ref["params", i][...] for i in range(len(param_sizes))]
            inputs = jax.tree.unflatten(treedefs["row"], rows_in)
            per_step = jax.tree.unflatten(treedefs["step"], [ref["step", i][sel, t] for i in range(len(flat["step"]))])
            y, new_state = cell.step(jax.tree.unflatten(treedefs["params"], p),
                                     jax.tree.unflatten(treedefs["state"], state), x, {**inputs, **per_step}, precision)
            where = (t, sel) if time_major else (sel, t)
            plgpu.store(ys_ref.at[(*where, pl.ds(zero, Hp))], y, mask=ok)
            return y, jax.tree.leaves(new_state)

        count = ref["count", 0][0] if num_valid is not None else num_steps
        _, state = jax.lax.fori_loop(0, count, loop, (x, state))
        for i in range(n_state):
            state_out[i][sel] = state[i]

    out_shape = (
        jax.ShapeDtypeStruct((num_steps, batch, H) if time_major else (batch, num_steps, H), jnp.float32),
        *(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in flat["state"]),
    )
    call = pl.pallas_call(
        body,
        out_shape=out_shape,
        grid=(rows // block,),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        name=OP,
    )
    ys, *final = call(x0p, *(flat[g][i] for g, i in order))
    final = [f[:batch][tuple(slice(0, d) for d in a.shape)] for f, a in zip(final, jax.tree.leaves(state))]
    return ys, jax.tree.unflatten(treedefs["state"], final)


# ----------------------------------------------------------------------------- support
def unsupported_reason(cell: Cell, batch_size: int, dtype=None) -> Optional[str]:
    """None when :func:`run_cell` can run ``cell`` for ``batch_size`` rows of ``dtype`` inputs, else why not.

    The reasons: inputs or parameters of a dtype other than float32, and parameters
    that do not fit on chip (a padded tile over :data:`MAX_TILE` numbers or a total
    over :data:`MAX_PARAMS`). Works on abstract cells (under ``jax.eval_shape``).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        return f"batch_size={batch_size!r} (expected a positive integer)"
    if dtype is not None and jnp.dtype(dtype) != jnp.float32:
        return f"inputs of dtype {jnp.dtype(dtype).name} (the fused kernels run in float32)"
    leaves = jax.tree.leaves(cell.params)
    wide = [leaf.dtype for leaf in leaves if leaf.dtype != jnp.float32]
    if wide:
        return f"parameters of dtype {jnp.dtype(wide[0]).name} (the fused kernels take float32 parameters)"
    shapes = [tuple(lanes(d) for d in leaf.shape) for leaf in leaves]
    sizes = [math.prod(s) for s in shapes]
    largest, total = max(sizes), sum(sizes)
    if largest > MAX_TILE or total > MAX_PARAMS:
        return (f"parameters too large for one program: {total} padded numbers (largest tile {shapes[sizes.index(largest)]}) "
                f"over the on-chip limits of {MAX_TILE} per tile and {MAX_PARAMS} in total")
    return None


def model_unsupported_reason(model, batch_size: int, event_mode: bool, dtype=None) -> Optional[str]:
    """:func:`unsupported_reason` of ``model``'s cell (traced abstractly: nothing is computed), or a
    model-level reason: event mode without ``integration_timesteps`` support, active dropout."""
    name = type(model).__name__
    if event_mode and not getattr(model, "supports_integration_timesteps", False):
        return f"event mode on {name}, which has no integration_timesteps"
    refusal = model.kernel_refusal()  # the model protocol (lrnnx_jax.core.base.LRNN): e.g. active dropout
    if refusal is not None:
        return refusal
    reason = unsupported_reason(abstract_cell(model), batch_size, dtype)
    return None if reason is None else f"{name}: {reason}"


def abstract_cell(model) -> Cell:
    """``model.cell()`` with abstract parameter arrays (shapes and dtypes only), cached per model structure."""
    leaves, treedef = jax.tree.flatten(model)
    return _abstract_cell(treedef, tuple((tuple(leaf.shape), leaf.dtype) for leaf in leaves))


@functools.lru_cache(maxsize=64)
def _abstract_cell(treedef, leaf_types):
    captured = []

    def params(leaves):
        cell = jax.tree.unflatten(treedef, leaves).cell()
        captured.append(cell)
        return cell.params

    shapes = jax.eval_shape(params, [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in leaf_types])
    return captured[0]._replace(params=shapes)


def use_fused_rollout(model, batch_size: int, event_mode: bool, dtype=None,
                      config: Optional[dispatch.KernelConfig] = None) -> bool:
    """The switch of ``generate``: :func:`pallas_kernels.dispatch.choose_kernel` on
    :func:`model_unsupported_reason`, with the cell's :class:`~pallas_kernels.cells.KernelPolicy`."""
    config = dispatch.resolve(config)
    reason = model_unsupported_reason(model, batch_size, event_mode, dtype)
    slower = None if reason is not None else abstract_cell(model).policy.slower_reason("rollout", batch_size)
    return dispatch.choose_kernel(OP, reason, config, slower, batch=batch_size)


# ----------------------------------------------------------------------------- public API
def _check_inputs(model, x0, num_steps, integration_timesteps):
    if x0.ndim != 2 or x0.shape[1] != model.d_model:
        raise ValueError(f"x0 must have shape (B, H) with H={model.d_model}, got {tuple(x0.shape)}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
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
    return x0, int(num_steps), taus


def model_rollout(model, x, cache, taus, num_steps: int, config: dispatch.KernelConfig, **options):
    """The rollout of ``model`` from ``cache``: ``taus`` None, ``(B,)`` (every step) or ``(B, T)``.

    Returns ``(ys, cache after the steps)``; ``options`` go to :func:`run_cell`.
    """
    cell = model.cell()
    batch = x.shape[0]
    row_inputs, step_inputs = {}, {}
    if taus is None or taus.ndim == 1:
        row_inputs = model.cell_inputs((batch,), taus)
    else:
        step_inputs = model.cell_inputs(taus.shape, taus)
    ys, state = run_cell(cell, model.cell_state(cache), x, num_steps, row_inputs, step_inputs, config=config, **options)
    return ys, model.cell_cache(state, cache)


def fused_generate(model, x0, num_steps: int, integration_timesteps=None, *,
                   config: Optional[dispatch.KernelConfig] = None):
    """Closed-loop generation from a fresh (zero) state in one fused kernel.

    Same results as ``lrnnx_jax.generation.generate(model, x0, num_steps,
    integration_timesteps=...)`` up to float32 rounding. The parameters are arguments
    of the kernel, read from ``model``.

    Args:
      model: an lrnnx_jax model whose cell the kernel supports.
      x0: ``(B, H)`` float32, the first input.
      num_steps: number of generated steps.
      integration_timesteps: event mode only, ``(B, 1)`` (reused every step) or ``(B, num_steps)``.
      config: a :class:`~pallas_kernels.dispatch.KernelConfig` (tuning; the default when None).

    Returns:
      ``(B, num_steps, H)`` float32.

    Raises:
      ValueError/TypeError: for bad arguments or a model it does not support (with the reason).
    """
    x0 = jnp.asarray(x0)
    x0, num_steps, taus = _check_inputs(model, x0, num_steps, integration_timesteps)
    reason = model_unsupported_reason(model, x0.shape[0], taus is not None)
    if reason is not None:
        raise ValueError(f"fused_generate does not support {reason}; use lrnnx_jax.generation.generate")
    leaves, treedef = jax.tree.flatten(model)
    return _rollout(treedef, num_steps, dispatch.resolve(config), leaves, x0, taus)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _rollout(treedef, num_steps: int, config: dispatch.KernelConfig, leaves, x0, taus):
    """The rollout from a zero state, compiled once per model structure, shapes and config."""
    model = jax.tree.unflatten(treedef, leaves)
    cache = model.allocate_inference_cache(x0.shape[0])
    return model_rollout(model, x0, cache, taus, num_steps, config)[0]


def fused_program(spec) -> Callable:
    """A generation program running the fused kernel, for ``lrnnx_jax.generation``.

    ``spec`` is a ``lrnnx_jax.generation.ProgramSpec`` (``treedef``, ``chunk_size`` and
    ``kernels`` are read); the program has the interface of
    ``lrnnx_jax.generation.xla_program``: ``(leaves, x, cache, taus, num_valid) ->
    (ys (chunk_size, B, H), x_next, cache)``, with ``taus (B, chunk_size)`` or None.
    It runs ``num_valid`` steps from ``cache`` and returns the state after them.
    """
    chunk = spec.chunk_size

    def fused_generation_program(leaves, x, cache, taus, num_valid):
        model = jax.tree.unflatten(spec.treedef, leaves)
        ys, cache = model_rollout(model, x, cache, taus, chunk, spec.kernels, num_valid=num_valid, time_major=True)
        x_next = jax.lax.dynamic_index_in_dim(ys, num_valid - 1, axis=0, keepdims=False)
        return ys, x_next, cache

    return fused_generation_program
