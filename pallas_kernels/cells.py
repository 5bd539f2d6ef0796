"""Cells: each model's recurrence step, written once, and the XLA drivers that run it.

A model describes its single step as a :class:`Cell`:

* ``params``: its parameters in the layout the kernels take (a dict pytree of real
  arrays; complex values as :class:`~pallas_kernels.complex_lib.Planes`, built with
  :func:`pallas_kernels.complex_lib.split`), unpadded;
* ``step(params, state, x, inputs, precision) -> (y, new_state)``: one pure function
  written only with operations that lower in Pallas (elementwise ``jnp``, reductions,
  :func:`pallas_kernels.kernel_math.contract` and the activations of
  :mod:`pallas_kernels.kernel_math`). ``x (..., H)``, ``state`` and ``inputs`` (dict
  pytrees of per-row values) carry the same leading row axes: none for one row (a
  kernel program), ``(R,)`` for a block of rows (the batch in the XLA drivers). The
  contractions of a block run at ``precision`` (the XLA drivers pass
  :class:`~pallas_kernels.kernel_math.Precisions`: :func:`~pallas_kernels.kernel_math.contract` for
  the SSM's own contractions, :func:`~pallas_kernels.kernel_math.project` for dense projections);
* ``pad_values``: the value padded lanes of a parameter take in the kernels (0 unless
  named: e.g. a nonzero ``A`` where a discretization divides by it);
* ``blockable``: whether the kernel may give a program a block of rows (tensor-core dots; a split
  run takes blocks where one row per program would not be resident, or when ``KernelConfig.block_batch``
  asks for them);
* ``policy``: a :class:`KernelPolicy`, where ``use_kernels="auto"`` runs the kernels;
* ``split``: a :class:`Split` when the step can run with its channels split over several
  programs (parameters too large for one; :func:`pallas_kernels.fused_generation.run_cell`). The step then
  takes a keyword ``comm`` (:class:`Collectives`; :data:`UNSPLIT` by default) and reduces
  over the channels only through ``comm.psum`` / ``comm.psum_scatter``.

The model maps its inference cache to the cell's state and back, and turns
``integration_timesteps`` (and, in training mode, dropout masks) into the per-token
``inputs`` (the model protocol of ``lrnnx_jax.core.base.LRNN``: ``cell``,
``cell_state``, ``cell_cache``, ``cell_inputs``).

Every execution path is a driver over that one function and knows no model:

* :func:`xla_step`: the batch as one block, in XLA (``model.step`` off-GPU);
* :func:`xla_multi_step`: T given tokens from a state, every output and optionally every
  state (``model.multi_step``, the base of speculative verification);
* :func:`pallas_kernels.fused_generation.run_cell`: the fused Pallas rollout (closed loop
  or given inputs), and with one step the one-step kernel of ``model.step``;
* :mod:`pallas_kernels.drivers` chooses between them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels import kernel_math as km

#: the dots of the XLA drivers (the batch as a block): the SSM's contractions at float32 accuracy on every
#: platform, the dense projections at JAX's default matmul precision (as in the models' forwards; TF32 on
#: NVIDIA GPUs unless ``jax.default_matmul_precision`` says otherwise)
XLA_PRECISION = km.Precisions(state=jax.lax.Precision.HIGHEST, projection=None)


@dataclasses.dataclass(frozen=True)
class KernelPolicy:
    """Where ``use_kernels="auto"`` runs a cell's kernels on an NVIDIA GPU, and which parameters they hold in
    registers: data each cell declares, with the measurements behind it.

    Attributes:
      rollout_max_batch: the fused rollout (``generate``) for batches up to this size;
        None: every batch; 0: never (the compile-once XLA program was measured faster).
      step_max_batch: the same for the one-step kernel of ``model.step`` and the
        multi-token kernel of ``model.multi_step``.
      evidence: the measurement behind these numbers (device, sizes, times).
      xla_unroll: the ``unroll`` of the XLA generation program on an accelerator where
        ``GenerationConfig.unroll`` is None; None: ``lrnnx_jax.generation.ACCELERATOR_UNROLL``.
        A cell whose step is long sets a smaller one: it compiles faster (the program
        holds about ``5 * unroll`` copies of the step) for the same speed; say so in
        ``evidence``.
      hoist: which parameter leaves a fused kernel's program keeps in registers for the whole
        rollout when they do not all fit (one of :data:`HOIST_RULES`; the others are re-read every
        step; :func:`pallas_kernels.fused_generation.split_hoisted`): ``"smallest"`` first, or the
        ``"largest"`` total that fits (the fewest numbers re-read). Neither is faster for every
        cell; a cell that takes ``"largest"`` says why in ``evidence``.
      split_block: rows per program of a split run whose rows, one per program, would not all be
        resident: None, blocks of ``pallas_kernels.fused_generation.DEFAULT_BLOCK_BATCH`` rows
        (tensor-core dots); a smaller power of two (multiply-adds, ``dispatch.MULTIPLY_ADD``) where
        those blocks are resident, then the default. Say why in ``evidence``.
      split_row_warps: ``((P, warps), ...)``: the warps of each program of a split run over ``P`` programs per row
        that gives each program one row; at a ``P`` it does not name (and for blocks of rows),
        ``pallas_kernels.fused_generation.split_num_warps``'s rule. Say why in ``evidence``.
    """

    rollout_max_batch: Optional[int] = None
    step_max_batch: Optional[int] = None
    evidence: str = ""
    xla_unroll: Optional[int] = None
    hoist: str = "smallest"
    split_block: Optional[int] = None
    split_row_warps: tuple = ()

    def __post_init__(self):
        if self.hoist not in HOIST_RULES:
            raise ValueError(f"KernelPolicy.hoist={self.hoist!r}: expected one of {HOIST_RULES}")
        if self.split_block is not None:
            dispatch.check_power_of_two("KernelPolicy.split_block", self.split_block, 2, "None or ")
        if not isinstance(self.split_row_warps, tuple) or not all(
                isinstance(pair, tuple) and len(pair) == 2 for pair in self.split_row_warps):
            raise ValueError(f"KernelPolicy.split_row_warps must be a tuple of (programs per row, warps) pairs, got "
                             f"{self.split_row_warps!r}")
        for parts, warps in self.split_row_warps:
            dispatch.check_power_of_two("KernelPolicy.split_row_warps' programs per row", parts, 1)
            dispatch.check_power_of_two("KernelPolicy.split_row_warps' warps", warps, 1)

    def row_warps(self, parts: int) -> Optional[int]:
        """The warps :attr:`split_row_warps` gives a program of a row split over ``parts`` programs (None: not
        named)."""
        return dict(self.split_row_warps).get(parts)

    def slower_reason(self, path: str, batch: int) -> Optional[str]:
        """None when ``"auto"`` takes the kernel of ``path`` (``"rollout"`` or ``"step"``) at ``batch``."""
        limit = self.rollout_max_batch if path == "rollout" else self.step_max_batch
        if limit is None or batch <= limit:
            return None
        return f"batch {batch} above {limit} for the {path} kernel ({self.evidence})"


class Split(NamedTuple):
    """How a cell's step splits over ``P`` programs along a channel axis of size ``channels``.

    Attributes:
      channels: the size of the split axis (e.g. Mamba's ``d_inner``); each program holds
        ``channels / P`` consecutive channels.
      params: ``{name: axis}`` of the parameters split along that axis (their other axes
        whole); every other parameter is held whole by every program.
      state: ``{name: axis}`` of the per-row state leaves split along it (axis of the
        per-row leaf, without the row axes); every state leaf must be named.
      splits_x: whether each program's step reads only its slice of the step input ``x``
        (``x`` has the split channels as its features, e.g. S4 without an input layer); the
        drivers hand it that slice (a one-hot selection in the kernel). False: the whole ``x``.
      exchange: how the kernel's programs exchange their partial sums (one of :data:`EXCHANGES`; see
        :func:`pallas_kernels.fused_generation._exchange_collectives`): ``"barrier"``, an acquire-release
        atomic arrival at a counter per row group and a spin on loads of it, or ``"tagged"``, words that
        carry the exchange's number (no fence or atomic). Neither is faster for every cell: the cell
        declares the one measured faster for it.
    """

    channels: int
    params: dict
    state: dict
    splits_x: bool = False
    exchange: str = "barrier"


#: the values of ``Split.exchange``
EXCHANGES = ("barrier", "tagged")

#: the values of ``KernelPolicy.hoist``
HOIST_RULES = ("smallest", "largest")


class Collectives(NamedTuple):
    """The reductions over the programs of a split step (identity when unsplit).

    ``psum(tree)``: every leaf summed over the programs, the whole sum on each. ``psum_scatter(tree)``:
    every leaf ``(..., channels)`` summed over the programs, each keeping its own ``channels / P``
    lanes (the split channels). One call exchanges its whole tree at once.
    """

    psum: Callable
    psum_scatter: Callable


def _identity(tree):
    return tree


#: the collectives of an unsplit step
UNSPLIT = Collectives(_identity, _identity)


class Cell(NamedTuple):
    """One model's step; see the module docstring."""

    step: Callable
    params: Any
    pad_values: dict = {}
    blockable: bool = False
    policy: KernelPolicy = KernelPolicy()
    split: Optional[Split] = None


