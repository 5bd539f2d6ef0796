"""Inference benchmarks: autoregressive generation time against sequence length, model width and batch size.

The functions and their defaults mirror lrnnx's ``benchmarks/benchmark_inference.py``
(lengths 8...2048, widths 16...256, batches 8...128, B=32, H=128), and time
``generate`` with a graph from ``capture_graph``; they run unchanged on CPU and GPU::

    from lrnnx_jax.models.lti import LRU

    def model_fn():
        return LRU(d_model=128, d_state=16, rngs=nnx.Rngs(0))

    results = benchmark_sequence_length(model_fn)                       # {L: [ms, ...]}
    results = benchmark_model_dimension(lambda H: lambda: LRU(d_model=H, d_state=16, rngs=nnx.Rngs(0)))
    results = benchmark_batch_size(model_fn)

Each result maps a swept value to one mean time in milliseconds per repeat (a
repeat is ``runs`` timed calls after ``warmup`` untimed ones), and carries the
compile time separately in ``results.compile_s``.

Two runners are timed:

* ``"generate"``: the compiled generator (one XLA program per batch size);
* ``"step_loop"``: the baseline, a Python loop calling a jitted ``model.step``
  once per token (the JAX analogue of lrnnx's uncaptured loop). Its compile time
  is that of the jitted step.

Each sweep shows a progress bar (tqdm, or one printed line per value without it;
``progress=False`` for none). After the README's set-up (``make setup``) the
``benchmarks`` package is installed with the library, so
``from benchmarks.benchmark_inference import benchmark_sequence_length`` works from
any working directory, as in lrnnx's guide.

From the command line, ``python -m benchmarks.benchmark_inference [run_all options]``
runs the three sweeps for every model (``benchmarks.run_all --sweeps seq,dim,batch``)
and writes their CSV files, report and plots (µs per generated step against L, H
and B) to ``benchmark_results/``.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.reporting import Progress
from lrnnx_jax.generation import GenerationConfig, capture_graph, generate

SEQ_LENGTHS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
MODEL_DIMS = (16, 32, 64, 128, 256)
BATCH_SIZES = (8, 16, 32, 64, 128)


class Timings(dict):
    """``{swept value: [ms per repeat, ...]}``, with ``compile_s = {swept value: seconds}``."""

    def __init__(self):
        super().__init__()
        self.compile_s: dict = {}


def prepare_generate(model, batch_size: int, *, event: bool = False, config: Optional[GenerationConfig] = None):
    """The compiled generator: ``(run(x0, num_steps, tau), compile seconds)``."""
    graph = capture_graph(model, batch_size, event_mode=event, config=config)

    def run(x0, num_steps, tau):
        return generate(model, x0, num_steps, graph_cache=graph, integration_timesteps=tau)

    return run, graph.compile_time_s


def prepare_step_loop(model, batch_size: int, *, event: bool = False, config: Optional[GenerationConfig] = None):
    """The baseline, a Python loop over a jitted step: ``(run(x0, num_steps, tau), compile seconds)``.

    ``config`` is accepted for a uniform signature and has no effect here.
    """
    treedef = jax.tree.structure(model)
    cache0 = model.allocate_inference_cache(batch_size)

    @jax.jit
    def step(leaves, x_t, cache, tau):
        return jax.tree.unflatten(treedef, leaves).step(x_t, cache, integration_timesteps=tau)

    def run(x0, num_steps, tau):
        leaves, cache, x_t, ys = jax.tree.leaves(model), cache0, x0, []
        tau = None if tau is None else jnp.asarray(tau)
        for _ in range(num_steps):
            x_t, cache = step(leaves, x_t, cache, tau)
            ys.append(x_t)
        return jnp.stack(ys, axis=1)

    x0, tau = make_inputs(batch_size, model.d_model, event)
    start = time.perf_counter()
    jax.block_until_ready(step(jax.tree.leaves(model), x0, cache0, tau))
    return run, time.perf_counter() - start


RUNNERS: dict[str, Callable] = {"generate": prepare_generate, "step_loop": prepare_step_loop}


def make_inputs(batch_size: int, d_model: int, event: bool, seed: int = 0):
    """``x0 (B, H)`` standard normal on the device and, in event mode, ``tau (B, 1)`` in ``[0.01, 1.01)``
    (as lrnnx's test), a NumPy array: ``generate`` checks its values on the host."""
    rng = np.random.default_rng(seed)
    x0 = jnp.asarray(rng.standard_normal((batch_size, d_model), dtype=np.float32))
    tau = rng.uniform(0.01, 1.01, (batch_size, 1)).astype(np.float32) if event else None
    return x0, tau


def time_call(run_fn: Callable, warmup: int = 10, runs: int = 90) -> float:
    """Mean wall time of ``run_fn()`` in ms over ``runs`` calls, after ``warmup`` calls; each waits for its result."""
    for _ in range(warmup):
        jax.block_until_ready(run_fn())
    total = 0.0
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(run_fn())
        total += time.perf_counter() - start
    return 1e3 * total / runs


def _check_runner(runner: str):
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {sorted(RUNNERS)}, got {runner!r}")
    return RUNNERS[runner]


def _sweep(values, prepare_for: Callable, num_steps_for: Callable, repeats, warmup, runs, on_value, progress, name):
    """Shared loop: ``prepare_for(value) -> (run, x0, tau, compile_s)``; returns :class:`Timings`."""
    results = Timings()
    bar = Progress(len(values), desc=name) if progress else None
    try:
        for value in values:
            run, x0, tau, compile_s = prepare_for(value)
            num_steps = num_steps_for(value)
            results[value] = [time_call(lambda: run(x0, num_steps, tau), warmup, runs) for _ in range(repeats)]
            results.compile_s[value] = compile_s
            if on_value is not None:
                on_value(value, results[value])
            if bar is not None:
                bar.update(f"{name}={value}: {sum(results[value]) / len(results[value]):.3g} ms")
    finally:
        if bar is not None:
            bar.close()
    return results


def benchmark_sequence_length(
    model_fn: Callable,
    seq_lengths: Sequence[int] = SEQ_LENGTHS,
    batch_size: int = 32,
    repeats: int = 5,
    *,
    runner: str = "generate",
    event: bool = False,
    config: Optional[GenerationConfig] = None,
    warmup: int = 10,
    runs: int = 90,
    on_value: Optional[Callable] = None,
    progress: bool = True,
) -> Timings:
    """Generation time against the number of generated steps L.

    The generator is captured once for ``batch_size`` and serves every length.

    Args:
      model_fn: ``() -> model``.
      seq_lengths: the numbers of steps.
      batch_size, repeats: as lrnnx; ``warmup``/``runs``: untimed and timed calls per repeat.
      runner: ``"generate"`` or ``"step_loop"`` (the baseline).
      event: pass ``integration_timesteps (B, 1)``.
      config: the :class:`GenerationConfig` of the generator.
      on_value: called as ``on_value(L, [ms, ...])`` after each length.
      progress: show a progress bar over the lengths.

    Returns:
      :class:`Timings` ``{L: [ms, ...]}``.
    """
    prepare = _check_runner(runner)
    model = model_fn()
    run, compile_s = prepare(model, batch_size, event=event, config=config)
    x0, tau = make_inputs(batch_size, model.d_model, event)
    return _sweep(seq_lengths, lambda L: (run, x0, tau, compile_s), lambda L: L, repeats, warmup, runs, on_value,
                  progress, "seq_length")


def benchmark_model_dimension(
    model_fn_maker: Callable,
    model_dims: Sequence[int] = MODEL_DIMS,
    seq_len: int = 512,
    batch_size: int = 32,
    repeats: int = 5,
    *,
    runner: str = "generate",
    event: bool = False,
    config: Optional[GenerationConfig] = None,
    warmup: int = 10,
    runs: int = 90,
    on_value: Optional[Callable] = None,
    progress: bool = True,
) -> Timings:
    """Generation time of ``seq_len`` steps against the model width H; one model and generator per H.

    ``model_fn_maker(H)`` returns a ``model_fn`` (as in lrnnx). Other arguments as
    :func:`benchmark_sequence_length`. Returns :class:`Timings` ``{H: [ms, ...]}``.
    """
    prepare = _check_runner(runner)

    def prepare_for(H):
        model = model_fn_maker(H)()
        run, compile_s = prepare(model, batch_size, event=event, config=config)
        return (run, *make_inputs(batch_size, model.d_model, event), compile_s)

    return _sweep(model_dims, prepare_for, lambda H: seq_len, repeats, warmup, runs, on_value, progress, "model_dim")


def benchmark_batch_size(
    model_fn: Callable,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    seq_len: int = 512,
    repeats: int = 5,
    *,
    runner: str = "generate",
    event: bool = False,
    config: Optional[GenerationConfig] = None,
    warmup: int = 10,
    runs: int = 90,
    on_value: Optional[Callable] = None,
    progress: bool = True,
) -> Timings:
    """Generation time of ``seq_len`` steps against the batch size B; one generator per B.

    Other arguments as :func:`benchmark_sequence_length`. Returns :class:`Timings` ``{B: [ms, ...]}``.
    """
    prepare = _check_runner(runner)
    model = model_fn()

    def prepare_for(B):
        run, compile_s = prepare(model, B, event=event, config=config)
        return (run, *make_inputs(B, model.d_model, event), compile_s)

    return _sweep(batch_sizes, prepare_for, lambda B: seq_len, repeats, warmup, runs, on_value, progress, "batch_size")


def main(argv=None) -> dict:
    """``python -m benchmarks.benchmark_inference [run_all options]``: the three sweeps, with plots."""
    from benchmarks import run_all  # run_all imports this module

    argv = list(sys.argv[1:] if argv is None else argv)
    return run_all.main(["--sweeps", "seq,dim,batch", *argv])


if __name__ == "__main__":
    main()
