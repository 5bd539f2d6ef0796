"""Argument checks shared by every model, generation and conversion.

Shape and dtype checks always run (shapes are static under ``jit``). Value
checks (negative or NaN timesteps, lengths out of range) run whenever the values
are concrete, i.e. outside ``jit``; inside a traced function they cannot raise.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
    """True when ``x`` holds values (not a tracer), so value checks can run."""
    return not isinstance(x, jax.core.Tracer)


def check_float(x, name: str):
    """Raise ``TypeError`` unless ``x`` has a floating dtype."""
    dtype = jnp.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype (float32, bfloat16, ...), got {dtype}")


def check_sequence(x, d_model: int, name: str = "x", layout: str = "(B, L, H)"):
    """Validate a full-sequence input ``(B, L, H)`` and return it as a JAX array."""
    if not hasattr(x, "shape"):
        x = jnp.asarray(x)
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape {layout} with H={d_model}, got rank {x.ndim} shape {tuple(x.shape)}")
    if x.shape[-1] != d_model:
        raise ValueError(f"{name} must have shape {layout} with H={d_model}, got shape {tuple(x.shape)}")
    check_float(x, name)
    return x


def check_token(x_t, d_model: int, name: str = "x_t"):
    """Validate a single-step input ``(B, H)``."""
    if not hasattr(x_t, "shape"):
        x_t = jnp.asarray(x_t)
    if x_t.ndim != 2 or x_t.shape[-1] != d_model:
        raise ValueError(f"{name} must have shape (B, H) with H={d_model}, got shape {tuple(x_t.shape)}")
    check_float(x_t, name)
    return x_t


def check_cache_batch(cache, batch_size: int, key: str):
    """Raise when the cache's batch size (leading axis of ``cache[key]``) differs from ``batch_size``."""
    if not isinstance(cache, dict) or key not in cache:
        got = sorted(cache) if isinstance(cache, dict) else type(cache).__name__
        raise TypeError(f"cache must be the dict from allocate_inference_cache with key {key!r}, got {got}")
    cache_batch = cache[key].shape[0]
    if cache_batch != batch_size:
        raise ValueError(
            f"x_t has batch size {batch_size} but the cache was allocated for batch size {cache_batch}; "
            f"call allocate_inference_cache(batch_size={batch_size})"
        )


def check_cache(cache, expected, key: str):
    """Raise unless ``cache`` has the keys and shapes of ``expected`` (an abstract inference cache)."""
    check_cache_batch(cache, jax.tree.leaves(expected[key])[0].shape[0] if key in expected else 0, key)
    if sorted(cache) != sorted(expected):
        raise ValueError(f"cache must have the keys {sorted(expected)} of allocate_inference_cache, got {sorted(cache)}")
    for name in expected:
        got, want = cache[name], expected[name]
        if tuple(got.shape) != tuple(want.shape):
            raise ValueError(f"cache[{name!r}] must have shape {tuple(want.shape)} (allocate_inference_cache), "
                             f"got {tuple(got.shape)}")
        if jnp.iscomplexobj(want) != jnp.iscomplexobj(got) or not jnp.issubdtype(got.dtype, jnp.inexact):
            raise TypeError(f"cache[{name!r}] must have a dtype like {want.dtype}, got {got.dtype}")


def check_lengths(lengths, batch: int, length: int, name: str = "lengths") -> Optional[jax.Array]:
    """Validate ``lengths (B,)`` integers in ``[0, L]`` and return the ``(B, L)`` validity mask."""
    if lengths is None:
        return None
    if not hasattr(lengths, "shape"):
        lengths = jnp.asarray(lengths)
    if lengths.shape != (batch,):
        raise ValueError(f"{name} must have shape (B,) = ({batch},), got {tuple(lengths.shape)}")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"{name} must be integers, got dtype {lengths.dtype}")
    if is_concrete(lengths):
        values = np.asarray(lengths)
        if values.min(initial=0) < 0 or values.max(initial=0) > length:
            raise ValueError(f"{name} must lie in [0, L={length}], got min {values.min()} and max {values.max()}")
    return jnp.arange(length)[None, :] < lengths[:, None]


def check_timesteps(integration_timesteps, shape: tuple[int, ...], name: str = "integration_timesteps"):
    """Validate event-mode timesteps and return them with shape ``shape`` (float).

    Accepts exactly ``shape`` or ``shape + (1,)``. Values must be finite and > 0.
    """
    if integration_timesteps is None:
        return None
    tau = integration_timesteps if hasattr(integration_timesteps, "shape") else jnp.asarray(integration_timesteps)
    if tuple(tau.shape) == tuple(shape) + (1,):
        tau = tau[..., 0]
    if tuple(tau.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tau.shape)}")
    check_float(tau, name)
    if is_concrete(tau):
        values = np.asarray(tau, dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError(f"{name} must be finite, got NaN or inf")
        if np.any(values <= 0):
            raise ValueError(f"{name} must be > 0 (time between events), got min {values.min()}")
    return tau


def reject_timesteps(integration_timesteps, model_name: str):
    """Raise for models that have no event mode, so timesteps are never silently ignored."""
    if integration_timesteps is not None:
        raise ValueError(
            f"{model_name} has no event mode and does not use integration_timesteps; "
            "pass integration_timesteps=None"
        )


def check_positive_int(value, name: str):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
