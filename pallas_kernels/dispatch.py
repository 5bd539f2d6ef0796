"""The switch between the Pallas kernels and their pure-JAX references, and the one kernel configuration.

One frozen :class:`KernelConfig` holds every kernel knob. It reaches the kernels and
the drivers as a static (hashable) argument: every function of the library that
runs a kernel takes ``config=`` (``model.step``, ``model.multi_step``,
``generate``/``capture_graph``, the array-level ops), and a compiled program is keyed
by the configuration it was traced under. When ``config`` is None, the convenience
default (:func:`get_config`) is read at that call, outside any ``jax.jit`` of the
library; :func:`set_config` and the context manager :func:`kernel_config` change that
default and never clear JAX's caches, so no unrelated compiled function is traced
again. (Inside a user's own ``jax.jit``, the default is read when that function is
traced, like any Python value it closes over: pass ``config=`` to choose per call.)

``use_kernels``:

* ``"auto"`` (default): the kernel on an NVIDIA GPU where it supports the arguments
  and where the cell (or op) declares it measured faster; otherwise the reference
  (silently off-GPU, with a warning on a GPU when the kernel cannot take the arguments);
* ``"always"``: the kernel wherever the arguments are supported; off-GPU it runs in
  Pallas interpret mode (how the CPU tests exercise the kernels);
* ``"never"``: always the reference.

Unsupported arguments never reach a kernel: each op and driver states why (its
``unsupported_reason``) and takes the reference path ("fail closed").
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from typing import Optional

import jax
import jax.numpy as jnp

MODES = ("auto", "always", "never")
PRECISIONS = ("highest", "ieee", "fast")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Kernel selection and tuning, every knob in one hashable value.

    Attributes:
      use_kernels: ``"auto"``, ``"always"`` or ``"never"`` (see the module docstring).
      interpret: run kernels in Pallas interpret mode; None: only when not on an NVIDIA GPU.
      num_warps: warps per program of the Triton kernels (a power of two); None: each
        kernel's default (4; the fused cell kernels pick by parameter size).
      block_elems: target number of state elements per program of
        ``selective_state_update`` (a power of two).
      block_batch: batch rows per program of ``simplified_state_update`` and of the fused
        cell kernels: 1 (float32 multiply-adds, one row per program) or a power of two
        >= 16 (tensor-core dots; cells that declare a block path); None: by the batch
        (one row per program up to 256 rows, blocks of 16 above).
      precision: the dots of the block paths on the GPU: ``"highest"`` (3-pass TF32,
        float32 accuracy), ``"ieee"`` (float32 multiply-adds) or ``"fast"`` (1-pass TF32,
        about 1e-3 relative per product: an explicit opt-in). One-row paths always use
        float32 multiply-adds; interpret mode and the XLA drivers use ``HIGHEST``.
    """

    use_kernels: str = "auto"
    interpret: Optional[bool] = None
    num_warps: Optional[int] = None
    block_elems: int = 2048
    block_batch: Optional[int] = None
    precision: str = "highest"

    def __post_init__(self):
        if self.use_kernels not in MODES:
            raise ValueError(f"use_kernels must be one of {MODES}, got {self.use_kernels!r}")
        if self.interpret not in (None, True, False):
            raise ValueError(f"interpret must be None, True or False, got {self.interpret!r}")
        if self.num_warps is not None:
            _check_power_of_two("num_warps", self.num_warps, 1)
        _check_power_of_two("block_elems", self.block_elems, 1)
        if self.block_batch is not None and (isinstance(self.block_batch, bool) or self.block_batch != 1):
            _check_power_of_two("block_batch", self.block_batch, 16, "1 or ")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


def _check_power_of_two(name, value, minimum, also=""):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or value & (value - 1):
        raise ValueError(f"{name} must be {also}a power of two >= {minimum}, got {value!r}")


_CONFIG = KernelConfig()


def get_config() -> KernelConfig:
    """The convenience default, used where ``config=None`` is passed."""
    return _CONFIG


def resolve(config: Optional[KernelConfig]) -> KernelConfig:
    """``config``, or the default when None; a ``TypeError`` for anything else."""
    if config is None:
        return _CONFIG
    if not isinstance(config, KernelConfig):
        raise TypeError(f"config must be a pallas_kernels.KernelConfig or None, got {type(config).__name__}")
    return config


def set_config(config: Optional[KernelConfig] = None, **changes) -> KernelConfig:
    """Replace the default (``config``, and/or field ``changes``); returns the previous one.

    Clears no cache: programs compiled under the previous default stay valid, because
    every program of the library is keyed by the configuration it was traced under.
    """
    global _CONFIG
    previous = _CONFIG
    base = previous if config is None else resolve(config)
    _CONFIG = dataclasses.replace(base, **changes)
    return previous


@contextlib.contextmanager
def kernel_config(config: Optional[KernelConfig] = None, **changes):
    """Use another default inside a ``with`` block, e.g. ``kernel_config(use_kernels="never")``."""
    previous = set_config(config, **changes)
    try:
        yield get_config()
    finally:
        set_config(previous)


