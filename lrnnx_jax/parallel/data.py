"""Data parallelism: the batch sharded over a mesh axis, the parameters replicated.

Every program of the library is a ``jax.jit``; given a batch sharded over devices (a ``NamedSharding`` whose
first axis is the mesh's data axis) and replicated parameters, XLA's partitioner gives each device only its
rows: the models have no op that mixes rows, so no collective moves an activation. A training step's gradient
is summed over the devices by one all-reduce of each parameter-shaped gradient (and the loss by a scalar one)::

    mesh = parallel.data_mesh()                      # all devices, one axis "data"
    parallel.replicate(model, mesh)                  # parameters on every device
    x = parallel.shard_batch(x, mesh)                # rows split over the devices
    y = model(x)                                     # each device computes its rows
    ys = generate(model, x[:, 0], 64)                # sharded in, sharded out
    tokens = generate_tokens(lm, parallel.shard_batch(prompt, mesh), 32)

The Pallas kernels run per shard: XLA's partitioner cannot split a ``pallas_call`` (it would gather the
operands), so under a mesh context (``jax.set_mesh``, or :func:`data_parallel`, which ``generate``,
``capture_graph`` and ``generate_tokens`` enter themselves for a sharded input) every kernel entry point runs
inside ``jax.shard_map`` over the :data:`DATA` axis (:func:`pallas_kernels.dispatch.per_shard`): each device runs
the kernel on its own rows, with the parameters whole, and the results come back batch-sharded; the training
scans run forward and backward per shard, their parameter gradients summed over the devices by the ``shard_map``'s
transpose. Where a call cannot be split by rows (a batch that is not a multiple of the devices, state-update rows
mapped to slots by ``state_batch_indices``, a mesh whose devices are not all on the ``"data"`` axis)
:func:`pallas_kernels.dispatch.choose_kernel` takes the XLA reference and says so once. Outside a mesh context the
dispatch cannot see the mesh (a kernel would get its operands gathered), so run a sharded model's forward,
``step`` and training step on a GPU inside ``with parallel.data_parallel(mesh):``.

:func:`collectives` lists the collectives of a compiled program (``jax.jit(f).lower(...).compile().as_text()``),
and :func:`activation_collectives` those that move a batch-shaped array: how the tests check that no activation
crosses devices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from pallas_kernels import dispatch as kernel_dispatch

#: the default name of the data axis: the one over which the Pallas kernels run per shard
DATA = kernel_dispatch.DATA_AXIS


def data_mesh(num_devices: Optional[int] = None, axis: str = DATA, devices: Optional[Sequence] = None) -> Mesh:
    """A one-axis mesh over ``devices`` (default: the first ``num_devices`` of ``jax.devices()``, all when None).

    The axis is ``AxisType.Auto``: shardings are propagated by XLA, and code written for one device runs unchanged.
    """
    devices = list(jax.devices() if devices is None else devices)
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices must lie in [1, {len(devices)}] (the visible devices), got {num_devices}")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (axis,), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh, axis: str = DATA) -> NamedSharding:
    """Arrays split along their first (batch) axis over the mesh axis ``axis``, replicated over any other."""
    if axis not in mesh.axis_names:
        raise ValueError(f"the mesh has axes {mesh.axis_names}, not {axis!r}")
    return NamedSharding(mesh, PartitionSpec(axis))


def replicated(mesh: Mesh) -> NamedSharding:
    """A whole copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(tree, mesh: Mesh, axis: str = DATA):
    """Every array of ``tree`` (NumPy or JAX) placed with its first axis split over ``axis``.

    The batch must divide evenly: ``B % mesh.shape[axis] == 0`` (pad the batch otherwise).
    """
    sharding, parts = batch_sharding(mesh, axis), mesh.shape[axis]

    def place(a):
        shape = np.shape(a)
        if len(shape) == 0 or shape[0] % parts:
            raise ValueError(f"a batch of shape {shape} cannot be split evenly over the {parts} devices of mesh axis "
                             f"{axis!r}; use a batch size that is a multiple of {parts}")
        return jax.device_put(a, sharding)

    return jax.tree.map(place, tree)


