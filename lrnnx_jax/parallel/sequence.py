"""Sequence parallelism: one long sequence split along its length over a mesh axis.

Every model's recurrence is affine in the state it enters with: after a stretch of the sequence the state is
``h_out = Phi h_in + b``, where ``b`` is the state reached from the zero state and ``Phi`` the stretch's transition.
:func:`sequence_parallel` gives each device ``L / n`` consecutive positions (``shard_map`` over the mesh axis) and:

1. forms the entering *window* entries of the cache (a causal conv's history, ``"window"`` in the model's
   ``cache_carry``): they depend on the previous ``K`` tokens alone, which each device sends to the next (one
   ``collective-permute`` of ``(B, K, H)``: a halo, never a shard), and a ``K``-token forward turns them into the
   cache entry;
2. runs its positions from the zero recurrent state and, in the same pass (``jax.jvp`` of the map from the entering
   recurrent state to the final one), its transition: for a ``"diagonal"`` state the tangent of ones gives
   ``diag(Phi)`` (complex states too: the map is complex-linear); for a ``"dense"`` one (S4's DPLR step mixes the
   state's last axis, of size ``N``) the ``N`` basis tangents give the ``N x N`` blocks;
3. composes these summaries into the true entering state of each device, as a chain: device ``j`` sends
   ``Phi_j h_j + b_j`` to device ``j + 1`` (``n - 1`` collective-permutes of a ``(B, state)`` cache entry: never an
   activation, and never a transition, which stays where it was formed);
4. runs its positions again from that state: its outputs, and the cache after them.

With ``lengths``, device ``k`` (positions ``[k L/n, (k+1) L/n)``) runs ``clip(lengths - k L/n, 0, L/n)`` steps of
each row: a row that has ended leaves the state unchanged (its transition is the identity), and the final cache of
each row is the one of the device where the row ends (a ``psum`` of one nonzero term per row). Event-mode
``integration_timesteps`` are split along the length like ``x``.

The result equals ``model(x, integration_timesteps, lengths, return_cache=...)`` to float32 rounding, and is
differentiable (``jax.grad`` through ``shard_map``: the gradient of the replicated parameters is summed over the
devices) and usable under ``jax.jit``::

    mesh = parallel.data_mesh(axis=parallel.SEQUENCE)          # all devices, one axis "sequence"
    x = parallel.shard_sequence(x, mesh)                       # (B, L, H), L split over the devices
    y = parallel.sequence_parallel(model, x, mesh=mesh, axis=parallel.SEQUENCE)
    y, cache = parallel.sequence_parallel(model, x, mesh=mesh, axis="sequence", return_cache=True)

On a mesh axis of one device it is the model's own forward (the Pallas kernels may run there; on several devices
the kernel dispatch refuses a mesh that is not of data parallelism, and the XLA path runs, which ``jax.jvp`` needs).

Cost: about three forwards per device (the pass with its transition and the final pass) on ``L / n`` positions
instead of one on ``L``; the devices exchange ``O(B x state)`` numbers, in ``n - 1`` hops one after the other. A
``"dense"`` state of size ``N`` costs ``N`` tangents in the first pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lrnnx_jax.core import validation
from lrnnx_jax.core.base import LRNN, compute_dtype
from lrnnx_jax.parallel.data import Collective, collectives

#: the default name of the sequence axis
SEQUENCE = "sequence"
#: the kinds of ``LRNN.cache_carry``
CARRIES = ("diagonal", "dense", "window")


def sequence_sharding(mesh: Mesh, axis: str = SEQUENCE) -> NamedSharding:
    """Arrays ``(B, L, ...)`` split along their second (length) axis over the mesh axis ``axis``."""
    _check_axis(mesh, axis)
    return NamedSharding(mesh, PartitionSpec(None, axis))


def shard_sequence(tree, mesh: Mesh, axis: str = SEQUENCE):
    """Every array of ``tree`` (``x (B, L, H)``, timesteps ``(B, L)``) placed with its length axis split over
    ``axis``; ``L`` must be a multiple of the axis size."""
    sharding = sequence_sharding(mesh, axis)

    def place(a):
        _check_length(np.shape(a), mesh.shape[axis], axis)
        return jax.device_put(a, sharding)

    return jax.tree.map(place, tree)


def sequence_parallel(model: LRNN, x, *, mesh: Mesh, axis: str, integration_timesteps=None, lengths=None,
                      return_cache: bool = False):
    """``model``'s full-sequence forward with the length split over the mesh axis ``axis`` (module docstring).

    Args:
      model: an ``LRNN`` (every model of the library), in eval mode or without dropout.
      x: ``(B, L, H)`` (whatever the model's own layout), ``L`` a multiple of ``mesh.shape[axis]``; best placed with
        :func:`shard_sequence`, or it is split on entry.
      mesh, axis: the mesh and the name of its axis to split the length over (other axes replicate).
      integration_timesteps: event mode, ``(B, L)`` or ``(B, L, 1)``, split like ``x``.
      lengths: ``(B,)`` integers in ``[0, L]`` (the rows may end on any device).
      return_cache: also return the final inference cache, equal to ``model(..., return_cache=True)``'s.

    Returns:
      ``y (B, L, H)``, split along ``L`` like ``x``; with ``return_cache``, ``(y, cache)`` (the cache replicated).
    """
    if not isinstance(model, LRNN):
        raise TypeError(f"model must be an lrnnx_jax model (a subclass of LRNN), got {type(model).__name__}")
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    _check_axis(mesh, axis)
    x = validation.check_sequence(x, model.d_model)
    batch, length, _ = x.shape
    num_shards = mesh.shape[axis]
    _check_length(x.shape, num_shards, axis)
    tau = model._check_timesteps(integration_timesteps, (batch, length))
    validation.check_lengths(lengths, batch, length)
    lengths = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    window = max((k for kind, k in _carry_plan(model, batch).values() if kind == "window"), default=0)
    if num_shards > 1 and window > length // num_shards:
        raise ValueError(f"{type(model).__name__}'s cache keeps the last {window} tokens (a causal conv's history), "
                         f"which must come from one neighbouring device: each device needs at least {window} "
                         f"positions, got L={length} over {num_shards} devices ({length // num_shards} each)")
    y, cache = _jit_sequence_parallel(model, x.astype(compute_dtype(x.dtype)), tau, lengths, mesh=mesh, axis=axis,
                                      return_cache=bool(return_cache))
    y = y.astype(x.dtype)
    return (y, cache) if return_cache else y


def length_collectives(hlo_text: str, length: int, num_shards: int) -> list[Collective]:
    """The collectives of a compiled sequence-parallel program that move an array with a length axis: a result
    dimension equal to the global ``length`` or the per-device ``length // num_shards`` (an activation, or any
    per-position tensor). Choose a length that no other dimension equals."""
    lengths = {length, length // num_shards}
    return [c for c in collectives(hlo_text) if any(d in lengths for shape in c.shapes for d in shape)]


# ====================================================================== inside the program

@functools.partial(jax.jit, static_argnames=("mesh", "axis", "return_cache"))
def _jit_sequence_parallel(model, x, tau, lengths, *, mesh, axis, return_cache):
    """The program, traced once per model structure (the model comes in as the pytree it is; its dropout mode is
    part of that structure, so the check below runs once per structure, not at every call)."""
    if model.dropout_active():
        raise ValueError(f"{type(model).__name__} has active dropout: sequence_parallel runs each position more than "
                         f"once and needs the same function every time; call model.eval() (or use dropout rate 0)")
    body = functools.partial(_shard_forward, axis=axis, num_shards=mesh.shape[axis], return_cache=return_cache)
    split = PartitionSpec(None, axis)
    run = jax.shard_map(body, mesh=mesh, in_specs=(PartitionSpec(), split, split, PartitionSpec()),
                        out_specs=(split, PartitionSpec()))
    return run(model, x, tau, lengths)


def _shard_forward(model, x, tau, lengths, *, axis: str, num_shards: int, return_cache: bool):
    """One device's part: ``x (B, L/n, H)`` -> ``(y (B, L/n, H), final cache summed over the devices or None)``."""
    # parameters marked varying on entry: their gradient is then summed over the devices once, parameter-shaped (an
    # invariant value first broadcast against the activations would be summed at that size)
    model = _varying(model, axis)
    batch, length, _ = x.shape
    shard = jax.lax.axis_index(axis)
    local = None if lengths is None else jnp.clip(lengths - shard * length, 0, length)
    mask = None if local is None else jnp.arange(length)[None, :] < local[:, None]
    zero = _varying(model.allocate_inference_cache(batch, dtype=x.dtype), axis)
    # one device holds the whole sequence, which starts from the zero cache (and needs no transition)
    entering = zero if num_shards == 1 else _entering_cache(model, x, tau, mask, local, zero, axis, num_shards, shard)
    y, after = model.masked_forward(x, tau, mask, local, return_cache, entering)
    if not return_cache:
        return y, None
    # each row's final cache is the one of the device where it ends (the last one without lengths)
    owner = num_shards - 1 if lengths is None else jnp.clip((lengths - 1) // length, 0, num_shards - 1)
    mine = jnp.reshape(owner == shard, (-1,))

    def from_owner(a):
        return jax.lax.psum(jnp.where(mine.reshape(-1, *(1,) * (a.ndim - 1)), a, jnp.zeros_like(a)), axis)

    return y, jax.tree.map(from_owner, after)


def _entering_cache(model, x, tau, mask, local, zero: dict, axis: str, num_shards: int, shard) -> dict:
    """The true cache before this device's first position: the conv windows from the halo, the recurrent states from
    the affine summaries of the devices before it (each a pass of its positions with its transition), composed along
    the chain of devices."""
    carry = {key: kind for key, (kind, _) in _carry_plan(model, x.shape[0]).items()}
    windows = _entering_windows(model, x, tau, zero, carry, axis, num_shards, shard)
    recurrent = {key: zero[key] for key in zero if carry[key] != "window"}

    def final_states(entering):
        _, after = model.masked_forward(x, tau, mask, local, True, {**windows, **entering})
        return {key: after[key].astype(entering[key].dtype) for key in entering}

    offset, transition = _affine_summary(final_states, recurrent, carry, axis)
    return {**windows, **_entering_states(offset, transition, recurrent, carry, axis, shard, num_shards)}


def _entering_windows(model, x, tau, zero, carry, axis, num_shards, shard) -> dict:
    """The ``"window"`` cache entries before this device's first position: a forward over the previous device's last
    ``K`` tokens (sent as a halo); the zero history on the first device."""
    keys = [key for key in zero if carry[key] == "window"]
    if not keys:
        return {}
    K = max(zero[key].shape[-1] for key in keys)
    to_next = [(i, i + 1) for i in range(num_shards - 1)]
    first = shard == 0
    halo_x = jax.lax.ppermute(x[:, -K:], axis, to_next)
    # the first device receives zeros; unit timesteps keep its (discarded) halo forward finite, and its gradient too
    halo_tau = None if tau is None else jnp.where(first, 1.0, jax.lax.ppermute(tau[:, -K:], axis, to_next))
    _, after = model.masked_forward(halo_x, halo_tau, None, None, True, zero)
    return {key: jnp.where(first, zero[key], after[key].astype(zero[key].dtype)) for key in keys}


def _affine_summary(final_states, zero: dict, carry: dict, axis: str):
    """``(b, Phi)`` of the affine map ``final_states(h) = Phi h + b`` (dicts of cache entries) in one pass: ``b`` its
    value at zero, ``Phi`` from tangents at zero. A ``"diagonal"`` entry's ``Phi`` has the entry's shape (the tangent
    of ones); a ``"dense"`` one ``(..., N, N)`` (``[..., i, j]``: output ``i`` of input ``j``; N basis tangents)."""
    probes = _varying({key: _probes(zero[key], carry[key]) for key in zero}, axis)
    count = max(p.shape[0] for p in probes.values())
    probes = {key: jnp.concatenate([p, jnp.zeros((count - p.shape[0], *p.shape[1:]), p.dtype)]) for key, p in probes.items()}
    if count == 1:  # diagonal states only: one tangent, traced without vmap (a tenth less to compile)
        offset, tangents = jax.jvp(final_states, (zero,), (jax.tree.map(lambda p: p[0], probes),))
        tangents = jax.tree.map(lambda t: t[None], tangents)
    else:
        offset, tangents = jax.vmap(lambda t: jax.jvp(final_states, (zero,), (t,)), out_axes=(None, 0))(probes)
    transition = {key: tangents[key][0] if carry[key] == "diagonal"
                  else jnp.moveaxis(tangents[key][:zero[key].shape[-1]], 0, -1) for key in zero}
    return offset, transition


def _varying(tree, axis: str):
    """``tree`` marked as differing per device (``shard_map``'s varying values), as the states that start from it."""
    return jax.tree.map(lambda a: jax.lax.pcast(a, axis, to="varying"), tree)


def _probes(leaf, kind: str):
    """The tangents that read a transition: ones (``"diagonal"``), or the basis vectors of the last axis broadcast
    over the others (``"dense"``); ``(probes, *leaf.shape)``."""
    if kind == "diagonal":
        return jnp.ones((1, *leaf.shape), leaf.dtype)
    N = leaf.shape[-1]
    basis = jnp.eye(N, dtype=leaf.dtype).reshape(N, *(1,) * (leaf.ndim - 1), N)
    return jnp.broadcast_to(basis, (N, *leaf.shape))


def _apply(transition, state, kind: str):
    if kind == "diagonal":
        return transition * state
    return jnp.einsum("...ij,...j->...i", transition, state, precision=jax.lax.Precision.HIGHEST)


def _entering_states(offset, transition, zero: dict, carry: dict, axis: str, shard, num_shards: int) -> dict:
    """The exclusive scan over the devices, as a chain: device ``k`` enters with ``h_k = Phi_{k-1} h_{k-1} +
    b_{k-1}`` (``h_0 = 0``). Device ``j`` forms ``Phi_j h_j + b_j`` from its own summary (``offset``, ``transition``)
    and sends it to device ``j + 1`` (one ``collective-permute`` of a ``(B, state)`` cache entry per link): the
    transitions never move, which matters for a ``"dense"`` state, whose ``Phi`` is ``N`` times its state."""
    h = zero
    for j in range(num_shards - 1):
        leaving = {key: _apply(transition[key], h[key], carry[key]) + offset[key] for key in zero}
        arrived = jax.lax.ppermute(leaving, axis, [(j, j + 1)])  # zeros on every device but j + 1
        h = {key: jnp.where(shard == j + 1, arrived[key], h[key]) for key in zero}
    return h


# ====================================================================== checks

def _check_axis(mesh: Mesh, axis):
    if axis not in mesh.axis_names:
        raise ValueError(f"axis must name an axis of the mesh, one of {mesh.axis_names}, got {axis!r}")


def _check_length(shape, num_shards: int, axis: str):
    if len(shape) < 2 or shape[1] % num_shards:
        raise ValueError(f"an array of shape {tuple(shape)} cannot be split along its length (axis 1) over the "
                         f"{num_shards} devices of mesh axis {axis!r}: the length must be a multiple of {num_shards} "
                         f"(pad the sequence; lengths= masks the padding)")


def _carry_plan(model: LRNN, batch: int) -> dict[str, tuple[str, int]]:
    """``{cache key: (kind, size of its last axis)}`` from the model's ``cache_carry`` declaration; every entry of
    its cache must be declared."""
    cache = jax.eval_shape(lambda: model.allocate_inference_cache(batch))
    plan = {}
    for key, leaf in cache.items():
        kind = model.cache_carry.get(key)
        if kind not in CARRIES:
            raise ValueError(f"{type(model).__name__}.cache_carry must give every cache entry one of {CARRIES}; "
                             f"entry {key!r} has {kind!r}")
        plan[key] = (kind, leaf.shape[-1])
    return plan
