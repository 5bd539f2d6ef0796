"""Pallas GPU kernels of lrnnx_jax: the cells' drivers and two standalone state-update ops.

* :mod:`pallas_kernels.cells`: each model writes its recurrence step once, as a
  :class:`~pallas_kernels.cells.Cell` (parameters in the kernel layout and one pure step
  function); :mod:`pallas_kernels.drivers` runs it: the XLA drivers (the batch as one
  block; T given tokens) or :func:`pallas_kernels.fused_generation.run_cell`, the fused
  Pallas kernel (the whole rollout of ``generate``, the one-step kernel of ``model.step``,
  the multi-token kernel of ``model.multi_step``). A cell too large for one program (Mamba,
  RG-LRU, S4) declares a :class:`~pallas_kernels.cells.Split` and runs each row on several programs
  that exchange partial sums every step (``cells.Collectives``). The models' ``step`` methods run their
  cells through these drivers; they do not call the ops below.
* :func:`selective_state_update` (Mamba's signature: a real diagonal state, per-token
  ``dt``, ``B``, ``C``) and :func:`simplified_state_update` (a diagonal complex SSM: S5,
  LRU, S4D, Centaurus): array-level decode steps for users' own loops, each a Pallas kernel
  with its pure-JAX reference.
* :func:`checkpointing_ssu`: the multi-token verify step of speculative decoding (FlashInfer's
  checkpointed replay: replay the accepted drafts onto a checkpoint, run the new drafts, commit
  the replayed state), a Pallas kernel with its pure-JAX reference. The package attribute is the
  function; its module (``reference``, ``kernel``, the shared math) is reached with
  ``from pallas_kernels.checkpointing_ssu import ...``.
* :mod:`pallas_kernels.selective_scan`: the selective scan of training (Mamba's forward and backward
  over a sequence), a Pallas kernel pair under ``jax.custom_vjp`` with its pure-JAX reference. The
  package attribute is the module (the op is ``pallas_kernels.selective_scan.selective_scan``).
* :mod:`pallas_kernels.diagonal_scan`: the diagonal linear recurrence ``h_t = a_t h_{t-1} + b_t`` of training
  (RG-LRU, S7, S5, LRU, S4D, Centaurus), real or complex, forward and backward kernels under ``jax.custom_vjp``
  with its pure-JAX reference (the op is ``pallas_kernels.diagonal_scan.diagonal_scan``).
* :class:`KernelConfig` holds every kernel knob; :func:`get_config`, :func:`set_config` and
  :func:`kernel_config` read and change the default used where ``config=None``
  (:mod:`pallas_kernels.dispatch`).

Importing the package never needs a GPU or Pallas (kernels are built on first use), and it
imports nothing from ``lrnnx_jax``.
"""

from pallas_kernels import cells, diagonal_scan, drivers, selective_scan
from pallas_kernels.checkpointing_ssu import SSUCaches, checkpointing_ssu
from pallas_kernels.complex_lib import Planes
from pallas_kernels.dispatch import KernelConfig, get_config, kernel_config, set_config
from pallas_kernels.selective import selective_state_update
from pallas_kernels.simplified import simplified_state_update

__all__ = [
    "KernelConfig",
    "Planes",
    "SSUCaches",
    "cells",
    "checkpointing_ssu",
    "diagonal_scan",
    "drivers",
    "get_config",
    "kernel_config",
    "selective_scan",
    "selective_state_update",
    "set_config",
    "simplified_state_update",
]
