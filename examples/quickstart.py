"""Build every lrnnx_jax model, run a forward pass and a short generation, print values you can check and timings.

Run with ``make demo`` (or ``.venv/bin/python examples/quickstart.py``). For each model it prints:

* ``step err``: max |forward - multi_step| / max |forward| over the first 16 tokens: the parallel forward and the
  recurrence are the same function, so this is float32 rounding (about 1e-7 to 1e-5);
* ``rms y``: the forward's root mean square, for unit-variance input (order 1 for these initialisations);
* ``gen max``: the largest |output| of a 64-step closed-loop generation from a small seed: it stays bounded
  here; an untrained model fed its own outputs can diverge, and ``generate`` warns when it does.

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


def bounded_closed_loop(model):
    """``model`` with its output map (``C`` and the skip ``D``) scaled by 0.1 when it is LRU or S5: ``generate`` feeds
    each output back as the next input, and at their initialisation the loop gain of these two exceeds one, so
    the rollout grows geometrically (measured: LRU reaches 1e34 in 1024 steps). Scaled, it decays (2048 steps)."""
    if type(model).__name__ in ("LRU", "S5"):
        for name in ("C_re", "C_im", "C", "D"):
            if hasattr(model, name):
                variable = getattr(model, name)
                variable.set_value(0.1 * variable.get_value())
    return model


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
    print(f"{'model':<14} {'forward out':<14} {'fwd compile+run':>16} {'fwd ms':>8} {'generate out':<14} {'gen ms':>8} "
          f"{'step err':>9} {'rms y':>7} {'gen max':>8}")
    for name, build in MODELS.items():
        model = build(nnx.Rngs(0))
        event = "event" in name
        forward = nnx.jit(lambda m, xx, tt: m(xx, integration_timesteps=tt))
        first, median = timed(lambda: forward(model, x, tau if event else None))
        y = forward(model, x, tau if event else None)
        y_steps, _ = model.multi_step(x[:, :16], model.allocate_inference_cache(B), tau[:, :16] if event else None)
        step_err = float(jnp.max(jnp.abs(y[:, :16] - y_steps)) / jnp.max(jnp.abs(y[:, :16])))
        gen_tau = tau[:, :1] if event else None
        # a small seed and a damped output map: closed-loop feedback of a randomly initialised layer can grow without
        # bound (S7's input-dependent B_t x_t is quadratic in its input)
        x0 = 0.1 * x[:, 0]
        model = bounded_closed_loop(model)
        _, gen_median = timed(lambda: generate(model, x0, STEPS, integration_timesteps=gen_tau))
        ys = generate(model, x0, STEPS, integration_timesteps=gen_tau)
        assert bool(jnp.all(jnp.isfinite(y))) and bool(jnp.all(jnp.isfinite(ys))), name
        print(
            f"{name:<14} {str(tuple(y.shape)):<14} {first * 1e3:>13.0f} ms {median * 1e3:>8.2f} "
            f"{str(tuple(ys.shape)):<14} {gen_median * 1e3:>8.2f} {step_err:>9.1e} {float(jnp.sqrt(jnp.mean(y * y))):>7.3f} "
            f"{float(jnp.max(jnp.abs(ys))):>8.3f}"
        )


if __name__ == "__main__":
    main()
