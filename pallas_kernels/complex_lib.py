"""Complex numbers as separate real and imaginary planes.

Pallas GPU has no complex dtype, so the kernels keep a complex array as a
:class:`Planes` pair of real arrays. Every function here takes either a plain real
array or a :class:`Planes` value and returns the same kind, so one piece of
arithmetic (the in-kernel discretizations of :mod:`pallas_kernels.kernel_math`)
serves the real state of Mamba and the complex state of S5 alike. The functions
use only elementwise ``jnp`` operations, which lower inside Pallas kernels.

The conversions :func:`split` and :func:`merge` are for the code around the
kernels (inputs, caches); nothing else in the package touches ``.real`` /
``.imag``.
"""

from __future__ import annotations

from typing import NamedTuple, Union

import jax
import jax.numpy as jnp

Array = jnp.ndarray


class Planes(NamedTuple):
    """A complex array stored as two real arrays of the same shape and dtype."""

    re: Array
    im: Array

    @property
    def shape(self):
        return self.re.shape

    @property
    def dtype(self):
        return self.re.dtype

    def astype(self, dtype) -> "Planes":
        return Planes(self.re.astype(dtype), self.im.astype(dtype))


Value = Union[Array, Planes]


def is_planes(a) -> bool:
    return isinstance(a, Planes)


def split(z, dtype=jnp.float32) -> Planes:
    """Complex (or real) array -> :class:`Planes` of ``dtype``."""
    z = jnp.asarray(z)
    if jnp.iscomplexobj(z):
        return Planes(jnp.real(z).astype(dtype), jnp.imag(z).astype(dtype))
    return Planes(z.astype(dtype), jnp.zeros(z.shape, dtype))


def merge(p: Planes, dtype=jnp.complex64) -> Array:
    """:class:`Planes` -> complex array (computed in float32 or wider)."""
    real = jnp.promote_types(p.re.dtype, jnp.float32)
    return jax.lax.complex(p.re.astype(real), p.im.astype(real)).astype(dtype)


def real(a: Value) -> Array:
    return a.re if is_planes(a) else a


def add(a: Value, b: Value) -> Value:
    if is_planes(a) or is_planes(b):
        a, b = _as_planes(a), _as_planes(b)
        return Planes(a.re + b.re, a.im + b.im)
    return a + b


def sub(a: Value, b: Value) -> Value:
    if is_planes(a) or is_planes(b):
        a, b = _as_planes(a), _as_planes(b)
        return Planes(a.re - b.re, a.im - b.im)
    return a - b


def scale(a: Value, r) -> Value:
    """``a * r`` for a real ``r``."""
    return Planes(a.re * r, a.im * r) if is_planes(a) else a * r


def add_real(a: Value, r) -> Value:
    """``a + r`` for a real ``r``."""
    return Planes(a.re + r, a.im) if is_planes(a) else a + r


def mul(a: Value, b: Value) -> Value:
    if is_planes(a) and is_planes(b):
        return Planes(a.re * b.re - a.im * b.im, a.re * b.im + a.im * b.re)
    if is_planes(a):
        return scale(a, b)
    if is_planes(b):
        return scale(b, a)
    return a * b


def div(a: Value, b: Value) -> Value:
    """``a / b``; for complex ``b`` by the textbook formula (no overflow scaling)."""
    if not is_planes(b):
        return Planes(a.re / b, a.im / b) if is_planes(a) else a / b
    a = _as_planes(a)
    denom = b.re * b.re + b.im * b.im
    return Planes((a.re * b.re + a.im * b.im) / denom, (a.im * b.re - a.re * b.im) / denom)


def exp(a: Value) -> Value:
    if not is_planes(a):
        return jnp.exp(a)
    modulus = jnp.exp(a.re)
    return Planes(modulus * jnp.cos(a.im), modulus * jnp.sin(a.im))


def expm1(a: Value) -> Value:
    """``exp(a) - 1``, accurate for small ``|a|``:
    ``Re = expm1(x) cos y - 2 sin^2(y/2)``, ``Im = exp(x) sin y``."""
    if not is_planes(a):
        return jnp.expm1(a)
    half = jnp.sin(0.5 * a.im)
    return Planes(jnp.expm1(a.re) * jnp.cos(a.im) - 2.0 * half * half, jnp.exp(a.re) * jnp.sin(a.im))


def where(mask, a: Value, b) -> Value:
    """``jnp.where(mask, a, b)`` for a real ``b`` (the complex number ``b + 0i`` where ``a`` is ``Planes``)."""
    if is_planes(a):
        return Planes(jnp.where(mask, a.re, b), jnp.where(mask, a.im, 0.0))
    return jnp.where(mask, a, b)


def _as_planes(a: Value) -> Planes:
    return a if is_planes(a) else Planes(a, jnp.zeros_like(a))