def split_along(a, axis: int, parts: int):
    """``a`` split into ``parts`` equal pieces along ``axis``, stacked first: ``(parts, *piece)``."""
    axis %= a.ndim
    shape = a.shape[:axis] + (parts, a.shape[axis] // parts) + a.shape[axis + 1:]
    return jnp.moveaxis(a.reshape(shape), axis, 0)


def join_along(a, axis: int):
    """The inverse of :func:`split_along`: ``(parts, *piece)`` -> the pieces concatenated along ``axis``."""
    axis %= a.ndim - 1
    moved = jnp.moveaxis(a, 0, axis)
    return moved.reshape(moved.shape[:axis] + (-1,) + moved.shape[axis + 2:])


def split_params(cell: Cell, parts: int) -> dict:
    """The cell's parameters as each of ``parts`` programs holds them: split ones ``(parts, *piece)``, the
    others whole (by top-level name; every array of a split name's tree, e.g. both planes of a ``Planes``, is cut
    along the name's axis)."""
    return {name: (jax.tree.map(lambda a, axis=cell.split.params[name]: split_along(a, axis, parts), value)
                   if name in cell.split.params else value)
            for name, value in cell.params.items()}


def split_state(cell: Cell, state: dict, parts: int, row_axes: int = 1) -> dict:
    """Per-row state arrays ``(B, *leaf)`` -> ``(B, parts, *piece)`` (the split axis of each top-level name, for
    every array of its tree)."""
    return {name: jax.tree.map(lambda a, axis=row_axes + cell.split.state[name]: jnp.moveaxis(
                split_along(a, axis, parts), 0, row_axes), value)
            for name, value in state.items()}


def join_state(cell: Cell, state: dict, row_axes: int = 1) -> dict:
    """The inverse of :func:`split_state`."""
    return {name: jax.tree.map(lambda a, axis=row_axes + cell.split.state[name]: join_along(
                jnp.moveaxis(a, row_axes, 0), axis), value)
            for name, value in state.items()}


def xla_split_step(cell: Cell, state, x, inputs, parts: int):
    """One step of the batch with the cell split over ``parts`` programs, emulated by ``jax.vmap`` over the
    programs with ``lax.psum`` / ``lax.psum_scatter``: the reference of the split kernel's arithmetic.

    Same arguments and results as :func:`xla_step` (whole state in, whole state out).
    """
    axis = "split_programs"
    comm = Collectives(lambda tree: jax.lax.psum(tree, axis),
                       lambda tree: jax.tree.map(
                           lambda a: jax.lax.psum_scatter(a, axis, scatter_dimension=a.ndim - 1, tiled=True), tree))
    params = split_params(cell, parts)
    whole = {name: value for name, value in params.items() if name not in cell.split.params}
    pieces = {name: value for name, value in params.items() if name in cell.split.params}

    def one_program(pieces, state, x):
        return cell.step({**whole, **pieces}, state, x, inputs, XLA_PRECISION, comm=comm)

    xs, x_axis = (split_along(x, -1, parts), 0) if cell.split.splits_x else (x, None)
    ys, new_state = jax.vmap(one_program, in_axes=(0, 1, x_axis), out_axes=(0, 1), axis_name=axis)(
        pieces, split_state(cell, state, parts), xs)
    return ys[0], join_state(cell, new_state)


def xla_step(cell: Cell, state, x, inputs):
    """One step of the whole batch as one block: ``x (B, H)``, ``state``/``inputs`` per row ``(B, ...)``.

    Returns ``(y (B, H), new_state)``.
    """
    return cell.step(cell.params, state, x, inputs, XLA_PRECISION)


def xla_multi_step(cell: Cell, state, xs, inputs, return_states: bool = False):
    """T given tokens from ``state``: ``xs (B, T, H)``, ``inputs`` per token ``(B, T, ...)``.

    Returns ``(ys (B, T, H), final_state, states)``: ``states`` holds the state after
    every token (each leaf ``(B, T, ...)``) when ``return_states``, else None.
    """

    def one(state, token):
        x_t, inputs_t = token
        y_t, state = xla_step(cell, state, x_t, inputs_t)
        return state, (y_t, state if return_states else None)

    time_major = lambda tree: jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), tree)  # noqa: E731
    final, (ys, states) = jax.lax.scan(one, state, (jnp.moveaxis(xs, 1, 0), time_major(inputs)))
    batch_major = lambda tree: jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1), tree)  # noqa: E731
    return jnp.moveaxis(ys, 0, 1), final, (batch_major(states) if return_states else None)
