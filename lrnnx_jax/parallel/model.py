"""Model parallelism: the language model's parameters, and its caches, split over a ``model`` mesh axis.

:func:`shard_model` places every parameter of an :class:`~lrnnx_jax.architectures.LRNNLMHeadModel` with a
``NamedSharding`` given by one rules table (:data:`RULES`, read by :func:`partition_spec`), Megatron-style: each
device holds its share of the attention heads, of Mamba's ``d_inner`` channels, of Mamba-2's heads, of the MLP's
hidden width and of the (padded) vocabulary, and the layers' caches are split the same way (the KV cache over its
key/value heads, the SSM states over their channels or heads). Nothing else changes: the library's programs are
``jax.jit`` programs, XLA's partitioner compiles them for the placed parameters, and ``generate_tokens`` runs the
prefill and the whole decode loop as one SPMD program::

    mesh = parallel.model_mesh(4)                    # 4 devices, one axis "model"
    parallel.shard_model(lm, mesh)                   # parameters split in place
    tokens = generate_tokens(lm, prompt, 32)         # one program over the 4 devices
    logits = lm(prompt)                              # the forward, lm.step, lm.verify_step: the same

What crosses devices (read from the compiled program by the tests, ``parallel.collectives``): all-reduces of
activations (each layer's ``out_proj`` and each MLP's ``fc2``, a ``(B, d_model)`` row per token; the
vocabulary-parallel embedding's lookup; the fused input projections, below; Mamba's ``x_proj``), small all-gathers of
activations (the hidden state before the vocabulary-parallel head, the head's argmax); no split parameter and no
split state (KV cache, SSM states, Mamba's conv history) ever crosses devices.

The fused input projections (Mamba's and Mamba-2's ``in_proj`` ``[x | z | ...]``, attention's ``[q | k | v]``, the
MLP's ``fc1`` ``[a | gate]``) are stored in lrnnx's checkpoint layout, pieces side by side: a contiguous split of
their output columns would give each device whole pieces (device 0 all of ``x``, device 1 all of ``z``) instead of
its share of each, and the step's cells slice those kernels by piece (:meth:`Mamba.cell`). So they are split along
their input rows (``d_model``) instead: each device multiplies its slice of the normed input, one all-reduce (or
reduce-scatter) of the projection's output completes it, and every piece is then split locally like the layer's
channels. That costs one collective of the projection's output per layer more than a Megatron column split, which
needs the pieces stored apart. The projections that follow are split as Megatron's: ``out_proj``/``fc2``/``x_proj``
by input rows (their partial products all-reduced), ``dt_proj`` and the per-channel parameters by channels.

XLA's partitioner still moves small pieces where a fused array is sliced at boundaries that are not the devices'
(read on 4 devices, tests/model_parallel_checks.py): collective-permutes of activations (the q/k/v pieces after
attention's projection; in the prefill, the pieces of the fused projections' outputs), and inside Mamba-2's step it
splits the replicated conv over ``[x | B | C]`` its own way: rows of the conv parameters and history are permuted
and the ``x`` part of the history, ``(B, d_inner, d_conv)``, is all-gathered back, each token. Sharding hints inside
those layers (or the pieces stored apart) would remove them; the tests assert what holds.

Other mixers (LRU, S4, S4D, S5, Centaurus, RGLRU, S7), the norms and the convolutions that run over fused pieces
(Mamba-2's over ``[x | B | C]``, attention's optional one over ``[q | k | v]``) stay replicated, with their states:
they are small or mix all channels. Every device computes them whole.

The Pallas kernels are not partitioned: the model's layers are traced under its mesh (:meth:`ModelParallel.tracing`),
where ``pallas_kernels.dispatch`` refuses them and the XLA paths run.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lrnnx_jax.parallel.data import data_mesh

#: the default name of the model axis
MODEL = "model"


@dataclasses.dataclass(frozen=True)
class Rule:
    """How one kind of sub-module is split over the model axis.

    ``units``: its attributes (or the language model's, prefixed ``lm.``) that must be multiples of the axis size;
    ``params``: ``{path under the sub-module: the dimension split}`` (parameters not named stay replicated);
    ``cache``: the same for its inference cache's arrays, by their key (states of a verify cache included; None:
      pinned whole on every device);
    ``cache_units``: when one of these is not a multiple of the axis size the cache stays whole on every device
    (grouped-query attention with fewer key/value heads than devices).
    """

    units: tuple[str, ...]
    params: Mapping[str, int]
    cache: Mapping[str, int] = dataclasses.field(default_factory=dict)
    cache_units: tuple[str, ...] = ()


#: The rules, by sub-module kind: a mixer type of the language model (``mixer_types``), ``"mlp"`` (the gated MLP of
#: a block), ``"embedding"`` and ``"lm_head"``. Kinds not listed (the other mixers, the norms) stay replicated.
RULES: dict[str, Rule] = {
    "embedding": Rule(("lm.padded_vocab_size",), {"embedding": 0}),  # (V, d_model): vocabulary rows
    "lm_head": Rule(("lm.padded_vocab_size",), {"kernel": 1}),  # (d_model, V): vocabulary columns
    "mlp": Rule(("lm.d_model", "hidden_features"), {"fc1.kernel": 0, "fc2.kernel": 0}),
    "Mamba": Rule(
        ("lm.d_model", "d_inner"),
        {"in_proj.kernel": 0, "conv_weight": 0, "conv_bias": 0, "x_proj.kernel": 0, "dt_proj.kernel": 1,
         "dt_proj.bias": 0, "dtA_proj.kernel": 1, "dtA_proj.bias": 0, "A_log": 0, "D": 0, "out_proj.kernel": 0},
        cache={"conv_state": 1, "lrnn_state": 1}),  # (B, d_inner, K), (B, d_inner, N)
    "Mamba2": Rule(
        ("lm.d_model", "nheads"),
        {"in_proj.kernel": 0, "dt_bias": 0, "A_log": 0, "D": 0, "norm_weight": 0, "out_proj.kernel": 0},
        cache={"conv_state": None, "lrnn_state": 1}),  # (B, nheads, headdim, N); the conv over [x | B | C] replicated
    "attn": Rule(
        ("lm.d_model", "num_heads"), {"in_proj.kernel": 0, "out_proj.kernel": 0},
        cache={"k": 2, "v": 2}, cache_units=("num_heads_kv",)),  # (B, max_seqlen, num_heads_kv, head_dim)
}


@dataclasses.dataclass(frozen=True)
class ModelParallel:
    """Where a model-parallel language model lives: its ``mesh`` and the ``axis`` its parameters are split over
    (what :func:`shard_model` stores as ``lm.model_parallel``; static, part of the model's structure)."""

    mesh: Mesh
    axis: str

    @property
    def size(self) -> int:
        return self.mesh.shape[self.axis]

    def tracing(self):
        """The mesh as the abstract mesh of the current trace (``jax.sharding.use_abstract_mesh``, allowed inside
        ``jax.jit``): what the language model's layers are traced under, so that ``pallas_kernels.dispatch`` refuses
        the kernels (``sharded_reason``) and the XLA paths run."""
        return jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh)

    def constrain_cache(self, lm, index: int, cache):
        """Layer ``index``'s cache (inference or verify) with its split states pinned to their sharding
        (``jax.lax.with_sharding_constraint``), so that XLA keeps them split through the decode loop; the other
        arrays are left to XLA."""
        rule = RULES.get(lm.mixer_types[index])
        if rule is None or not rule.cache or not _divisible(lm.layers[index].mixer, lm, rule.cache_units, self.size):
            return cache

        def constrain(path, leaf):
            name = str(getattr(path[-1], "key", ""))
            if name not in rule.cache:
                return leaf
            dim = rule.cache[name]
            spec = PartitionSpec() if dim is None else _split(leaf.ndim, dim, self.axis)
            return jax.lax.with_sharding_constraint(leaf, NamedSharding(self.mesh, spec))

        return jax.tree_util.tree_map_with_path(constrain, cache)


