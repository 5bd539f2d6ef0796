"""The operations that lower in Pallas kernels, written once for the kernels, the cells and the references.

Everything here is elementwise ``jnp``, a reduction, or a ``dot_general``, takes real
arrays or :class:`~pallas_kernels.complex_lib.Planes`, and lowers inside a Pallas
(Triton) kernel body as well as in XLA (except :func:`hardware_exp`, which is GPU assembly). The model cells are
written with these functions only, so one step function serves the XLA drivers and the kernels.

* :func:`discretize`: the kernels' versions of ``lrnnx_jax.core.discretization``
  (which stays the single definition for the models' parallel paths; the two are
  compared on random inputs in tests/test_pallas_kernel_math.py);
* :func:`contract` and :func:`project`: a vector (or a block of rows) contracted with a parameter
  tile, for the SSM's own contractions and for the dense projections around it (:class:`Precisions`);
* activations: :func:`softplus`, :func:`silu`, :func:`sigmoid`, :func:`gelu` (with a
  rational :func:`erf`, since ``lax.erf`` has no Triton lowering);
* :func:`hardware_exp`: ``e^x`` on the GPU's ``ex2.approx.ftz``, which a compiled kernel can pass as the ``exp`` of
  :func:`discretize`, :func:`softplus`, :func:`sigmoid` and :func:`silu` (``jnp.exp`` by default).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import complex_lib as cl
from pallas_kernels import dispatch

#: the discretizations the kernels implement (those of lrnnx_jax.core.discretization)
DISCRETIZATIONS = ("zoh", "async", "bilinear", "dirac", "mamba", "no_discretization")


def discretize(name: str, A, delta, delta_A=None, exp=cl.exp):
    """``(A_bar, gamma)`` of ``h_t = A_bar h_{t-1} + gamma (B u_t)``.

    Args:
      name: one of :data:`DISCRETIZATIONS`.
      A: real array or ``Planes``; ``delta`` (and ``delta_A``, the A-step of event
        mode, ``delta`` when None) real arrays broadcastable against it.
      exp: the exponential of ``A_bar``: ``cl.exp``, or :func:`hardware_exp` for a real ``A`` in a kernel.

    Returns:
      ``A_bar`` like ``A``; ``gamma`` real or ``Planes`` (for ``"dirac"`` and
      ``"no_discretization"`` the scalar 1.0).
    """
    step_A = delta if delta_A is None else delta_A
    if name == "no_discretization":
        return A, 1.0
    if name == "bilinear":
        half = cl.scale(A, 0.5 * step_A)
        A_bar = cl.div(cl.add_real(half, 1.0), cl.add_real(cl.scale(half, -1.0), 1.0))
        gamma = cl.div(delta, cl.add_real(cl.scale(A, -0.5 * delta), 1.0))
        return A_bar, gamma
    A_bar = exp(cl.scale(A, step_A))
    if name in ("zoh", "async"):
        return A_bar, cl.div(cl.expm1(cl.scale(A, delta)), A)
    if name == "mamba":
        return A_bar, delta
    if name == "dirac":
        return A_bar, 1.0
    raise ValueError(f"unknown discretization {name!r}; expected one of {sorted(DISCRETIZATIONS)}")


class Precisions(NamedTuple):
    """The dot precisions of a block of rows in the XLA drivers: ``state`` for the SSM's own contractions
    (:func:`contract`; ``HIGHEST``), ``projection`` for the dense projections around it (:func:`project`;
    None: JAX's default matmul precision, as the models' forwards). A kernel passes one precision for both."""

    state: Any
    projection: Any


def contract(v, W, axis: int, precision=None):
    """``v`` contracted with the parameter tile ``W`` along ``W``'s ``axis`` (an SSM contraction).

    ``v`` is ``(K,)``, one row: multiply-adds and a reduction (exact float32, what a
    one-row kernel program runs); or ``(R, K)``, a block of rows (the batch in the XLA
    drivers, a block of rows in a kernel): a ``dot_general`` at ``precision`` (a
    :class:`Precisions` gives its ``state``), or with ``precision``
    :data:`~pallas_kernels.dispatch.MULTIPLY_ADD` multiply-adds over an ``(R, *W.shape)`` tile and a
    reduction (a kernel's block of fewer rows than a dot takes). The result is ``W``'s shape without
    ``axis``, after ``R`` for a block. With a 2-D ``W`` this is ``v @ W.T`` for ``axis=1`` and ``v @ W``
    for ``axis=0``.
    """
    if isinstance(precision, Precisions):
        precision = precision.state
    if v.dtype != W.dtype:
        common = jnp.promote_types(v.dtype, W.dtype)
        v, W = v.astype(common), W.astype(common)
    if _by_multiply_adds(v, precision):
        v, summed = _against_tile(v, W.ndim, axis)
        return jnp.sum(W * v, axis=summed)
    return jax.lax.dot_general(v, W, (((v.ndim - 1,), (axis,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.promote_types(v.dtype, jnp.float32))


def contract_real_part(v: cl.Planes, W, axis: int, precision=None):
    """``Re(v W)``: the complex ``v`` contracted with ``W`` (real or ``Planes``) along ``W``'s ``axis``, as
    :func:`contract`. By multiply-adds (one row, or :data:`~pallas_kernels.dispatch.MULTIPLY_ADD`) ``v.re W.re - v.im
    W.im`` is formed elementwise and summed once: one reduction, where a kernel's program would otherwise reduce (and
    synchronize) once per plane."""
    if isinstance(precision, Precisions):
        precision = precision.state
    if not cl.is_planes(W):
        return contract(v.re, W, axis, precision)
    if not _by_multiply_adds(v.re, precision):
        return contract(v.re, W.re, axis, precision) - contract(v.im, W.im, axis, precision)
    common = jnp.promote_types(v.re.dtype, W.re.dtype)
    (re, summed), (im, _) = (_against_tile(part.astype(common), W.re.ndim, axis) for part in (v.re, v.im))
    return jnp.sum(W.re.astype(common) * re - W.im.astype(common) * im, axis=summed)


def _by_multiply_adds(v, precision) -> bool:
    """Whether :func:`contract` takes ``v`` by multiply-adds and a reduction (one row, or
    :data:`~pallas_kernels.dispatch.MULTIPLY_ADD`) rather than a ``dot_general``."""
    return v.ndim == 1 or (isinstance(precision, str) and precision == dispatch.MULTIPLY_ADD)


def _against_tile(v, tile_ndim: int, axis: int):
    """``(v expanded to broadcast against a tile of tile_ndim axes, the axis to sum)`` for a contraction along the
    tile's ``axis``. expand_dims, not reshape: in a Triton kernel a reshape is a tt.reshape, which may move the vector
    through shared memory; expanded unit axes are free."""
    rows, axis = v.ndim - 1, axis % tile_ndim
    other_axes = tuple(rows + d for d in range(tile_ndim) if d != axis)
    return jnp.expand_dims(v, other_axes), rows + axis


def project(v, W, axis: int, precision=None):
    """:func:`contract` for a dense projection (a linear layer around the SSM): at ``precision.projection``
    when ``precision`` is :class:`Precisions` (JAX's default matmul precision in the XLA drivers)."""
    return contract(v, W, axis, precision.projection if isinstance(precision, Precisions) else precision)


#: ``log2(e)``
LOG2E = 1.4426950408889634


@jax.custom_jvp
def hardware_exp(x):
    """``e^x`` of a float32 array in a Pallas Triton kernel on an NVIDIA GPU: ``2^(x log2(e))`` by the GPU's
    ``ex2.approx.ftz.f32``, a multiply and one special-function instruction (``jnp.exp`` lowers to libdevice's
    ``expf``, about ten instructions of range reduction around the same ``ex2``; ``jnp.exp2`` to the non-``ftz`` form,
    which adds a denormal scaling).

    Accuracy: ``ex2.approx``'s relative error (at most ``2^-22``) plus the rounding of ``x log2(e)``, ``|x| 2^-24``
    relative: about 1e-6 at ``|x| = 12``; results below ``2^-126`` (``x < -87.3``) flush to zero. Inline assembly: it
    lowers only for the GPU (interpret mode cannot run it; kernels take ``jnp.exp`` there). The derivative reuses the
    result.
    """
    if x.dtype != jnp.float32:
        raise TypeError(f"hardware_exp takes a float32 array (ex2.approx.ftz.f32), got {x.dtype}")
    _, plgpu = dispatch.pallas_modules()
    y = x * LOG2E
    [e] = plgpu.elementwise_inline_asm("ex2.approx.ftz.f32 $0, $1;", args=[y], constraints="=r,r", pack=1,
                                       result_shape_dtypes=[jax.ShapeDtypeStruct(y.shape, jnp.float32)])
    return e


@hardware_exp.defjvp
def _hardware_exp_jvp(primals, tangents):
    e = hardware_exp(primals[0])
    return e, e * tangents[0]


def softplus(x, exp=jnp.exp):
    """``log(1 + e^x)``, returning ``x`` above 20 (as lrnnx's kernels); ``exp``: ``jnp.exp`` or :func:`hardware_exp`."""
    return jnp.where(x <= 20.0, jnp.log1p(exp(jnp.minimum(x, 20.0))), x)


def sigmoid(x, exp=jnp.exp):
    return 1.0 / (1.0 + exp(-x))


def silu(x, exp=jnp.exp):
    return x * sigmoid(x, exp)


def erf(x):
    """``erf`` by a rational approximation (absolute error < 5e-7 in float32); ``lax.erf`` has no Triton lowering."""
    x = jnp.clip(x, -4.0, 4.0)
    x2 = x * x
    p = -2.72614225801306e-10
    for c in (2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05, -7.34990630326855e-04,
              -2.95459980854025e-03, -1.60960333262415e-02):
        p = p * x2 + c
    q = -1.45660718464996e-05
    for c in (-2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03, -1.42647390514189e-02):
        q = q * x2 + c
    return x * p / q


def gelu(x):
    """Exact (erf) GELU, ``x/2 (1 + erf(x/sqrt 2))`` (float64 values use ``lax.erf``: they never enter a kernel)."""
    if x.dtype == jnp.float64:
        return jax.nn.gelu(x, approximate=False)
    return 0.5 * x * (1.0 + erf(x * (1.0 / math.sqrt(2.0))))
