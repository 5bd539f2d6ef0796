"""Sequence-parallel checks on fake CPU devices, run in a subprocess by tests/test_sequence_parallel.py.

The device count is fixed when JAX starts: importing tests/parallel_checks.py sets
``--xla_force_host_platform_device_count=8`` (and its CPU flags) before JAX. Every zoo entry runs on a mesh of 2, 4 or 8 devices
(entry ``i`` on ``meshes[i % 3]``) with ``L = 7 n`` positions (7 per device) and ``lengths`` whose rows end on
different devices (the last, the middle, the first), in event mode where the entry has it. One jitted program per
entry and layout computes the forward, the final cache and the gradient of a random linear function of both with
respect to the parameters and ``x``; the sequence-parallel program (``parallel.sequence_parallel``) is compared with
the one-device program (``model(...)``), and its compiled HLO is read: no collective moves an array with a length
axis (``L`` or ``L / n``), only the summaries and the conv halo. The first entry also runs
without ``lengths``; then the errors that need several devices.

Prints one JSON line of results (the pytest asserts on it); a failed assertion here raises.

Usage: ``python tests/sequence_parallel_checks.py [--meshes 2,4,8] [--entries NAME,...]``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

# parallel_checks sets XLA_FLAGS (8 fake CPU devices, fast CPU compilation) before it imports JAX
from parallel_checks import NUM_DEVICES, rel, tree_rel  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from lrnnx_jax import parallel  # noqa: E402
from zoo import ZOO  # noqa: E402

AXIS = "seq"
#: the batch and the positions per device: 7 (and L = 14, 28, 56) is no dimension of any zoo state, parameter or
#: conv window, so a collective with a length axis is recognisable by its shape
BATCH, SHARD_LENGTH = 3, 7
#: float32: the sequence-parallel state is Phi h + b composed over the devices instead of one sequential scan
#: (a few ulps, measured below 1e-6); the gradients run the same sums backwards
RTOL = 1e-5


def lengths_for(num_shards: int) -> np.ndarray:
    """Rows that end on the last device, inside the middle one and inside the first one."""
    return np.array([num_shards * SHARD_LENGTH, (num_shards // 2) * SHARD_LENGTH + 3, 2], np.int32)


def _loss(graphdef, params, rest, x, tau, lengths, weights, mesh):
    model = nnx.merge(graphdef, params, rest)
    if mesh is None:
        y, cache = model(x, tau, lengths, return_cache=True)
    else:
        y, cache = parallel.sequence_parallel(model, x, mesh=mesh, axis=AXIS, integration_timesteps=tau,
                                              lengths=lengths, return_cache=True)
    w_y, w_cache = weights
    loss = jnp.sum(y * w_y) + sum(jnp.sum(jnp.real(c * w)) for c, w in zip(jax.tree.leaves(cache), jax.tree.leaves(w_cache)))
    return loss, (y, cache)


@jax.jit(static_argnames=("graphdef", "mesh"))
def forward_and_grads(graphdef, params, rest, x, tau, lengths, weights, mesh=None):
    """``(y, cache, (d/dparams, d/dx))`` of a fixed random linear function of the output and the final cache; one
    device when ``mesh`` is None, else sequence-parallel over the mesh axis ``AXIS``."""
    (_, (y, cache)), grads = jax.value_and_grad(_loss, argnums=(1, 3), has_aux=True)(
        graphdef, params, rest, x, tau, lengths, weights, mesh)
    return y, cache, grads


def length_collectives(text: str, length: int, what: str) -> list:
    """The collectives of a compiled program; asserts that none has a length axis (``length`` or ``SHARD_LENGTH``)."""
    found, moved = parallel.collectives(text), parallel.length_collectives(text, length, length // SHARD_LENGTH)
    assert not moved, f"{what}: collectives on arrays with a length axis:\n{parallel.describe(moved)}"
    return found


def check_entry(entry, mesh, without_lengths: bool) -> dict:
    n = mesh.size
    length = n * SHARD_LENGTH
    rng = np.random.default_rng(n)
    model = entry.build()
    model.eval()
    x = rng.normal(size=(BATCH, length, model.d_model)).astype(np.float32)
    tau = rng.uniform(0.2, 1.5, size=(BATCH, length)).astype(np.float32) if entry.event else None
    cache_like = model.allocate_inference_cache(BATCH)
    weights = (rng.normal(size=x.shape).astype(np.float32),
               jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), cache_like))
    lengths = lengths_for(n)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    result = {"entry": entry.name, "devices": n, "event": tau is not None}

    one = forward_and_grads(graphdef, params, rest, jnp.asarray(x), tau, lengths, weights)
    args = (graphdef, params, rest, parallel.shard_sequence(x, mesh, AXIS),
            None if tau is None else parallel.shard_sequence(tau, mesh, AXIS), lengths, weights)
    compiled = forward_and_grads.lower(*args, mesh=mesh).compile()
    many = compiled(*args[1:])  # the static graphdef and mesh are baked in
    assert many[0].sharding.is_equivalent_to(parallel.sequence_sharding(mesh, AXIS), 3), many[0].sharding
    result["y_rel"] = rel(many[0], one[0])
    result["cache_rel"] = tree_rel(many[1], one[1])
    result["grad_params_rel"] = tree_rel(many[2][0], one[2][0])
    result["grad_x_rel"] = rel(many[2][1], one[2][1])
    assert max(result[k] for k in ("y_rel", "cache_rel", "grad_params_rel", "grad_x_rel")) < RTOL, result
    found = length_collectives(compiled.as_text(), length, entry.name)
    result["collectives"] = sorted({f"{c.op} {list(s)}" for c in found for s in c.shapes})
    # the chain of entering states (and nothing with a length axis)
    assert any(c.op == "collective-permute" for c in found), result
    # the halo of a conv window: (B, K, H) from the previous device
    result["halo"] = [BATCH, cache_like["conv_state"].shape[-1], model.d_model] if "conv_state" in cache_like else None

    if without_lengths:  # the forward and the final cache with every row to the end
        y_one, cache_one = model(jnp.asarray(x), tau, return_cache=True)
        y_many, cache_many = parallel.sequence_parallel(model, args[3], mesh=mesh, axis=AXIS,
                                                        integration_timesteps=args[4], return_cache=True)
        result["no_lengths_rel"] = max(rel(y_many, y_one), tree_rel(cache_many, cache_one))
        assert result["no_lengths_rel"] < RTOL, result
    return result


def check_errors(mesh) -> dict:
    """The messages of a length that does not divide over the devices, and of a conv window longer than a device's
    positions (they need several devices)."""
    lru, mamba = ZOO[0].build(), next(e for e in ZOO if e.name == "Mamba").build()
    x = np.zeros((BATCH, mesh.size * SHARD_LENGTH + 1, lru.d_model), np.float32)
    calls = {"indivisible": lambda: parallel.sequence_parallel(lru, x, mesh=mesh, axis=AXIS),
             "indivisible placement": lambda: parallel.shard_sequence(x, mesh, AXIS),
             "short shards": lambda: parallel.sequence_parallel(mamba, x[:, :3 * mesh.size], mesh=mesh, axis=AXIS)}
    messages = {}
    for name, call in calls.items():
        try:
            call()
        except ValueError as error:
            messages[name] = str(error)
    assert set(messages) == set(calls), messages
    return {"entry": "errors", "devices": mesh.size, "messages": messages}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--meshes", default="2,4,8")
    parser.add_argument("--entries", default="all", help="comma-separated zoo names, or all")
    parser.add_argument("--part", default="0/1", help="k/m: only the entries i with i %% m == k (m processes share "
                        "the zoo; part 0 also checks the error)")
    args = parser.parse_args(argv)
    assert len(jax.devices()) == NUM_DEVICES, jax.devices()
    part, parts = (int(v) for v in args.part.split("/"))
    meshes = [parallel.data_mesh(int(n), axis=AXIS) for n in args.meshes.split(",")]
    entries = ZOO if args.entries == "all" else [e for e in ZOO if e.name in args.entries.split(",")]
    start, results = time.perf_counter(), []
    for i, entry in enumerate(entries):
        if i % parts != part:
            continue
        results.append(check_entry(entry, meshes[i % len(meshes)], without_lengths=i == 0))
        results[-1]["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    if part == 0:
        results.append(check_errors(meshes[-1]))
    print(json.dumps({"results": results, "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
