"""Train a sequence model data-parallel on every visible device: the batch sharded, the parameters replicated.
With ``--sequence-parallel``, the sequence axis is sharded instead (``lrnnx_jax.parallel.sequence_parallel``).

Run ``python examples/train_multi_device.py`` inside the virtual environment. On a CPU, fake devices show the
same program::

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python examples/train_multi_device.py

The task: recover a causal filter of a noisy input (a damped oscillation driven by the input, whose response a
linear RNN can represent), with a mean-squared-error loss. Each training step is one ``jax.jit``: the batch is
split over the mesh axis ``"data"`` (``lrnnx_jax.parallel.shard_batch``), each device runs the model on its rows,
and the gradient is summed by one all-reduce per parameter; the updated parameters stay replicated. The script
prints the collectives of the compiled step (``lrnnx_jax.parallel.collectives``): none moves an activation. Then it
generates from the trained model with the batch still sharded.

With ``--sequence-parallel`` every device holds all rows and ``L / n`` consecutive positions (mesh axis
``"sequence"``): each device runs its positions from the zero state, the devices exchange their final states and
transitions (small summaries), and each runs its positions again from its true entering state. The compiled step's
collectives then move no array with a length axis (``lrnnx_jax.parallel.length_collectives``). After training, the
final inference cache of the held-out sequences, computed sequence-parallel, is compared with one device's.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

# XLA's multi-threaded CPU FFT can deadlock on 2-core machines (README); the LRU's FFT path runs here
if "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lrnnx_jax import parallel
from lrnnx_jax.generation import generate
from lrnnx_jax.models.lti.lru import LRU
from lrnnx_jax.models.ltv.mamba import Mamba

MODELS = {"lru": lambda d_model, d_state, rngs: LRU(d_model=d_model, d_state=d_state, r_min=0.5, r_max=0.99, rngs=rngs),
          "mamba": lambda d_model, d_state, rngs: Mamba(d_model=d_model, d_state=d_state, rngs=rngs)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="mamba",
                        help="lru runs its FFT path at this length, around which XLA still gathers the batch (README)")
    parser.add_argument("--devices", type=int, default=None, help="how many devices (default: all visible)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64, help="the global batch (a multiple of the device count)")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--d-model", type=int, default=16)
    parser.add_argument("--d-state", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sequence-parallel", action="store_true",
                        help="shard the sequence axis over the devices instead of the batch (the length must be a "
                             "multiple of the device count)")
    return parser.parse_args(argv)


def make_batch(rng: np.random.Generator, batch: int, length: int, channels: int):
    """Noisy inputs and the response of a damped oscillator (one per channel) to the clean ones."""
    clean = rng.normal(size=(batch, length, channels)).astype(np.float32)
    noisy = clean + 0.3 * rng.normal(size=clean.shape).astype(np.float32)
    radius, angle = 0.9, np.linspace(0.1, 0.6, channels)
    state = np.zeros((batch, channels), np.complex64)
    target = np.empty_like(clean)
    for t in range(length):
        state = radius * np.exp(1j * angle) * state + clean[:, t]
        target[:, t] = 0.3 * state.real
    return noisy, target


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.sequence_parallel:
        mesh = parallel.data_mesh(args.devices, axis=parallel.SEQUENCE)
        print(f"{mesh.size} devices ({jax.devices()[0].platform}), mesh axis {parallel.SEQUENCE!r}; length "
              f"{args.length}, {args.length // mesh.size} positions per device")
        shard = functools.partial(parallel.shard_sequence, mesh=mesh)
        forward = functools.partial(parallel.sequence_parallel, mesh=mesh, axis=parallel.SEQUENCE)
    else:
        mesh = parallel.data_mesh(args.devices)
        print(f"{mesh.size} devices ({jax.devices()[0].platform}), mesh axis 'data'; global batch {args.batch}, "
              f"{args.batch // mesh.size} rows per device")
        shard = functools.partial(parallel.shard_batch, mesh=mesh)
        forward = lambda model, x: model(x)  # noqa: E731
    model = MODELS[args.model](args.d_model, args.d_state, nnx.Rngs(args.seed))
    parallel.replicate(model, mesh)
    optimizer = optax.adam(args.lr)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = parallel.replicate(optimizer.init(params), mesh)

    @jax.jit
    def train_step(params, opt_state, x, target):
        def loss_fn(params):
            y = forward(nnx.merge(graphdef, params, rest), x)
            return jnp.mean((y - target) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(args.seed)
    held_out = shard(make_batch(rng, args.batch, args.length, args.d_model))
    evaluate = jax.jit(lambda params, x, target: jnp.mean((forward(nnx.merge(graphdef, params, rest), x) - target) ** 2))
    initial_loss = float(evaluate(params, *held_out))
    print(f"held-out loss before training: {initial_loss:.4f}")

    batch = shard(make_batch(rng, args.batch, args.length, args.d_model))
    text = train_step.lower(params, opt_state, *batch).compile().as_text()
    found = parallel.collectives(text)
    if args.sequence_parallel:
        moved, what = parallel.length_collectives(text, args.length, mesh.size), "with a length axis"
    else:
        moved, what = parallel.activation_collectives(text, args.batch, mesh.size), "on batch-shaped arrays"
    print(f"the compiled step has {len(found)} collectives ({', '.join(sorted({c.op for c in found})) or 'none'}), "
          f"{len(moved)} {what}")
    start, losses = time.perf_counter(), []
    for step in range(args.steps):
        params, opt_state, loss = train_step(params, opt_state, *batch)
        losses.append(float(loss))
        if (step + 1) % max(1, args.steps // 5) == 0:
            print(f"step {step + 1:5d}  loss {losses[-1]:.4f}")
        batch = shard(make_batch(rng, args.batch, args.length, args.d_model))
    seconds = time.perf_counter() - start
    final_loss = float(evaluate(params, *held_out))
    print(f"held-out loss after {args.steps} steps: {final_loss:.4f} ({seconds:.1f} s)")

    nnx.update(model, params)
    model.eval()
    result = {"initial_loss": initial_loss, "final_loss": final_loss, "losses": losses, "devices": mesh.size,
              "collectives": found, "activation_collectives": moved, "params": params, "mesh": mesh}
    if args.sequence_parallel:  # the final cache of the held-out sequences: split over the devices, and on one
        _, cache = forward(model, held_out[0], return_cache=True)
        _, cache_one = model(np.asarray(held_out[0]), return_cache=True)
        result["cache_difference"] = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                                         for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(cache_one)))
        print(f"final cache from {mesh.size} devices vs one: relative difference {result['cache_difference']:.1e}")
        return result
    x0 = parallel.shard_batch(np.asarray(held_out[0][:, 0]), mesh)
    result["generated"] = ys = generate(model, x0, 16)
    print(f"generate: {ys.shape}, rows on {len(ys.sharding.device_set)} devices")
    return result


if __name__ == "__main__":
    main()