def model_mesh(num_devices: Optional[int] = None, axis: str = MODEL, devices: Optional[Sequence] = None) -> Mesh:
    """A one-axis mesh named ``axis`` over ``devices`` (default: the first ``num_devices`` of ``jax.devices()``, all
    when None). A model is also split over one axis of any larger mesh (``Mesh(devices.reshape(2, 4), ("data",
    "model"))``): its parameters are replicated over the other axes."""
    return data_mesh(num_devices, axis, devices)


def partition_spec(lm, path: Sequence, shape: Sequence[int], axis: str = MODEL) -> PartitionSpec:
    """The ``PartitionSpec`` of the parameter at ``path`` (its path in ``nnx.state(lm)``, e.g. ``("layers", 0,
    "mixer", "in_proj", "kernel")``) of shape ``shape``, from :data:`RULES`: ``axis`` at the dimension its rule
    splits, or ``PartitionSpec()`` (replicated)."""
    kind, _, name = _owner(lm, path)
    dim = RULES[kind].params.get(name) if kind in RULES else None
    return PartitionSpec() if dim is None else _split(len(shape), dim, axis)


def check_divisible(lm, size: int, axis: str = MODEL):
    """``ValueError`` unless every split size of ``lm`` (:data:`RULES`' ``units``) is a multiple of ``size``, the
    number of devices along ``axis``."""
    for kind, owner, where in _sub_modules(lm):
        rule = RULES.get(kind)
        for unit in () if rule is None else rule.units:
            value = _unit(owner, lm, unit)
            if value % size:
                raise ValueError(f"{where}: {unit.removeprefix('lm.')}={value} is not a multiple of the {size} devices "
                                 f"of mesh axis {axis!r}; model parallelism splits it evenly (use a mesh of a divisor "
                                 f"of it)")


