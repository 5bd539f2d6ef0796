"""Build every lrnnx_jax model, run a forward pass and a short generation, print shapes and timings.

Run with ``make demo`` (or ``python examples/quickstart.py`` inside the virtual environment).
Timings are wall-clock medians after a warm-up call, so compilation is reported separately.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from lrnnx_jax.generation import generate
from lrnnx_jax.models import lti, ltv

B, L, H, N, STEPS = 4, 256, 32, 16, 64

MODELS = {
    "LRU": lambda r: lti.LRU(d_model=H, d_state=N, r_min=0.5, r_max=0.99, rngs=r),
    "S4": lambda r: lti.S4(d_model=H, d_state=N, transposed=False, rngs=r),
    "S4D": lambda r: lti.S4D(d_model=H, d_state=N, transposed=False, rngs=r),
    "S5 (LTI)": lambda r: lti.S5(d_model=H, d_state=N, discretization="zoh", rngs=r),
    "Centaurus": lambda r: lti.Centaurus(d_model=H, d_state=N, sub_state_dim=4, mode="neck", rngs=r),
    "S5 (LTV)": lambda r: ltv.S5(d_model=H, d_state=N, rngs=r),
    "Mamba": lambda r: ltv.Mamba(d_model=H, d_state=N, rngs=r),
    "Mamba (event)": lambda r: ltv.Mamba(d_model=H, d_state=N, rngs=r),
    "RG-LRU": lambda r: ltv.RGLRU(d_model=H, rngs=r),
    "S7": lambda r: ltv.S7(d_model=H, d_state=N, rngs=r),
}


def timed(fn, repeats=5):
    """(first-call seconds, median seconds of later calls) of ``fn()``."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def main():
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (B, L, H))
    tau = jax.random.uniform(keys[1], (B, L), minval=0.1, maxval=1.0)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; B={B} L={L} H={H} d_state={N}")
    print(f"{'model':<14} {'forward out':<14} {'fwd compile+run':>16} {'fwd ms':>8} {'generate out':<14} {'gen ms':>8}")
    for name, build in MODELS.items():
        model = build(nnx.Rngs(0))
        event = "event" in name
        forward = nnx.jit(lambda m, xx, tt: m(xx, integration_timesteps=tt))
        first, median = timed(lambda: forward(model, x, tau if event else None))
        y = forward(model, x, tau if event else None)
        gen_tau = tau[:, :1] if event else None
        # a small seed: closed-loop feedback of a randomly initialised layer can grow without bound
        # (S7's input-dependent B_t x_t is quadratic in its input)
        x0 = 0.1 * x[:, 0]
        _, gen_median = timed(lambda: generate(model, x0, STEPS, integration_timesteps=gen_tau))
        ys = generate(model, x0, STEPS, integration_timesteps=gen_tau)
        assert bool(jnp.all(jnp.isfinite(y))) and bool(jnp.all(jnp.isfinite(ys))), name
        print(
            f"{name:<14} {str(tuple(y.shape)):<14} {first * 1e3:>13.0f} ms {median * 1e3:>8.2f} "
            f"{str(tuple(ys.shape)):<14} {gen_median * 1e3:>8.2f}"
        )


if __name__ == "__main__":
    main()
