"""The cost of ``generate`` as a function of ``num_steps``, and what a new ``num_steps`` compiles.

    python -m benchmarks.benchmark_generate_steps [--models LRU,Mamba] [--batch 32] [--out result.json]

For each model (H=128, d_state=64, 16 for Mamba) it captures the XLA generation program
(``use_kernels="never"``, the default :class:`~lrnnx_jax.generation.GenerationConfig`) and times
``generate`` for 256, 257 and 320 steps (median of ``--repeats`` after ``--warmup`` untimed calls,
with the output ready). The program's cost should follow the number of steps, with no block
granularity: one more step should cost about one step, so ``t(257) - t(256)`` should be at most a
quarter of ``t(320) - t(256)`` (64 more steps); the ``ratio`` column is their quotient.

It then calls ``generate`` with 1, 7, 64, 65, 200, 300, 511 and 1000 steps on the captured program and
reports the seconds of XLA backend compilation they spent (JAX's monitoring event), and the same for
a repeat of those counts (which should be zero). Needs only jax, flax and numpy.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import numpy as np
from flax import nnx

from benchmarks.timing import median_seconds
from lrnnx_jax import generation
from lrnnx_jax.convert import model_class
from pallas_kernels import dispatch

H, N = 128, 64
MODELS = {
    "LRU": ("lti.LRU", dict(d_model=H, d_state=N)),
    "S5": ("lti.S5", dict(d_model=H, d_state=N, discretization="zoh")),
    "Mamba": ("ltv.Mamba", dict(d_model=H, d_state=16)),
    "RGLRU": ("ltv.RGLRU", dict(d_model=H)),
}
NEW_COUNTS = (1, 7, 64, 65, 200, 300, 511, 1000)


class BackendCompileSeconds:
    """Seconds of XLA backend compilation inside a ``with`` block."""

    def __enter__(self):
        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def _listen(self, event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            self.seconds += duration

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)


def bench(name: str, batch: int, warmup: int, repeats: int) -> dict:
    lrnnx_name, kwargs = MODELS[name]
    model = model_class(lrnnx_name)(**kwargs, rngs=nnx.Rngs(0))
    x0 = jax.device_put(np.random.default_rng(0).standard_normal((batch, H)).astype(np.float32) * 0.1)
    never = dispatch.KernelConfig(use_kernels="never")
    graph = generation.capture_graph(model, batch, kernel_config=never)
    times = {}
    for steps in (256, 257, 320):
        times[steps] = median_seconds(lambda: generation.generate(model, x0, steps, graph_cache=graph), warmup, repeats)
    one, sixty_four = times[257] - times[256], times[320] - times[256]
    with BackendCompileSeconds() as first:
        for steps in NEW_COUNTS:
            jax.block_until_ready(generation.generate(model, x0, steps, graph_cache=graph))
    with BackendCompileSeconds() as again:
        for steps in NEW_COUNTS:
            jax.block_until_ready(generation.generate(model, x0, steps, graph_cache=graph))
    return dict(model=name, batch=batch, t256_ms=1e3 * times[256], t257_ms=1e3 * times[257], t320_ms=1e3 * times[320],
                one_more_step_us=1e6 * one, sixty_four_more_us=1e6 * sixty_four,
                ratio=one / sixty_four if sixty_four > 0 else float("nan"),
                compile_new_counts_s=first.seconds, compile_repeated_counts_s=again.seconds,
                capture_compile_s=graph.compile_time_s)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    print(f"device: {getattr(device, 'device_kind', device)} ({jax.default_backend()}), jax {jax.__version__}")
    columns = ["model", "batch", "t256_ms", "t257_ms", "t320_ms", "one_more_step_us", "sixty_four_more_us", "ratio",
               "compile_new_counts_s", "compile_repeated_counts_s"]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    rows = []
    for name in args.models.split(","):
        row = bench(name, args.batch, args.warmup, args.repeats)
        rows.append(row)
        print("| " + " | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |",
              flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": str(getattr(device, "device_kind", device)), "jax": jax.__version__, "argv": sys.argv,
                       "new_counts": NEW_COUNTS, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