def shard_model(lm, mesh: Mesh, axis: str = MODEL):
    """Split ``lm``'s parameters over the mesh axis ``axis`` (see the module docstring), in place; returns ``lm``.

    Every parameter is placed with ``NamedSharding(mesh, partition_spec(lm, path, shape, axis))`` (replicated over
    the mesh's other axes); ``lm.model_parallel`` records the mesh, so that the model's programs keep the caches
    split and run under the mesh. A mesh of one device along ``axis`` is allowed (nothing is split).
    """
    from lrnnx_jax.architectures import LRNNLMHeadModel

    if not isinstance(lm, LRNNLMHeadModel):
        raise TypeError(f"lm must be an LRNNLMHeadModel, got {type(lm).__name__}")
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis not in mesh.axis_names:
        raise ValueError(f"the mesh has axes {mesh.axis_names}, not {axis!r}")
    check_divisible(lm, mesh.shape[axis], axis)
    placed = []
    for path, variable in nnx.to_flat_state(nnx.state(lm)):
        value = variable.get_value()
        spec = partition_spec(lm, path, value.shape, axis) if isinstance(variable, nnx.Param) else PartitionSpec()
        dim = spec.index(axis) if axis in spec else None
        if dim is not None and value.shape[dim] % mesh.shape[axis]:
            raise ValueError(f"parameter {'.'.join(map(str, path))} of shape {value.shape} cannot be split evenly over the "
                             f"{mesh.shape[axis]} devices of mesh axis {axis!r} along dimension {dim}")
        placed.append((variable, NamedSharding(mesh, spec)))
    for variable, sharding in placed:  # nothing is moved before every parameter is known to split
        variable.set_value(jax.device_put(variable.get_value(), sharding))
    lm.model_parallel = ModelParallel(mesh, axis)
    return lm


# ====================================================================== helpers


def _split(ndim: int, dim: int, axis: str) -> PartitionSpec:
    return PartitionSpec(*([None] * dim), axis, *([None] * (ndim - dim - 1)))


def _unit(owner, lm, unit: str) -> int:
    return getattr(lm, unit[3:]) if unit.startswith("lm.") else getattr(owner, unit)


def _divisible(owner, lm, units, size: int) -> bool:
    return all(_unit(owner, lm, unit) % size == 0 for unit in units)


def _owner(lm, path: Sequence):
    """``(kind, sub-module, path under it as "a.b")`` of a parameter path of ``lm``."""
    keys = [str(getattr(k, "key", k)) for k in path]
    if keys[0] == "layers" and len(keys) > 2 and keys[2] in ("mixer", "mlp"):
        block = lm.layers[int(keys[1])]
        kind = lm.mixer_types[int(keys[1])] if keys[2] == "mixer" else "mlp"
        return kind, getattr(block, keys[2]), ".".join(keys[3:])
    return keys[0], getattr(lm, keys[0], None), ".".join(keys[1:])


def _sub_modules(lm):
    """``(kind, module, where)`` of every sub-module :data:`RULES` may split."""
    yield "embedding", lm.embedding, "embedding"
    if lm.lm_head is not None:
        yield "lm_head", lm.lm_head, "lm_head"
    for i, block in enumerate(lm.layers):
        yield lm.mixer_types[i], block.mixer, f"layers[{i}].mixer ({lm.mixer_types[i]})"
        if block.mlp is not None:
            yield "mlp", block.mlp, f"layers[{i}].mlp"
