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

**Split cells.** A cell whose parameters do not fit one program and that declares a
:class:`~pallas_kernels.cells.Split` runs each batch row on ``P`` programs (grid ``(rows, P)``),
each holding ``1/P`` of its channels' parameters and state on chip for the whole rollout. Where
the step reduces over the channels (``comm.psum`` / ``comm.psum_scatter``), each program writes
its partial sums to a double-buffered exchange array in global memory, waits for the row's other
programs, reads the ``P`` partials back from L2 and adds them in the same order, so every program
holds the same bits. The wait is the cell's ``Split.exchange``: a barrier (an acquire-release atomic
add to a counter per row, then a spin on volatile loads of it), or tagged words (16 bits of a
partial below the exchange's number, so that each word says itself that it is written: no fence or
atomic); neither is faster for every cell, so each cell declares the one measured faster for it.

A split cell that is also ``blockable`` gives each program a block of rows where one row
per program would not be resident (:func:`split_block`, or ``KernelConfig.block_batch``): the ``P``
programs of a block hold one slice of the channels for all its rows (tensor-core dots from
``dispatch.DOT_MIN_ROWS`` rows on, float32 multiply-adds in a smaller block), so
``B / block x P`` programs share the parameters once per block instead of once per row. All programs
must be resident at once: ``row groups x P`` is at most the GPU's SM count, which assumes the kernel
has the GPU to itself (XLA runs one stream; a GPU shared with other processes through MPS could leave
a row's programs waiting for one that cannot start).
Interpret mode runs programs one after another (a program waiting for another would never
return), so there a split cell runs with ``P = 1`` through the same exchange code.

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

from pallas_kernels import cells, dispatch
from pallas_kernels import kernel_math as km
from pallas_kernels.cells import Cell, Collectives

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
#: most programs per row of a split cell, and the parameter numbers each may hold (all kept in registers)
MAX_SPLIT_PROGRAMS = 16
MAX_SPLIT_PARAMS = 16 * HOIST_PER_WARP
#: programs resident at once when the device does not say (its SM count on an NVIDIA GPU)
DEFAULT_RESIDENT_PROGRAMS = 128


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


def padded_params(cell: Cell, parts: Optional[int] = None) -> dict:
    """The cell's parameters padded for the kernel (float32; ``pad_values`` by top-level name); with ``parts``,
    those the cell's split names cut into ``(parts, *slice)`` (the slices padded)."""
    params = cell.params if parts is None else cells.split_params(cell, parts)
    pieces = {} if parts is None else cell.split.params
    return {name: jax.tree.map(lambda a, v=cell.pad_values.get(name, 0.0), lead=int(name in pieces): _pad(a, lead, v),
                               value)
            for name, value in params.items()}


def resident_programs() -> int:
    """How many programs of one kernel may wait for each other: the SM count of the GPU (one program each)."""
    device = jax.devices()[0]
    count = getattr(device, "core_count", None)
    return int(count) if device.platform == "gpu" and count else DEFAULT_RESIDENT_PROGRAMS


def _padded_sizes(params, pieces: dict, parts: int) -> list:
    """Padded numbers of each parameter leaf one program holds (leaves of ``pieces`` names cut in ``parts``
    along their axis)."""
    sizes = []
    for name, value in params.items():
        for leaf in jax.tree.leaves(value):
            shape = list(leaf.shape)
            if name in pieces:
                shape[pieces[name] % len(shape)] //= parts
            sizes.append(math.prod(lanes(d) for d in shape))
    return sizes


def _fits_one_program(sizes: list, limit: int) -> bool:
    return max(sizes) <= MAX_TILE and sum(sizes) <= limit


def _fitting_programs(cell: Cell, config: dispatch.KernelConfig) -> tuple[list, Optional[str]]:
    """``(fitting, None)``: the programs per row group ``P`` (ascending) into which ``cell``'s split can cut its
    channels (``KernelConfig.split_programs``, or every candidate): powers of two of at least :data:`MIN_LANES`
    channels each (so that padded slices tile the padded whole), each program's slices within
    :data:`MAX_SPLIT_PARAMS`; ``([], reason)`` when none."""
    channels = cell.split.channels
    candidates = [1 << k for k in range(MAX_SPLIT_PROGRAMS.bit_length())
                  if channels % (1 << k) == 0 and channels >> k >= MIN_LANES and lanes(channels >> k) == channels >> k]
    if config.split_programs is not None:
        if config.split_programs not in candidates:
            return [], (f"split_programs={config.split_programs} does not cut {channels} channels into powers of "
                        f"two of at least {MIN_LANES} (possible: {candidates})")
        candidates = [config.split_programs]
    fitting = [parts for parts in candidates
               if _fits_one_program(_padded_sizes(cell.params, cell.split.params, parts), MAX_SPLIT_PARAMS)]
    if not fitting:
        return [], (f"no split of its {channels} channels into {candidates} programs fits {MAX_SPLIT_PARAMS} "
                    f"parameter numbers per program")
    return fitting, None


def split_block(cell: Cell, batch: int, config: dispatch.KernelConfig) -> int:
    """Rows per program of a split run of ``batch`` rows: ``KernelConfig.block_batch`` for a ``blockable`` cell;
    by default one row while ``batch`` rows of the fewest programs that fit are resident at once, and beyond
    that (a ``blockable`` cell) blocks of the cell's ``KernelPolicy.split_block`` rows while those are resident,
    else of :data:`DEFAULT_BLOCK_BATCH` rows.

    Measured on an H200 (Mamba H=128, N=16, 512 steps, µs per step): one row per program 9.4-10.9 at B=32 (4
    programs), blocks of 16 rows 16.9-20.2 there with 4-16 programs; blocks of 32 rows 29-517
    (``benchmarks/results/fused_mamba_block_split_h200.json``)."""
    return _rows_per_program(cell, batch, config, _fitting_programs(cell, config)[0])


def _rows_per_program(cell: Cell, batch: int, config: dispatch.KernelConfig, fitting: list) -> int:
    """:func:`split_block` given the split's ``fitting`` programs (:func:`_fitting_programs`)."""
    if not cell.blockable:
        return 1
    if config.block_batch is not None:
        return config.block_batch
    resident = resident_programs()
    if not fitting or batch * fitting[0] <= resident:
        return 1
    small = cell.policy.split_block
    if small is not None and -(-batch // small) * fitting[0] <= resident:
        return small
    return DEFAULT_BLOCK_BATCH


def split_programs(cell: Cell, batch: int, config: dispatch.KernelConfig) -> tuple[Optional[int], Optional[str]]:
    """``(P, None)``: the programs per row group (a row, or a block of :func:`split_block` rows) of a split run of
    ``cell``; ``(None, reason)`` when there is none. ``P`` is ``KernelConfig.split_programs``, or one of
    :func:`_fitting_programs` such that ``groups x P`` programs are resident at once: for rows and blocks of
    multiply-adds (fewer than ``dispatch.DOT_MIN_ROWS`` rows) the most (measured fastest, each program's share of
    the step shrinking with ``P``; H200, 512 steps, µs per step: Mamba (H=128, N=16) at B=1 13.2 / 5.7 / 5.2 with
    P = 4 / 8 / 16, RG-LRU (H=128) at B=1 7.3 / 5.5 with P = 4 / 8, in blocks of 8 rows at B=64 7.48 / 6.85), for
    blocks of dot rows the fewest (Mamba, blocks of 16 rows, P = 4 / 8 / 16: 17.3 / 18.9 / 20.0 at B=64, 17.8 /
    18.1 / 20.4 at B=128, 16.9 / 17.6 / - at B=256)."""
    fitting, reason = _fitting_programs(cell, config)
    if reason is not None:
        return None, reason
    resident = resident_programs()
    block = _rows_per_program(cell, batch, config, fitting)
    groups = -(-batch // block)
    resident_parts = [parts for parts in fitting if groups * parts <= resident]
    if not resident_parts:
        what = f"{batch} rows" if block == 1 else f"{groups} blocks of {block} rows"
        return None, (f"{what} x {min(fitting)} programs each: over the {resident} programs that can be "
                      f"resident at once (the programs of a row wait for each other every step)")
    return (max if block < dispatch.DOT_MIN_ROWS else min)(resident_parts), None


#: a row (or a block of fewer than ``dispatch.DOT_MIN_ROWS`` rows) split over at least this many programs reads the
#: ``P`` partials of an exchange in one load and one reduction; over fewer, one program's partial at a time
#: (:func:`one_load_exchange`). Measured on an H200
#: (512 steps, µs per step, one load / one at a time, the barrier exchange): Mamba (H=128, N=16) over 16 programs
#: at B=1 5.04-5.16 / 8.01-8.37, at B=8 5.18-5.41 / 9.68-10.2; over 4 at B=32 10.7-11.1 / 8.95-9.67; RG-LRU over
#: 8 at B=8 5.30-5.62 / 4.57-5.09 (``benchmarks/results/fused_one_load_s5_hoist_h200/``). A block of 2-8 rows
#: follows the rows' rule, not measured against one program's at a time. Again with the barrier spinning on loads
#: (``benchmarks/results/session15_h200/call5``), one load from 4 programs on: Mamba over 4 at B=32 10.6-10.7 against
#: 7.2-7.6, RG-LRU over 8 at B=1 4.7 against 3.8-4.1.
ONE_LOAD_MIN_PARTS = 16


def one_load_exchange(parts: int, block: int) -> bool:
    """Whether the programs of a split run over ``parts`` programs per group of ``block`` rows read an exchange's
    ``P`` partials in one load and one reduction (from :data:`ONE_LOAD_MIN_PARTS` programs on, for a row or a block
    of fewer than ``dispatch.DOT_MIN_ROWS`` rows), rather than one program's at a time (a block of dot rows: its
    ``P x rows`` partials would crowd the registers)."""
    return parts >= ONE_LOAD_MIN_PARTS and block < dispatch.DOT_MIN_ROWS


def split_num_warps(parts: int) -> int:
    """Warps of each program of a row split over ``parts`` programs: 4 from 8 programs on, 8 below.

    Measured on an H200 (512 steps, µs per step, warps 4 / 8 / 16): Mamba (H=128, N=16) at B=1 over 16 programs
    5.0 / 5.5 / 6.1, at B=32 over 4 programs 12.1 / 10.9 / 21.4; RG-LRU (H=128) at B=1 over 8 programs
    4.9 / 5.7 / 6.9, at B=32 over 4 programs 5.4 / 5.6 / 7.1 (``benchmarks/results/fused_split_warps_h200.json``).
    """
    return 4 if parts >= 8 else 8


def effective_block_batch(blockable: bool, batch: int, config: dispatch.KernelConfig) -> int:
    """Rows per program for a cell (``blockable``: it has the block path) under ``config``."""
    if not blockable:
        return 1
    if config.block_batch is not None:
        return config.block_batch
    return 1 if batch <= MAX_ROWS_PATH_BATCH else DEFAULT_BLOCK_BATCH


def _auto_num_warps(param_sizes: list, block: int, config: dispatch.KernelConfig, parts: Optional[int] = None,
                    policy: cells.KernelPolicy = cells.KernelPolicy()) -> int:
    """4 warps for a block of rows; for a split run the cell's ``policy.row_warps(parts)`` (one row per program),
    else :func:`split_num_warps`; for one row, enough warps to hold the parameters in registers (<= 16)."""
    if config.num_warps is not None:
        return config.num_warps
    if parts is not None:
        declared = policy.row_warps(parts) if block == 1 else None
        return split_num_warps(parts) if declared is None else declared
    if block > 1:
        return 4
    total = sum(param_sizes)
    return int(min(16, max(4, dispatch.next_power_of_two(-(-total // HOIST_PER_WARP)))))


def split_hoisted(param_sizes: list, num_warps: int, rule: str = "smallest") -> tuple[list, list]:
    """Indices of the parameter leaves kept in registers (up to ``num_warps * HOIST_PER_WARP`` numbers) and of
    those re-read every step, by ``rule`` (``KernelPolicy.hoist``): ``"smallest"`` leaves first, or
    ``"largest"``, the subset of largest total that fits (a 0/1 knapsack over the leaves' sizes: the fewest numbers
    re-read), and of those the one of most leaves (the fewest re-read tiles).

    Neither rule is faster for every cell (H200, BENCHMARKS.md section 9): the knapsack made S5 LTI 15-20 % faster
    (its dense skip held, a plane of ``C`` re-read) but S4D 1.7-2x slower (its 128 x 128 output matrix held) and
    RG-LRU and Mamba's split slower too, so ``"smallest"`` is the default and a cell declares ``"largest"``."""
    if rule not in cells.HOIST_RULES:
        raise ValueError(f"rule={rule!r}: expected one of {cells.HOIST_RULES}")
    capacity = num_warps * HOIST_PER_WARP
    if rule == "smallest":
        hoisted, total = [], 0
        for i in sorted(range(len(param_sizes)), key=lambda i: (param_sizes[i], i)):
            total += param_sizes[i]
            if total <= capacity:
                hoisted.append(i)
    else:
        best = {0: ()}  # a reachable total -> the subset of most leaves found with that total
        for i, size in enumerate(param_sizes):
            for total, chosen in sorted(best.items(), reverse=True):
                grown = total + size
                if grown <= capacity and (grown not in best or len(best[grown]) < len(chosen) + 1):
                    best[grown] = chosen + (i,)
        hoisted = list(best[max(best)])
    hoisted = sorted(hoisted)
    return hoisted, [i for i in range(len(param_sizes)) if i not in hoisted]


def run_cell(cell: Cell, state, x0, num_steps: int, row_inputs=None, step_inputs=None, *,
             config: dispatch.KernelConfig, xs=None, num_valid=None):
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
      num_valid: optional int32 scalar <= T: only that many steps run (the rest of
        the output is unspecified) and the state is the one after them.

    Returns:
      ``(ys, state)``: the outputs (float32) and the final state (per-row arrays as ``state``).

    Under a data-parallel mesh each device runs the kernel on its rows (:func:`pallas_kernels.dispatch.per_shard`).
    """

    def rows_here(params, state, x0, row_inputs, step_inputs, xs, num_valid):
        return _run_rows(cell._replace(params=params), state, x0, num_steps, row_inputs, step_inputs, config=config,
                         xs=xs, num_valid=num_valid)

    return dispatch.per_shard(rows_here, (cell.params, state, x0, row_inputs, step_inputs, xs, num_valid),
                              (None, 0, 0, 0, 0, 0, None), (0, 0))


def split_plan(cell: Cell, batch: int, config: dispatch.KernelConfig) -> tuple[Optional[int], Optional[str]]:
    """``(P, None)``: run ``cell`` split over ``P`` programs per row group (a row, or a block of :func:`split_block`
    rows); ``(None, None)``: not split; ``(None, reason)``:
    a split was needed (asked for by ``KernelConfig.split_programs``, or the parameters do not fit one program)
    and none fits.

    A cell with a :class:`~pallas_kernels.cells.Split` is split when its parameters exceed what one program keeps
    in registers (:data:`MAX_SPLIT_PARAMS`); where no split fits (e.g. too many rows to be resident), a cell
    whose parameters fit one program's limits runs unsplit, re-reading its larger parameters every step.
    """
    if cell.split is None:
        return None, None
    sizes = _padded_sizes(cell.params, {}, 1)
    if config.split_programs is None and _fits_one_program(sizes, MAX_SPLIT_PARAMS):
        return None, None
    parts, reason = split_programs(cell, batch, config)
    if parts is not None:
        return parts, None
    if config.split_programs is None and _fits_one_program(sizes, MAX_PARAMS):
        return None, None
    return None, f"parameters too large for one program, and split: {reason}"


def run_parts(cell: Cell, batch: int, config: dispatch.KernelConfig) -> Optional[int]:
    """Programs per row of the run: None (one program holds the whole cell) or ``P`` (a split run; 1 in interpret
    mode). Raises ValueError when the cell fits neither way (:func:`unsupported_reason` says so first)."""
    parts, reason = split_plan(cell, batch, config)
    if reason is not None:
        raise ValueError(f"the fused kernel cannot run this cell: {reason}")
    return None if parts is None else 1 if dispatch.interpret_mode(config) else parts


def _exchanges(cell: Cell, params, state, x, inputs, precision, parts: int) -> list:
    """The collectives one step of a split program calls, in order: each call's leaf shapes (traced abstractly on
    one program's padded slices; ``x`` ``(Hp,)`` for one row, ``(block, Hp)`` for a block)."""
    calls = []

    def recorder(scatter: bool):
        def collective(tree):
            calls.append([leaf.shape for leaf in jax.tree.leaves(tree)])
            return jax.tree.map(lambda a: a[..., :a.shape[-1] // parts], tree) if scatter else tree
        return collective

    comm = Collectives(recorder(False), recorder(True))
    if cell.split.splits_x:
        x = jax.ShapeDtypeStruct((*x.shape[:-1], lanes(cell.split.channels // parts)), x.dtype)
    jax.eval_shape(lambda p, h, v, i: cell.step(p, h, v, i, precision, comm=comm), params, state, x, inputs)
    return calls


def _run_rows(cell: Cell, state, x0, num_steps: int, row_inputs, step_inputs, *, config: dispatch.KernelConfig, xs,
              num_valid):
    """:func:`run_cell` on the rows of one device."""
    pl, plgpu = dispatch.pallas_modules()
    batch, H = x0.shape
    Hp = lanes(H)
    parts = run_parts(cell, batch, config)
    block = (split_block(cell, batch, config) if parts is not None
             else effective_block_batch(cell.blockable, batch, config))
    rows = -(-batch // block) * block
    interpret = dispatch.interpret_mode(config)
    precision = dispatch.block_precision(config, block)
    params = padded_params(cell, parts)
    pieces = set() if parts is None else set(cell.split.params)
    # a split run's state leaves: (B, P, *slice)
    kernel_state, state_lead = (state, 1) if parts is None else (cells.split_state(cell, state, parts), 2)
    groups = {
        "params": params,
        "state": jax.tree.map(lambda a: _pad_rows(_pad(a, state_lead), rows), kernel_state),
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
    # which parameter leaves are split (one program reads its slice) follows their top-level names, in the order
    # of the flattened parameters (a dict flattens by sorted key)
    split_leaf = jax.tree.leaves({name: jax.tree.map(lambda _, cut=name in pieces: cut, value)
                                  for name, value in params.items()})
    param_sizes = [a[0].size if cut else a.size for a, cut in zip(flat["params"], split_leaf)]
    num_warps = _auto_num_warps(param_sizes, block, config, parts, cell.policy)
    hoisted, streamed = split_hoisted(param_sizes, num_warps, cell.policy.hoist)
    x0p = _pad_rows(_pad(x0, 1), rows)
    n_state = len(flat["state"])
    exchanges = []
    if parts is not None:
        rows_axes = () if block == 1 else (block,)  # a program's rows: one (no axis) or a block
        one_program = lambda tree, lead: jax.tree.map(  # noqa: E731
            lambda a: jax.ShapeDtypeStruct((*rows_axes, *a.shape[lead:]), a.dtype), tree)
        exchanges = _exchanges(
            cell, jax.tree.unflatten(treedefs["params"], [jax.ShapeDtypeStruct(a.shape[int(cut):], a.dtype)
                                                          for a, cut in zip(flat["params"], split_leaf)]),
            one_program(groups["state"], 2), jax.ShapeDtypeStruct((*rows_axes, Hp), jnp.float32),
            {**one_program(groups["row"], 1), **one_program(groups["step"], 2)}, precision, parts)
    exchange_shapes = [shape for shapes in exchanges for shape in shapes]

    if parts is not None and cell.split.exchange not in cells.EXCHANGES:
        raise ValueError(f"Split.exchange={cell.split.exchange!r}: expected one of {cells.EXCHANGES}")
    tagged = parts is not None and cell.split.exchange == "tagged"
    # inputs that the kernel updates in place (their outputs follow ys and the state): a tagged split's exchange
    # arrays (2 slots x row groups x programs x 2 halves, from zero words), or a barrier split's counters (one per
    # row group, from zero)
    initial = ([jnp.zeros((2, rows // block, parts, 2, *shape), jnp.int32) for shape in exchange_shapes] if tagged
               else [] if parts is None else [jnp.zeros((rows // block,), jnp.int32)])
    operands = [x0p, *(flat[g][i] for g, i in order)]
    aliases = {len(operands) + i: 1 + n_state + i for i in range(len(initial))}
    operands += initial

    def body(x0_ref, *refs):
        ref = dict(zip(order, refs[:len(order)]))
        outputs = refs[len(order) + len(initial):]  # (the refs of the updated inputs are not used: their outputs are)
        ys_ref, state_out = outputs[0], outputs[1:1 + n_state]
        program = pl.program_id(0)
        zero = 0 * program  # traced: the ragged output lanes are masked, not bounds-checked
        lane_ok = jnp.arange(Hp) < H
        if block == 1:
            sel, ok = program, lane_ok
        else:
            start = program * block
            sel = pl.ds(start, block)
            ok = (start + jnp.arange(block) < batch)[:, None] & lane_ok[None, :]
        part, where_state = None, (sel,)
        if parts is not None:
            part = pl.program_id(1)
            where_state, ok = (sel, part), ok & (part == 0)  # every program of a row holds the same output
            updated = outputs[1 + n_state:]
            counter, buffers = (None, updated) if tagged else (updated[0], updated[1:])
            comm_of_step = _exchange_collectives(plgpu, pl, counter, buffers, exchanges, program, part, parts, zero,
                                                 interpret, tagged, one_load_exchange(parts, block))

        def param(i):
            return ref["params", i][part] if split_leaf[i] else ref["params", i][...]

        def step_input(x):
            """The step's ``x``: the program's slice of the split channels where the cell's split says so."""
            if parts is None or not cell.split.splits_x:
                return x
            width = lanes(cell.split.channels // parts)
            one_hot = jnp.arange(Hp)[:, None] == part * (cell.split.channels // parts) + jnp.arange(width)[None, :]
            return km.contract(x, one_hot.astype(jnp.float32), 0, precision)  # (width,) or (block, width)

        kept = {i: param(i) for i in hoisted}
        x = x0_ref[sel]
        state = [ref["state", i][where_state] for i in range(n_state)]
        rows_in = [ref["row", i][sel] for i in range(len(flat["row"]))]

        def loop(t, carry):
            x, state = carry
            if xs is not None:
                x = ref["xs", 0][sel, t]
            p = [kept[i] if i in kept else param(i) for i in range(len(param_sizes))]
            inputs = jax.tree.unflatten(treedefs["row"], rows_in)
            per_step = jax.tree.unflatten(treedefs["step"], [ref["step", i][sel, t] for i in range(len(flat["step"]))])
            options = {} if parts is None else {"comm": comm_of_step(t)}
            y, new_state = cell.step(jax.tree.unflatten(treedefs["params"], p),
                                     jax.tree.unflatten(treedefs["state"], state), step_input(x),
                                     {**inputs, **per_step}, precision, **options)
            plgpu.store(ys_ref.at[sel, t, pl.ds(zero, Hp)], y, mask=ok)
            return y, jax.tree.leaves(new_state)

        count = ref["count", 0][0] if num_valid is not None else num_steps
        _, state = jax.lax.fori_loop(0, count, loop, (x, state))
        for i in range(n_state):
            state_out[i][where_state] = state[i]

    out_shape = [
        jax.ShapeDtypeStruct((batch, num_steps, H), jnp.float32),
        *(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in flat["state"]),
        *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in initial),
    ]
    if parts is not None and not tagged:  # a barrier split's exchange arrays (2 slots)
        out_shape += [jax.ShapeDtypeStruct((2, rows // block, parts, *shape), jnp.float32) for shape in exchange_shapes]
    call = pl.pallas_call(
        body,
        out_shape=tuple(out_shape),
        grid=(rows // block,) if parts is None else (rows // block, parts),
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        name=OP,
    )
    ys, *final = call(*operands)[:1 + n_state]
    final = [f[:batch] for f in final]
    if parts is not None:
        final = jax.tree.leaves(cells.join_state(cell, jax.tree.unflatten(treedefs["state"], final)))
    final = [f[tuple(slice(0, d) for d in a.shape)] for f, a in zip(final, jax.tree.leaves(state))]
    return ys, jax.tree.unflatten(treedefs["state"], final)


#: an exchange word is 16 bits of a float32 partial (its high or its low half) below a 16-bit tag, the exchange's
#: number (:func:`exchange_tag`): a reader knows a word is written when its tag is the one it expects
TAG_SHIFT = 16
HALF_MASK = (1 << TAG_SHIFT) - 1
#: tags cycle through 1 .. TAG_PERIOD (never 0, the exchange arrays' initial words)
TAG_PERIOD = 1 << 14


def exchange_tag(number):
    """The tag of the ``number``-th exchange of a rollout (int32, in ``1 .. TAG_PERIOD``). Slot ``number % 2`` last
    held exchange ``number - 2``, whose tag differs."""
    return (number & (TAG_PERIOD - 1)) + 1


def tagged_words(value, tag):
    """float32 ``value (...)`` -> int32 words ``(high, low)``, each 16 of its bits below ``tag``: every word is
    written whole by one 32-bit store, so a reader that sees ``tag`` in a word sees its bits."""
    bits = jax.lax.bitcast_convert_type(value, jnp.int32)
    stamp = jax.lax.shift_left(tag, TAG_SHIFT)
    return jax.lax.shift_right_logical(bits, TAG_SHIFT) | stamp, (bits & HALF_MASK) | stamp


def word_tag(word):
    """The tag of int32 exchange words."""
    return jax.lax.shift_right_logical(word, TAG_SHIFT)


def untagged_value(high, low):
    """The inverse of :func:`tagged_words`: the float32 value, bit for bit."""
    return jax.lax.bitcast_convert_type(jax.lax.shift_left(high, TAG_SHIFT) | (low & HALF_MASK), jnp.float32)


def _exchange_collectives(plgpu, pl, counter_ref, buffers, exchanges, row, part, parts: int, zero, interpret: bool,
                          tagged: bool, at_once: bool):
    """``comm_of_step(t) -> Collectives`` of a split program (of row group ``row``: one row, or a block of rows).

    The ``n``-th exchange of the rollout writes the program's partial sums to slot ``n % 2`` of its exchange arrays,
    waits for the group's other programs, and reads the ``P`` partials back (volatile loads: strong, served by L2,
    never by the incoherent L1): all at once, in one load and one reduction (``at_once``,
    :func:`one_load_exchange`), or one program's at a time, added in program order. Every program reduces the same
    words in the same order, so all hold the same bits. The wait is the cell's ``Split.exchange``:

    * ``"barrier"`` (``tagged`` False): the partials as float32, then barrier ``n``: a CTA barrier, an
      acquire-release atomic add to the group's counter (``counter_ref``), a spin on volatile loads of it until all
      ``P`` programs arrived, a CTA barrier. The spin loads instead of adding 0 atomically: on an H200 that made
      Mamba's split 11-19 % faster per step and RG-LRU's at B=1 24 % (BENCHMARKS.md section 10, the fifteenth session);
    * ``"tagged"``: the partials as tagged words (:func:`tagged_words`, tag :func:`exchange_tag` ``(n)``; no
      fence, atomic or counter: each word says itself that it is written, the low-latency protocol of NCCL's LL
      transport in 32-bit words). The reader spins until each program's last word carries the tag, then checks
      that all their words do (else spins again), then loads them. Every load indexes from the result of the loop
      before it (0): JAX drops a ``while`` loop whose results are unused and whose body has no effect (a volatile
      load is none), so an untied wait vanished from the kernel (on an H200 the partials were then read before
      they were written); so do the barrier's, from its spin's result. With the words summed inside the
      checking loop instead of loaded again, Triton crashed while compiling the kernel for 16 programs.

    Two slots suffice: a program writes slot ``n % 2`` again at exchange ``n + 2``, after every program of the group
    has reached exchange ``n + 1``, which each does after reading slot ``n`` (the CTA barrier before a tagged
    program's writes makes that hold for every one of its threads)."""
    per_call = []
    for shapes in exchanges:
        per_call.append(buffers[:len(shapes)])
        buffers = buffers[len(shapes):]

    def comm_of_step(t):
        calls = iter(range(len(exchanges)))

        def exchange(tree, scatter: bool):
            k = next(calls)
            number = t * len(exchanges) + k
            slot = number & 1  # (a remainder of weak-typed integers does not lower to Triton)
            leaves, treedef = jax.tree.flatten(tree)
            indices = []  # the lanes of each leaf the program reads: all, or (psum_scatter) its own
            for leaf in leaves:
                lanes_index = ()
                if scatter:
                    width = leaf.shape[-1] // parts
                    lanes_index = (*(slice(None),) * (leaf.ndim - 1), pl.ds(part * width, width))
                indices.append(lanes_index)
            # (traced indices throughout: a Python int does not index a Triton ref)
            if tagged:
                read = _tagged_wait(plgpu, pl, per_call[k], leaves, indices, number, slot, row, part, parts, zero,
                                    interpret, at_once)
            else:
                read = _barrier_wait(plgpu, pl, counter_ref, per_call[k], leaves, number, slot, row, part, parts, zero,
                                     interpret)
            summed = []
            for buffer, lanes_index in zip(per_call[k], indices):
                if at_once:
                    summed.append(jnp.sum(read(buffer, None, lanes_index), axis=0))
                    continue
                total = None
                for other in range(parts):
                    value = read(buffer, other, lanes_index)
                    total = value if total is None else total + value
                summed.append(total)
            return jax.tree.unflatten(treedef, summed)

        return Collectives(lambda tree: exchange(tree, False), lambda tree: exchange(tree, True))

    return comm_of_step


def _barrier_wait(plgpu, pl, counter_ref, buffers, leaves, number, slot, row, part, parts, zero, interpret):
    """The ``"barrier"`` exchange (:func:`_exchange_collectives`): writes, waits; returns ``read(buffer, other,
    lanes_index)``, program ``other``'s partial (``other`` None: all of them)."""
    for leaf, buffer in zip(leaves, buffers):
        buffer[slot, row, part] = leaf
    if not interpret:
        plgpu.debug_barrier()  # every thread's partial is written before the release below
    arrived = plgpu.atomic_add(counter_ref, (row,), zero + 1) + 1  # acquire-release, GPU scope
    target = (number + 1) * parts
    seen = jax.lax.while_loop(lambda seen: seen < target,
                              lambda seen: plgpu.load(counter_ref.at[row], volatile=True), arrived)
    base = jnp.minimum(seen - target, 0)  # 0, from the spin's result: the reads wait for it, and the spin is kept
    if not interpret:
        plgpu.debug_barrier()
    return lambda buffer, other, lanes_index: plgpu.load(
        buffer.at[(slot, row, _programs(pl, other, base, parts), *lanes_index)], volatile=True)


def _tagged_wait(plgpu, pl, buffers, leaves, indices, number, slot, row, part, parts, zero, interpret, at_once):
    """The ``"tagged"`` exchange (:func:`_exchange_collectives`): writes, waits (checking the words of all
    programs in one load per leaf and half when ``at_once``, else one program's at a time); returns ``read(buffer,
    other, lanes_index)``, program ``other``'s partial (``other`` None: all of them)."""
    tag = exchange_tag(number)
    if not interpret:
        plgpu.debug_barrier()  # every thread of the program has read slot n - 2
    for leaf, buffer in zip(leaves, buffers):
        for half, word in enumerate(tagged_words(leaf, tag)):
            buffer[slot, row, part, zero + half] = word

    def sentinels_unwritten(_):
        """Whether a program's last word written (the low half of its last leaf's first number) lacks the tag: the
        cheap wait, one word per program."""
        first = (zero,) * leaves[-1].ndim
        sentinels = plgpu.load(buffers[-1].at[(slot, row, pl.ds(zero, parts), zero + 1, *first)], volatile=True)
        return jnp.max((word_tag(sentinels) != tag).astype(jnp.int32))

    def words(buffer, other, half, lanes_index, base):
        return plgpu.load(buffer.at[(slot, row, _programs(pl, other, base, parts), base + half, *lanes_index)],
                          volatile=True)

    def unwritten(_):
        """Wait for the sentinels, then whether any word lacks the tag (one reduction per leaf shape)."""
        base = jax.lax.while_loop(lambda count: count > 0, sentinels_unwritten, zero + 1)
        stale = {}
        for buffer, lanes_index in zip(buffers, indices):
            for other in [None] if at_once else range(parts):
                for half in (0, 1):
                    wrong = word_tag(words(buffer, other, half, lanes_index, base)) != tag
                    stale[wrong.shape] = wrong | stale[wrong.shape] if wrong.shape in stale else wrong
        return sum((jnp.max(mask.astype(jnp.int32)) for mask in stale.values()), zero)

    settled = jax.lax.while_loop(lambda count: count > 0, unwritten, zero + 1)
    return lambda buffer, other, lanes_index: untagged_value(
        *(words(buffer, other, half, lanes_index, settled) for half in (0, 1)))


def _programs(pl, other, base, parts):
    """The index of program ``other``'s partial in an exchange array, or (``other`` None) of all ``parts``."""
    return pl.ds(base, parts) if other is None else base + other


# ----------------------------------------------------------------------------- support
def unsupported_reason(cell: Cell, batch_size: int, dtype=None,
                       config: Optional[dispatch.KernelConfig] = None) -> Optional[str]:
    """None when :func:`run_cell` can run ``cell`` for ``batch_size`` rows of ``dtype`` inputs, else why not.

    The reasons: inputs or parameters of a dtype other than float32, and parameters
    that do not fit on chip (a padded tile over :data:`MAX_TILE` numbers or a total
    over :data:`MAX_PARAMS`) when the cell has no split that fits (:func:`split_programs`
    under ``config``, the default when None). Works on abstract cells (under ``jax.eval_shape``).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        return f"batch_size={batch_size!r} (expected a positive integer)"
    if dtype is not None and jnp.dtype(dtype) != jnp.float32:
        return f"inputs of dtype {jnp.dtype(dtype).name} (the fused kernels run in float32)"
    leaves = jax.tree.leaves(cell.params)
    wide = [leaf.dtype for leaf in leaves if leaf.dtype != jnp.float32]
    if wide:
        return f"parameters of dtype {jnp.dtype(wide[0]).name} (the fused kernels take float32 parameters)"
    parts, reason = split_plan(cell, int(batch_size), dispatch.resolve(config))
    if parts is not None or reason is not None:
        return reason
    sizes = _padded_sizes(cell.params, {}, 1)
    if not _fits_one_program(sizes, MAX_PARAMS):
        return (f"parameters too large for one program: {sum(sizes)} padded numbers (largest tile {max(sizes)}) over "
                f"the on-chip limits of {MAX_TILE} per tile and {MAX_PARAMS} in total")
    return None


def model_unsupported_reason(model, batch_size: int, event_mode: bool, dtype=None,
                             config: Optional[dispatch.KernelConfig] = None) -> Optional[str]:
    """:func:`unsupported_reason` of ``model``'s cell (traced abstractly: nothing is computed), or a
    model-level reason: event mode without ``integration_timesteps`` support, active dropout."""
    name = type(model).__name__
    if event_mode and not getattr(model, "supports_integration_timesteps", False):
        return f"event mode on {name}, which has no integration_timesteps"
    refusal = model.kernel_refusal()  # the model protocol (lrnnx_jax.core.base.LRNN): e.g. active dropout
    if refusal is not None:
        return refusal
    reason = unsupported_reason(abstract_cell(model), batch_size, dtype, config)
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
    reason = model_unsupported_reason(model, batch_size, event_mode, dtype, config)
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
    config = dispatch.resolve(config)
    reason = model_unsupported_reason(model, x0.shape[0], taus is not None, config=config)
    if reason is not None:
        raise ValueError(f"fused_generate does not support {reason}; use lrnnx_jax.generation.generate")
    leaves, treedef = jax.tree.flatten(model)
    return _rollout(treedef, num_steps, config, leaves, x0, taus)


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
    (ys (B, chunk_size, H), x_next, cache)``, with ``taus (B, chunk_size)`` or None.
    It runs ``num_valid`` steps from ``cache`` and returns the state after them.
    """
    chunk = spec.chunk_size

    def fused_generation_program(leaves, x, cache, taus, num_valid):
        model = jax.tree.unflatten(spec.treedef, leaves)
        ys, cache = model_rollout(model, x, cache, taus, chunk, spec.kernels, num_valid=num_valid)
        x_next = jax.lax.dynamic_index_in_dim(ys, num_valid - 1, axis=1, keepdims=False)
        return ys, x_next, cache

    return fused_generation_program
