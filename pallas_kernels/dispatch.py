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

Several devices: a ``pallas_call`` is a custom call that XLA's partitioner cannot split (it
would gather the operands onto every device). Under a mesh of data parallelism (every device on
the ``"data"`` axis, :data:`DATA_AXIS`: ``jax.set_mesh``, ``lrnnx_jax.parallel.data_parallel``)
each kernel entry point runs inside ``jax.shard_map`` over that axis (:func:`per_shard`): its
batch-leading operands split, its parameters whole on every device, so each device runs the kernel
on its own rows and the results come back batch-sharded; the training-scan pairs run forward and
backward per shard, their parameter gradients summed over the devices. A call that cannot be split
by rows (a batch that does not divide over the devices; rows mapped to state slots; a mesh with a
``"model"`` or ``"sequence"`` axis) takes the reference, with the reason (:func:`sharded_reason`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

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
        cell kernels, a power of two: below 16 (one row, or a block of 2-8) the contractions
        are float32 multiply-adds, from 16 on tensor-core dots (``DOT_MIN_ROWS``; for the
        fused kernels, rows above 1 only for cells that declare a block path). A block of
        multiply-adds holds its rows' products with each parameter tile: it pays off only
        where a program's tiles are small (a split cell's slice; on an H200 LRU at B=256 took
        3.2 us per step by rows, 39 in blocks of 4, 420 in blocks of 8); None: by the batch
        (one row per program up to 256 rows, blocks of 16 above; for a split cell, one row
        per program while the row split is resident, blocks beyond, of 16 or of the cell's
        ``KernelPolicy.split_block``: ``fused_generation.split_block``).
      precision: the dots of the block paths on the GPU: ``"highest"`` (3-pass TF32,
        float32 accuracy), ``"ieee"`` (float32 multiply-adds) or ``"fast"`` (1-pass TF32,
        about 1e-3 relative per product: an explicit opt-in). One-row paths always use
        float32 multiply-adds; interpret mode and the XLA drivers use ``HIGHEST``.
      split_programs: programs per batch row (or block of rows) of the fused cell kernels for a
        cell whose parameters do not fit one program's registers (``Cell.split``; a power of
        two); None: for rows the most that can be resident at once, for blocks the fewest that
        fit (``fused_generation.split_programs``).
    """

    use_kernels: str = "auto"
    interpret: Optional[bool] = None
    num_warps: Optional[int] = None
    block_elems: int = 2048
    block_batch: Optional[int] = None
    precision: str = "highest"
    split_programs: Optional[int] = None

    def __post_init__(self):
        if self.use_kernels not in MODES:
            raise ValueError(f"use_kernels must be one of {MODES}, got {self.use_kernels!r}")
        if self.interpret not in (None, True, False):
            raise ValueError(f"interpret must be None, True or False, got {self.interpret!r}")
        if self.num_warps is not None:
            check_power_of_two("num_warps", self.num_warps, 1)
        check_power_of_two("block_elems", self.block_elems, 1)
        if self.block_batch is not None:
            check_power_of_two("block_batch", self.block_batch, 1)
        if self.split_programs is not None:
            check_power_of_two("split_programs", self.split_programs, 1)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


def check_power_of_two(name, value, minimum, also=""):
    """A ``ValueError`` naming ``name`` unless ``value`` is an int (not a bool) power of two ``>= minimum``
    (``also``: the other values the message lists, e.g. ``"None or "``)."""
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
                  slower_reason: Optional[str] = None, *, batch: Optional[int] = None,
                  split_reason: Optional[str] = None) -> bool:
    """Decide between the kernel (True) and the reference (False) for one call.

    ``unsupported_reason`` is None when the kernel supports the arguments. A
    kernel that was asked for (``"always"``, or ``"auto"`` on a GPU) but cannot
    take the arguments is reported once per reason with a ``RuntimeWarning``.
    ``slower_reason`` (None, or where the kernel was measured slower than the
    reference) keeps the reference under ``"auto"``, silently.

    ``batch``: the rows of the call's batch-leading operands, which its kernel entry point splits over a
    data-parallel mesh (:func:`per_shard`); None when the call cannot be split by rows (``split_reason`` says why).
    Under a mesh of several devices the kernel is chosen only where :func:`sharded_reason` lets it run per shard.
    """
    if config.use_kernels == "never" or (config.use_kernels == "auto" and slower_reason is not None):
        return False
    wanted = config.use_kernels == "always" or on_nvidia_gpu()
    if not wanted:
        return False
    if unsupported_reason is None:
        unsupported_reason = sharded_reason(batch, split_reason)
    if unsupported_reason is None and not pallas_available():
        unsupported_reason = "this installation (jax.experimental.pallas cannot be imported)"
    if unsupported_reason is not None:
        key = (op, unsupported_reason)
        if key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(f"{op}: using the pure-JAX reference, the kernel does not support {unsupported_reason}", RuntimeWarning, stacklevel=3)
        return False
    return True


# ----------------------------------------------------------------------------- kernels per shard
#: the mesh axis the kernels split the batch over (``lrnnx_jax.parallel.DATA``, the axis of ``parallel.data_mesh``)
DATA_AXIS = "data"


def data_axis() -> Optional[str]:
    """The axis :func:`per_shard` splits the batch over in the current trace: :data:`DATA_AXIS` under a mesh of
    several devices that all lie on it (``jax.set_mesh``; ``lrnnx_jax.parallel.data_parallel``), else None (no mesh,
    one device, another layout, or inside a ``shard_map`` over it, where the arrays are one device's already)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size <= 1 or mesh.shape.get(DATA_AXIS) != mesh.size or DATA_AXIS in mesh.manual_axes:
        return None
    return DATA_AXIS


def sharded_reason(batch: Optional[int] = None, split_reason: Optional[str] = None) -> Optional[str]:
    """Why no kernel may run in the current trace for a call of ``batch`` rows, or None.

    A ``pallas_call`` is a custom call that XLA's partitioner cannot split (it would gather the operands onto every
    device), so under a mesh of several devices a kernel runs only per shard (:func:`per_shard`): the mesh must put
    every device on :data:`DATA_AXIS` (data parallelism; a ``"model"`` or ``"sequence"`` axis refuses), the call must
    split by rows (``batch`` not None; else ``split_reason``), and ``batch`` must divide evenly over the devices.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size <= 1:
        return None
    if data_axis() is None:
        where = "inside a shard_map over it" if DATA_AXIS in mesh.manual_axes else "not all on one 'data' axis"
        return (f"a mesh of {mesh.size} devices {dict(mesh.shape)} {where} (a kernel runs per shard only over the "
                f"batch, on a mesh of data parallelism)")
    if batch is None:
        return f"{split_reason or 'this call'} under a mesh of {mesh.size} devices (the call cannot be split by batch rows)"
    if batch % mesh.size:
        return f"a batch of {batch} rows over a mesh of {mesh.size} devices (the kernel runs per shard: not a multiple)"
    return None


def per_shard(kernel: Callable, args: tuple, batch_axes: tuple, out_batch_axes):
    """``kernel(*args)``, each device of the current data-parallel mesh (:func:`data_axis`) running it on its rows.

    The kernel runs inside ``jax.shard_map`` over :data:`DATA_AXIS`: an argument with a batch axis is split along it,
    any other (parameters) is whole on every device, and the outputs come back split along their batch axes. Under
    ``jax.grad`` the transpose of the ``shard_map`` sums the cotangents of the whole arguments over the devices (a
    ``psum``), so a ``jax.custom_vjp`` kernel pair wrapped whole runs its forward and its backward per shard and its
    parameter gradients equal one device's. Where :func:`data_axis` is None the kernel runs as is. Callers check
    :func:`sharded_reason` first (:func:`choose_kernel` does), so that the batch divides.

    Args:
      kernel: a function of array pytrees (static options bound, e.g. by ``functools.partial``).
      args: its positional arguments (pytrees; None allowed).
      batch_axes: per argument, the batch axis of each of its leaves (0 for ``(batch, ...)``), or None: whole.
      out_batch_axes: the batch axis of the outputs, a pytree prefix of them (an int: every output).
    """
    axis = data_axis()
    if axis is None:
        return kernel(*args)
    split = lambda dim: PartitionSpec(*(None,) * dim, axis)  # noqa: E731
    in_specs = tuple(PartitionSpec() if dim is None else split(dim) for dim in batch_axes)
    # check_vma=False: a pallas_call's outputs carry no varying-axes type
    return jax.shard_map(kernel, in_specs=in_specs, out_specs=jax.tree.map(split, out_batch_axes),
                         check_vma=False)(*args)


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


#: the fewest rows of a kernel program's block that its contractions run as tensor-core dots (Triton's smallest
#: dot tile); fewer rows (one, or a block of 2-8) contract by float32 multiply-adds and a reduction
DOT_MIN_ROWS = 16

#: the ``precision`` that makes ``kernel_math.contract`` contract a block of rows by float32 multiply-adds and a
#: reduction, as it does one row, instead of a dot
MULTIPLY_ADD = "multiply-add"


def block_precision(config: KernelConfig, rows: int):
    """The ``precision`` of the contractions of a kernel program holding ``rows`` rows: :data:`MULTIPLY_ADD`
    below :data:`DOT_MIN_ROWS`, else :func:`dot_precision`."""
    return MULTIPLY_ADD if rows < DOT_MIN_ROWS else dot_precision(config)


def next_power_of_two(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


#: why a state-update call with ``state_batch_indices`` does not run per shard (:func:`sharded_reason`)
SLOTS_SPLIT_REASON = "state_batch_indices (a row may read and write any slot of the whole state)"


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
