"""Discretizations of a diagonal continuous-time system ``h' = A h + B u``.

Every function here is pure and elementwise. It takes a diagonal ``A`` (real or
complex, any shape), a step ``delta`` broadcastable against it, and optional
``integration_timesteps`` (event mode), and returns ``(A_bar, gamma)`` such that the
discrete recurrence is ::

    h_t = A_bar * h_{t-1} + gamma * (B u_t)

Event (asynchronous) mode scales only the part that propagates the state: the
A-step is ``delta_A = delta * integration_timesteps`` while the input normaliser
keeps ``delta``. Models whose A-step is not ``delta * tau`` (Mamba's event mode,
``delta_A = tau * softplus(b_A)``) pass ``delta_A`` explicitly instead.

These functions are the single definition of each discretization in the
library: the parallel scans, the single-step recurrences and the references of
the Pallas kernels all call them.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax.numpy as jnp

Array = jnp.ndarray
Discretization = Callable[..., tuple[Array, Array]]


def _delta_A(delta, integration_timesteps, delta_A):
    if delta_A is not None:
        if integration_timesteps is not None:
            raise ValueError("pass either integration_timesteps or delta_A, not both")
        return delta_A
    if integration_timesteps is None:
        return delta
    return delta * integration_timesteps


def _ones(A, delta):
    shape = jnp.broadcast_shapes(jnp.shape(A), jnp.shape(delta))
    return jnp.ones(shape, dtype=jnp.result_type(jnp.real(A), delta))


def zoh(A, delta, integration_timesteps=None, *, delta_A=None):
    """Zero-order hold: ``A_bar = exp(delta_A A)``, ``gamma = (exp(delta A) - 1) / A``."""
    dA = _delta_A(delta, integration_timesteps, delta_A)
    return jnp.exp(dA * A), jnp.expm1(delta * A) / A


def async_(A, delta, integration_timesteps=None, *, delta_A=None):
    """Asynchronous (event) ZOH of Event-SSM: ``exp(delta tau A)`` and ``A^-1 (exp(delta A) - I)``.

    Unlike :func:`zoh`, it requires the integration timesteps (or ``delta_A``).
    """
    if integration_timesteps is None and delta_A is None:
        raise ValueError(
            "the 'async' discretization needs integration_timesteps (the time between "
            "events); use 'zoh' for regularly sampled input"
        )
    return zoh(A, delta, integration_timesteps, delta_A=delta_A)


def bilinear(A, delta, integration_timesteps=None, *, delta_A=None):
    """Bilinear (Tustin): ``A_bar = (1 + dA A/2)/(1 - dA A/2)``, ``gamma = delta/(1 - delta A/2)``.

    This is the standard transform; lrnnx's ``core.discretization.bilinear`` has the
    sign flipped (see docs/differences-from-lrnnx.md).
    """
    dA = _delta_A(delta, integration_timesteps, delta_A)
    return (1 + dA * A / 2) / (1 - dA * A / 2), delta / (1 - delta * A / 2)


def dirac(A, delta, integration_timesteps=None, *, delta_A=None):
    """Dirac-delta input (Event-SSM): ``A_bar = exp(delta_A A)``, ``gamma = 1``."""
    dA = _delta_A(delta, integration_timesteps, delta_A)
    return jnp.exp(dA * A), _ones(A, delta)


def mamba(A, delta, integration_timesteps=None, *, delta_A=None):
    """Mamba's simplified ZOH: ``A_bar = exp(delta_A A)``, ``gamma = delta``."""
    dA = _delta_A(delta, integration_timesteps, delta_A)
    return jnp.exp(dA * A), jnp.broadcast_to(delta, jnp.broadcast_shapes(jnp.shape(A), jnp.shape(delta))).astype(
        jnp.result_type(jnp.real(A), delta)
    )


def no_discretization(A, delta, integration_timesteps=None, *, delta_A=None):
    """``A`` is already discrete: ``A_bar = A``, ``gamma = 1``. Event mode is not defined."""
    if integration_timesteps is not None or delta_A is not None:
        raise ValueError("'no_discretization' treats A as discrete and cannot use integration_timesteps")
    return jnp.broadcast_to(A, jnp.broadcast_shapes(jnp.shape(A), jnp.shape(delta))), _ones(A, delta)


DISCRETIZATIONS: dict[str, Discretization] = {
    "zoh": zoh,
    "bilinear": bilinear,
    "dirac": dirac,
    "async": async_,
    "mamba": mamba,
    "no_discretization": no_discretization,
}


def get_discretization(name: str, allowed: Optional[tuple[str, ...]] = None) -> Discretization:
    """Look a discretization up by name.

    Args:
      name: one of :data:`DISCRETIZATIONS` (or of ``allowed``, when a model accepts fewer).
      allowed: the subset of names the caller accepts; defaults to all of them.

    Raises:
      ValueError: for an unknown (or not allowed) name, listing the valid ones.
    """
    valid = tuple(DISCRETIZATIONS) if allowed is None else allowed
    if not isinstance(name, str) or name not in valid:
        raise ValueError(f"unknown discretization {name!r}; expected one of {sorted(valid)}")
    return DISCRETIZATIONS[name]


def discretize(name: str, A, delta, integration_timesteps=None, *, delta_A=None):
    """``get_discretization(name)(A, delta, integration_timesteps, delta_A=delta_A)``."""
    return get_discretization(name)(A, delta, integration_timesteps, delta_A=delta_A)
