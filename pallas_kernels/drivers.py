"""The dispatch point of the cell drivers: the Pallas kernel or the XLA driver, for one step or T tokens.

:func:`step` runs ``model.step``'s cell: the one-step fused kernel
(:func:`pallas_kernels.fused_generation.run_cell` with one step: one row per program, or blocks of
rows for large batches of cells that declare a block path)
or :func:`pallas_kernels.cells.xla_step` (the batch as one block).
:func:`multi_step` runs T given tokens: the fused kernel with given inputs, or
:func:`pallas_kernels.cells.xla_multi_step`, which also returns every token's state.
The choice is :func:`pallas_kernels.dispatch.choose_kernel` on the cell's support
(:func:`pallas_kernels.fused_generation.unsupported_reason`) and its declared
:class:`~pallas_kernels.cells.KernelPolicy`.
"""

from __future__ import annotations

from typing import Optional

from pallas_kernels import cells, dispatch
from pallas_kernels import fused_generation as fg

STEP_OP = "fused_step"
MULTI_STEP_OP = "fused_multi_step"


def _use_kernel(op: str, cell: cells.Cell, batch: int, dtype, config: dispatch.KernelConfig,
                model_reason: Optional[str]) -> bool:
    reason = model_reason or fg.unsupported_reason(cell, batch, dtype, config)
    slower = None if reason is not None else cell.policy.slower_reason("step", batch)
    return dispatch.choose_kernel(op, reason, config, slower, batch=batch)


def step(cell: cells.Cell, state, x, inputs, config: dispatch.KernelConfig, model_reason: Optional[str] = None):
    """One step of the batch: ``x (B, H)``, ``state`` and ``inputs`` per row ``(B, ...)``.

    ``model_reason``: why the model cannot run on a kernel (e.g. active dropout), or None.
    Returns ``(y (B, H), new_state)``.
    """
    if _use_kernel(STEP_OP, cell, x.shape[0], x.dtype, config, model_reason):
        ys, state = fg.run_cell(cell, state, x, 1, inputs, config=config)
        return ys[:, 0], state
    return cells.xla_step(cell, state, x, inputs)


def multi_step(cell: cells.Cell, state, xs, inputs, config: dispatch.KernelConfig, *, return_states: bool = False,
               model_reason: Optional[str] = None):
    """T given tokens from ``state``: ``xs (B, T, H)``, ``inputs`` per token ``(B, T, ...)``.

    Returns ``(ys (B, T, H), final_state, states)`` as :func:`pallas_kernels.cells.xla_multi_step`
    (``states`` only with ``return_states``, which runs the XLA driver: the kernel keeps the
    state on chip).
    """
    batch, T = xs.shape[:2]
    if not return_states and _use_kernel(MULTI_STEP_OP, cell, batch, xs.dtype, config, model_reason):
        ys, state = fg.run_cell(cell, state, xs[:, 0], T, step_inputs=inputs, config=config, xs=xs)
        return ys, state, None
    return cells.xla_multi_step(cell, state, xs, inputs, return_states)
