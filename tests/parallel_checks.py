"""Data-parallel checks on fake CPU devices, run in a subprocess by tests/test_parallel.py.

The device count is fixed when JAX starts, so this script sets ``--xla_force_host_platform_device_count`` (with
the CPU flags of conftest.py) before importing JAX. For each zoo entry, on a mesh of ``--meshes`` devices (entry
``i`` on ``meshes[i % len(meshes)]``, so every mesh size serves a third of the zoo), it checks, against the same
computation on one device:

* an optax training step (forward, gradient, update) with the batch sharded and the parameters replicated;
* the forward (``model(x)``) and ``model.step``;
* ``generate`` (with and without ``capture_graph``), sharded outputs;

and reads each compiled program: no collective moves a batch-shaped array (``parallel.activation_collectives``);
the forward, step and generation programs have no collective at all. Then ``generate_tokens`` of a small language
model with a sharded prompt, and a kernel forced with ``use_kernels="always"`` under the mesh (it refuses, with a
warning, and the XLA path runs). Prints one JSON line of results; any failed check raises.

Usage: ``python tests/parallel_checks.py [--meshes 2,4,8] [--entries NAME,...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
import warnings

CPU_FLAGS = ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
             "--xla_cpu_multi_thread_eigen=false"]
NUM_DEVICES = 8
os.environ["XLA_FLAGS"] = " ".join([f"--xla_force_host_platform_device_count={NUM_DEVICES}", *CPU_FLAGS])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from lrnnx_jax import generation, parallel  # noqa: E402
from lrnnx_jax.core import base  # noqa: E402
from lrnnx_jax.generation import capture_graph, generate, generate_tokens  # noqa: E402
from pallas_kernels import KernelConfig  # noqa: E402
from zoo import ZOO  # noqa: E402

#: the batch: divisible by 2, 4 and 8, and (global 56, per device 28, 14, 7) equal to no parameter dimension of the
#: zoo, so that a collective on a batch-shaped array is recognisable by its leading dimension
BATCH, LENGTH, GEN_STEPS = 56, 12, 5
#: float32 tolerances: the sharded programs sum the loss and the gradient in another order (a few ulps), and SGD
#: with momentum passes that on linearly
RTOL = 2e-5


def rel(a, b) -> float:
    a, b = np.asarray(a, np.complex128), np.asarray(b, np.complex128)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def tree_rel(a, b) -> float:
    return max(rel(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def no_activation_collectives(text: str, num_shards: int, what: str, *, none_at_all: bool = False) -> int:
    found = parallel.collectives(text) if none_at_all else parallel.activation_collectives(text, BATCH, num_shards)
    assert not found, f"{what}: collectives {'' if none_at_all else 'on batch-shaped arrays '}found:\n{parallel.describe(found)}"
    return len(parallel.collectives(text))


OPTIMIZER = optax.sgd(0.05, momentum=0.9)


def _loss(graphdef, params, rest, x, tau, target):
    model = nnx.merge(graphdef, params, rest)
    y = model(x, integration_timesteps=tau)
    return jnp.mean((y - target) ** 2)


@jax.jit(static_argnums=0)
def train_step(graphdef, params, rest, opt_state, x, tau, target):
    """One optax step on ``(x, target)``; the same program serves one device and a sharded batch."""
    loss, grads = jax.value_and_grad(_loss, argnums=1)(graphdef, params, rest, x, tau, target)
    updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, grads


def check_entry(entry, mesh, public_api: bool = True, captured: bool = True) -> dict:
    """The checks of one zoo entry on ``mesh``; ``public_api``: also ``model(x)`` and ``model.step`` (their programs
    are inside the training step and the generation program already); ``captured``: also ``capture_graph``."""
    n = mesh.size
    rng = np.random.default_rng(0)
    model = entry.build()
    model.eval()  # eval: dropout would draw different masks per layout; generation needs it anyway
    x = rng.normal(size=(BATCH, LENGTH, model.d_model)).astype(np.float32)
    target = rng.normal(size=x.shape).astype(np.float32)
    tau = rng.uniform(0.2, 1.5, size=(BATCH, LENGTH)).astype(np.float32) if entry.event else None
    sharded = lambda a: None if a is None else parallel.shard_batch(a, mesh)  # noqa: E731
    result = {"entry": entry.name, "devices": n}

    # ---- the training step
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = OPTIMIZER.init(params)
    one = train_step(graphdef, params, rest, opt_state, jnp.asarray(x), None if tau is None else jnp.asarray(tau),
                     jnp.asarray(target))
    args = (parallel.replicate(params, mesh), parallel.replicate(rest, mesh), parallel.replicate(opt_state, mesh),
            sharded(x), sharded(tau), sharded(target))
    many = train_step(graphdef, *args)
    result["train_loss_rel"] = rel(many[2], one[2])
    result["train_grad_rel"] = tree_rel(many[3], one[3])
    result["train_params_rel"] = tree_rel(many[0], one[0])
    assert result["train_loss_rel"] < RTOL and result["train_grad_rel"] < 1e-4 and result["train_params_rel"] < RTOL, result
    text = train_step.lower(graphdef, *args).compile().as_text()
    result["train_collectives"] = no_activation_collectives(text, n, f"{entry.name} training step")

    parallel.replicate(model, mesh)
    if public_api:
        check_forward_and_step(entry, model, mesh, x, tau, result)

    # ---- generate: cached per sharding, and captured ahead of time
    x0 = (0.3 * x[:, 0]).astype(np.float32)
    gen_tau = None if tau is None else tau[:, :1]
    ys_one = generate(entry.build(), jnp.asarray(x0), GEN_STEPS, integration_timesteps=gen_tau)
    ys_many = generate(model, sharded(x0), GEN_STEPS, integration_timesteps=gen_tau)
    assert ys_many.sharding.is_equivalent_to(parallel.batch_sharding(mesh), 3), ys_many.sharding
    result["generate_rel"] = rel(ys_many, ys_one)
    generator = generation._GENERATORS[next(reversed(generation._GENERATORS))]
    assert generator.sharding == parallel.batch_sharding(mesh)
    no_activation_collectives(generator.compiled.as_text(), n, f"{entry.name} generate", none_at_all=True)
    if captured:
        graph = capture_graph(model, BATCH, event_mode=entry.event, sharding=parallel.batch_sharding(mesh))
        ys_graph = generate(model, sharded(x0), GEN_STEPS, graph_cache=graph, integration_timesteps=gen_tau)
        assert ys_graph.sharding.is_equivalent_to(parallel.batch_sharding(mesh), 3), ys_graph.sharding
        ys_host = generate(model, x0, GEN_STEPS, graph_cache=graph, integration_timesteps=gen_tau)  # placed as captured
        assert ys_host.sharding.is_equivalent_to(parallel.batch_sharding(mesh), 3), ys_host.sharding
        result["generate_rel"] = max(result["generate_rel"], rel(ys_graph, ys_one), rel(ys_host, ys_one))
    assert result["generate_rel"] < 1e-6, result
    return result


def check_forward_and_step(entry, model, mesh, x, tau, result):
    """``model(x)`` and ``model.step`` (the library's own jitted programs) on a sharded batch."""
    n = mesh.size
    sharded = lambda a: None if a is None else parallel.shard_batch(a, mesh)  # noqa: E731
    y_one = entry.build()(jnp.asarray(x), integration_timesteps=tau)
    y_many = model(sharded(x), integration_timesteps=sharded(tau))
    assert y_many.sharding.is_equivalent_to(parallel.batch_sharding(mesh), 3), y_many.sharding
    result["forward_rel"] = rel(y_many, y_one)
    assert result["forward_rel"] < 1e-6, result
    graphdef, state = nnx.split(model)
    text = base._jit_forward.lower(graphdef, state, sharded(x), sharded(tau), None, None, None, False).compile().as_text()
    no_activation_collectives(text, n, f"{entry.name} forward", none_at_all=True)

    cache = model.allocate_inference_cache(BATCH)
    tau_t = None if tau is None else tau[:, 0]
    y_t_one, cache_one = entry.build().step(jnp.asarray(x[:, 0]), cache, integration_timesteps=tau_t)
    cache_many = parallel.shard_batch(cache, mesh)
    y_t_many, cache_many = model.step(sharded(x[:, 0]), cache_many, integration_timesteps=sharded(tau_t))
    result["step_rel"] = max(rel(y_t_many, y_t_one), tree_rel(cache_many, cache_one))
    assert result["step_rel"] < 1e-6, result
    assert all(leaf.sharding.is_equivalent_to(parallel.batch_sharding(mesh), leaf.ndim) for leaf in jax.tree.leaves(cache_many))
    text = base._jit_step.lower(graphdef, state, sharded(x[:, 0]), parallel.shard_batch(cache, mesh), sharded(tau_t),
                                KernelConfig()).compile().as_text()
    no_activation_collectives(text, n, f"{entry.name} step", none_at_all=True)


def check_language_model(mesh) -> dict:
    from test_language_model import VOCAB, build

    model = build(["Mamba", "attn"])
    model.eval()
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, VOCAB, (BATCH, 6)).astype(np.int32)
    lengths = rng.integers(1, 7, BATCH).astype(np.int32)
    one = generate_tokens(model, prompt, 7, prompt_lengths=lengths)
    parallel.replicate(model, mesh)
    many = generate_tokens(model, parallel.shard_batch(prompt, mesh), 7, prompt_lengths=lengths)
    assert many.sharding.is_equivalent_to(parallel.batch_sharding(mesh), 2), many.sharding
    assert np.array_equal(np.asarray(many), np.asarray(one))
    return {"entry": "generate_tokens Mamba+attn", "devices": mesh.size}