@functools.lru_cache(maxsize=None)
def on_nvidia_gpu() -> bool:
    """Whether JAX's default backend is a CUDA GPU."""
    try:
        device = jax.devices()[0]
    except RuntimeError:
        return False
    if device.platform != "gpu":
        return False
    version = str(getattr(device.client, "platform_version", "")).lower()
    return "rocm" not in version and "hip" not in version


def interpret_mode(config: KernelConfig) -> bool:
    """Whether a kernel must run in Pallas interpret mode under ``config``."""
    return (not on_nvidia_gpu()) if config.interpret is None else config.interpret


_WARNED: set[tuple[str, str]] = set()


def choose_kernel(op: str, unsupported_reason: Optional[str], config: KernelConfig,
                  slower_reason: Optional[str] = None) -> bool:
    """Decide between the kernel (True) and the reference (False) for one call.

    ``unsupported_reason`` is None when the kernel supports the arguments. A
    kernel that was asked for (``"always"``, or ``"auto"`` on a GPU) but cannot
    take the arguments is reported once per reason with a ``RuntimeWarning``.
    ``slower_reason`` (None, or where the kernel was measured slower than the
    reference) keeps the reference under ``"auto"``, silently.
    """
    if config.use_kernels == "never" or (config.use_kernels == "auto" and slower_reason is not None):
        return False
    wanted = config.use_kernels == "always" or on_nvidia_gpu()
    if not wanted:
        return False
    if unsupported_reason is None:
        unsupported_reason = sharded_reason()
    if unsupported_reason is None and not pallas_available():
        unsupported_reason = "this installation (jax.experimental.pallas cannot be imported)"
    if unsupported_reason is not None:
        key = (op, unsupported_reason)
        if key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(f"{op}: using the pure-JAX reference, the kernel does not support {unsupported_reason}", RuntimeWarning, stacklevel=3)
        return False
    return True


def sharded_reason() -> Optional[str]:
    """Why no kernel runs in the current trace, or None: under a mesh of several devices (``jax.set_mesh``;
    ``lrnnx_jax.parallel.data_parallel``) the batch may be sharded, and a ``pallas_call`` is not partitioned (XLA
    would gather its operands onto every device), so the kernels refuse and the XLA paths, which XLA partitions
    row by row, run instead. (No ``shard_map`` wrapper yet.)"""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size <= 1:
        return None
    return f"a mesh of {mesh.size} devices (data parallelism: kernels are not partitioned yet, the XLA path is)"


@functools.lru_cache(maxsize=None)
def pallas_available() -> bool:
    try:
        pallas_modules()
    except ImportError:
        return False
    return True


def pallas_modules():
    """``(pl, plgpu)``: imported only when a kernel is built, so the package imports without them."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    return pl, plgpu


def compiler_params(config: KernelConfig, num_warps: Optional[int] = None):
    """Triton compiler parameters for ``pallas_call``: ``config.num_warps``, else ``num_warps``, else 4."""
    _, plgpu = pallas_modules()
    warps = config.num_warps or num_warps or 4
    return plgpu.CompilerParams(num_warps=warps, num_stages=1)


#: the dot algorithms of the block paths on the GPU, by ``KernelConfig.precision``
GPU_PRECISION = {
    "highest": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
    "ieee": jax.lax.DotAlgorithmPreset.F32_F32_F32,
    "fast": jax.lax.DotAlgorithmPreset.TF32_TF32_F32,
}


def dot_precision(config: KernelConfig):
    """The precision of a block path's dots: ``HIGHEST`` in interpret mode, else :data:`GPU_PRECISION`."""
    return jax.lax.Precision.HIGHEST if interpret_mode(config) else GPU_PRECISION[config.precision]


def next_power_of_two(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def check_state_slots(state_rows: int, batch: int, state_batch_indices) -> None:
    """Validate the state-slot mapping shared by the state-update ops.

    Without ``state_batch_indices`` the state must have one row per batch row; with
    them, they must be ``batch`` integers (slot numbers, or the op's ``pad_slot_id``).
    """
    if state_batch_indices is not None:
        sbi = jnp.asarray(state_batch_indices)
        if sbi.shape != (batch,) or not jnp.issubdtype(sbi.dtype, jnp.integer):
            raise ValueError(f"state_batch_indices must be integers of shape (batch,) = ({batch},), got {sbi.dtype}{sbi.shape}")
    elif state_rows != batch:
        raise ValueError(f"state has {state_rows} rows but x has batch {batch}; pass state_batch_indices to map rows to slots")


def slots(state_batch_indices, pad_slot_id):
    """``(slot, valid)`` ``(batch,)``: the state row of each batch row (0 for padded rows).

    Without ``state_batch_indices``: ``(slice(None), True)`` (row ``b`` is slot ``b``).
    """
    if state_batch_indices is None:
        return slice(None), jnp.asarray(True)
    valid = state_batch_indices != pad_slot_id
    return jnp.where(valid, state_batch_indices, 0).astype(jnp.int32), valid


def write_slots(state, rows, slot, valid):
    """``state`` with ``rows[b]`` written to slot ``slot[b]`` where ``valid[b]`` (other rows dropped)."""
    target = jnp.where(valid, slot, state.shape[0])  # out of range: dropped
    return state.at[target].set(rows.astype(state.dtype), mode="drop")