def replicate(model_or_tree, mesh: Mesh):
    """Put a whole copy of a model's state (an ``nnx.Module``, updated in place and returned) or of a pytree (a new
    pytree is returned) on every device of ``mesh``."""
    if isinstance(model_or_tree, nnx.Module):
        nnx.update(model_or_tree, jax.device_put(nnx.state(model_or_tree), replicated(mesh)))
        return model_or_tree
    return jax.device_put(model_or_tree, replicated(mesh))


def data_parallel(mesh: Mesh):
    """A context (``jax.set_mesh(mesh)``) in which the library's programs are traced for ``mesh``: kernels run per
    shard over its ``"data"`` axis (see the module docstring)."""
    return jax.set_mesh(mesh)


def batch_sharding_of(x) -> Optional[NamedSharding]:
    """The :func:`batch_sharding` that ``x`` (an array, batch first) is placed with, or None when it is on one device
    (or whole on every device): see :func:`as_batch_sharding`."""
    if not isinstance(x, jax.Array):
        return None
    return as_batch_sharding(x.sharding)


def as_batch_sharding(sharding) -> Optional[NamedSharding]:
    """``sharding`` as a :func:`batch_sharding`, or None for one device (or a whole copy on every device).

    A ``NamedSharding`` over several devices must split the batch axis alone (``P(axis)`` or ``P(axis, None, ...)``);
    any other multi-device placement is a ``ValueError`` (data parallelism shards the batch and nothing else).
    """
    if sharding is None or len(sharding.device_set) <= 1 or sharding.is_fully_replicated:
        return None
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec)
        if spec and isinstance(spec[0], str) and all(s is None for s in spec[1:]):
            return batch_sharding(sharding.mesh, spec[0])
    raise ValueError(f"a batch over several devices must be split along its first axis alone by a NamedSharding "
                     f"(lrnnx_jax.parallel.shard_batch), got {sharding}")


def same_placement(tree, sharding: Optional[NamedSharding]):
    """``tree``'s arrays placed with ``sharding`` (batch first), or on the default device when None."""
    return jax.tree.map(lambda a: jax.device_put(a, sharding if sharding is not None else jax.devices()[0]), tree)


def mesh_context(sharding: Optional[NamedSharding]):
    """:func:`data_parallel` of ``sharding``'s mesh, or a no-op context when None."""
    return contextlib.nullcontext() if sharding is None else data_parallel(sharding.mesh)


# ====================================================================== reading compiled programs

COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter", "all-reduce")
_OP = re.compile(r"=\s*(?P<result>.*?)\s(?P<op>" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_SHAPE = re.compile(r"[a-z]+[0-9]*\[([0-9,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of an HLO module: its op and the shapes of its result."""

    op: str
    shapes: tuple[tuple[int, ...], ...]
    line: str


def collectives(hlo_text: str) -> list[Collective]:
    """The collectives (:data:`COLLECTIVES`, synchronous or ``-start``) of an HLO module's text."""
    found = []
    for line in hlo_text.splitlines():
        match = _OP.search(line)
        if match:
            shapes = tuple(tuple(int(d) for d in dims.split(",") if d) for dims in _SHAPE.findall(match["result"]))
            found.append(Collective(match["op"], shapes, line.strip()))
    return found


def activation_collectives(hlo_text: str, batch_size: int, num_shards: int) -> list[Collective]:
    """The collectives of a partitioned program that move a batch-shaped array: every all-gather, all-to-all,
    collective-permute and reduce-scatter, and each all-reduce with a result of more than one dimension whose
    leading dimension is the global batch ``batch_size`` or the per-device ``batch_size // num_shards`` (a ``(B, L,
    H)`` activation, or any per-row tensor). Choose a batch size that no parameter dimension equals."""
    rows = {batch_size, batch_size // num_shards}
    return [c for c in collectives(hlo_text)
            if c.op != "all-reduce" or any(len(s) > 1 and s[0] in rows for s in c.shapes)]


def describe(found: list[Collective]) -> str:
    return "\n".join(c.line[:240] for c in found)