def check_kernel_refusal(mesh) -> dict:
    """A kernel forced under the mesh takes the XLA path with a warning (no partitioned kernels yet)."""
    entry = next(e for e in ZOO if e.name == "LRU")
    model = parallel.replicate(entry.build(), mesh)
    x = np.random.default_rng(2).normal(size=(BATCH, model.d_model)).astype(np.float32)
    cache = parallel.shard_batch(model.allocate_inference_cache(BATCH), mesh)
    reference, _ = model.step(parallel.shard_batch(x, mesh), cache, kernel_config=KernelConfig(use_kernels="never"))
    with warnings.catch_warnings(record=True) as caught, parallel.data_parallel(mesh):
        warnings.simplefilter("always")
        y, _ = model.step(parallel.shard_batch(x, mesh), cache, kernel_config=KernelConfig(use_kernels="always"))
    assert any("mesh of" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert np.array_equal(np.asarray(y), np.asarray(reference))
    return {"entry": "kernel refusal", "devices": mesh.size}


def probe_fft_path(mesh) -> dict:
    """A known gap, reported and not asserted: the training step of an LTI model on its FFT path (``method="fft"``).
    XLA's partitioner gathers the batch around the FFT convolution (``lrnnx_jax/core/conv.py``): the count of
    collectives on batch-shaped arrays, which tests/test_parallel.py expects to be zero one day (a strict xfail)."""
    entry = next(e for e in ZOO if e.name == "LRU")
    model = entry.build(method="fft")
    rng = np.random.default_rng(3)
    x, target = (rng.normal(size=(BATCH, LENGTH, model.d_model)).astype(np.float32) for _ in range(2))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    args = (parallel.replicate(params, mesh), parallel.replicate(rest, mesh),
            parallel.replicate(OPTIMIZER.init(params), mesh), *parallel.shard_batch((x, None, target), mesh))
    text = train_step.lower(graphdef, *args).compile().as_text()
    return {"entry": "LRU fft probe", "devices": mesh.size,
            "activation_collectives": len(parallel.activation_collectives(text, BATCH, mesh.size))}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--meshes", default="2,4,8")
    parser.add_argument("--entries", default="all", help="comma-separated zoo names, or all")
    parser.add_argument("--extras", action=argparse.BooleanOptionalAction, default=True,
                        help="also generate_tokens and the kernel refusal")
    args = parser.parse_args(argv)
    assert len(jax.devices()) == NUM_DEVICES, jax.devices()
    meshes = [parallel.data_mesh(int(n)) for n in args.meshes.split(",")]
    entries = ZOO if args.entries == "all" else [e for e in ZOO if e.name in args.entries.split(",")]
    start, results = time.perf_counter(), []
    for i, entry in enumerate(entries):
        # model(x) and model.step on every fourth entry, capture_graph on the first of each mesh (the programs of the
        # others are the same drivers; this keeps the run near a minute on one core)
        results.append(check_entry(entry, meshes[i % len(meshes)], public_api=i % 4 == 0, captured=i < len(meshes)))
        results[-1]["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    if args.extras:
        results.append(check_language_model(meshes[-1]))
        results.append(check_kernel_refusal(meshes[0]))
        results.append(probe_fft_path(meshes[0]))
    print(json.dumps({"results": results, "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
