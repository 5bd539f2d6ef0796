"""Autoregressive generation: each output is fed back as the next input.

``generate(model, x0, num_steps, integration_timesteps=None)`` runs the model's
pure ``step`` inside one jitted ``lax.scan``. The parameters are an argument of
the compiled program (``nnx.split``), never constants baked into it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lrnnx_jax.core import validation


@functools.partial(jax.jit, static_argnames=("graphdef", "num_steps"))
def _rollout(graphdef, params, x0, integration_timesteps, num_steps: int):
    model = nnx.merge(graphdef, params)
    cache = model.allocate_inference_cache(x0.shape[0], dtype=x0.dtype)
    if integration_timesteps is None:
        taus = None
    elif integration_timesteps.shape[1] == 1:
        taus = jnp.broadcast_to(integration_timesteps[:, 0], (num_steps, x0.shape[0]))
    else:
        taus = jnp.moveaxis(integration_timesteps, 1, 0)

    def body(carry, tau_t):
        x, cache = carry
        y, cache = model.step(x, cache, tau_t)
        return (y, cache), y

    _, ys = jax.lax.scan(body, (x0, cache), taus, length=num_steps)
    return jnp.moveaxis(ys, 0, 1)


def generate(model, x0, num_steps: int, integration_timesteps=None):
    """Closed-loop generation from a fresh state.

    Args:
      model: any lrnnx_jax model.
      x0: ``(B, H)`` first input.
      num_steps: number of generated steps (>= 1).
      integration_timesteps: event mode only; ``(B, 1)`` reused at every step (as
        in lrnnx) or ``(B, num_steps)`` for a per-step schedule.

    Returns:
      ``(B, num_steps, H)`` outputs; output t is the input of step t + 1.
    """
    x0 = validation.check_token(x0, model.d_model, name="x0")
    num_steps = validation.check_positive_int(num_steps, "num_steps")
    if integration_timesteps is not None:
        tau = jnp.asarray(integration_timesteps)
        if tau.ndim != 2 or tau.shape[1] not in (1, num_steps):
            raise ValueError(
                f"integration_timesteps must have shape (B, 1) or (B, num_steps) = ({x0.shape[0]}, {num_steps}), "
                f"got {tuple(tau.shape)}"
            )
        integration_timesteps = validation.check_timesteps(tau, (x0.shape[0], tau.shape[1]))
    graphdef, params = nnx.split(model)
    return _rollout(graphdef, params, x0, integration_timesteps, num_steps)
