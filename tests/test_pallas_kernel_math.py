"""pallas_kernels.kernel_math: the kernels' discretizations against the single definitions, the
contraction and the activations against float64.

The core functions are evaluated in float64 (``enable_x64``); the in-kernel versions
run in float32 on realistic steps, real and complex, with and without event mode.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scipy.special import erf as erf64

from lrnnx_jax.core import discretization as disc
from pallas_kernels import complex_lib as cl
from pallas_kernels import dispatch
from pallas_kernels import kernel_math as km


def _relative(got, expected):
    got = np.asarray(cl.merge(got) if cl.is_planes(got) else got, np.complex128)
    expected = np.asarray(expected, np.complex128)
    return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))


def _inputs(complex_A: bool):
    rng = np.random.default_rng(0)
    n = 256
    A = -np.exp(rng.uniform(-2, 2.5, n))  # Re A in [-12, -0.1]
    if complex_A:
        A = A + 1j * rng.uniform(-40, 40, n)
    delta = np.exp(rng.uniform(np.log(1e-3), np.log(0.5), n))
    delta_A = delta * rng.uniform(0.05, 2.0, n)
    return A, delta, delta_A


# no_discretization has no event mode; async exists only in event mode
CASES = [(n, e) for n in ("zoh", "async", "bilinear", "dirac", "mamba", "no_discretization") for e in (False, True)
         if not (n == "no_discretization" and e) and not (n == "async" and not e)]


@pytest.mark.parametrize("complex_A", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("name,event", CASES, ids=[f"{n}{'-event' if e else ''}" for n, e in CASES])
def test_discretize_matches_core(name, complex_A, event):
    A, delta, delta_A = _inputs(complex_A)
    with jax.enable_x64(True):
        A_bar, gamma = disc.get_discretization(name)(jnp.asarray(A), jnp.asarray(delta), delta_A=jnp.asarray(delta_A) if event else None)
        A_bar, gamma = np.asarray(A_bar), np.broadcast_to(np.asarray(gamma), A.shape)
    A32 = cl.split(A) if complex_A else jnp.asarray(A, jnp.float32)
    d32 = jnp.asarray(delta, jnp.float32)
    k_A_bar, k_gamma = km.discretize(name, A32, d32, jnp.asarray(delta_A, jnp.float32) if event else None)
    assert cl.is_planes(k_A_bar) == complex_A
    assert _relative(k_A_bar, A_bar) < 2e-6
    assert _relative(np.broadcast_to(np.asarray(cl.merge(k_gamma) if cl.is_planes(k_gamma) else k_gamma), A.shape), gamma) < 2e-6


def test_softplus_and_silu():
    x = jnp.linspace(-30.0, 30.0, 601)
    np.testing.assert_allclose(km.softplus(x), jax.nn.softplus(x), rtol=2e-6, atol=1e-12)
    np.testing.assert_allclose(km.silu(x), jax.nn.silu(x), rtol=2e-6, atol=1e-12)


def test_hardware_exp_is_two_to_the_x_log2e_and_its_derivative_reuses_it(monkeypatch):
    """hardware_exp's wrapper on the CPU: the inline ex2.approx.ftz (GPU only; its accuracy is checked by the kernels'
    tests on the GPU) stood in for by an exact 2^y, so that what is checked is the scaling by log2(e) and the custom
    derivative, against float64; and the softplus and silu the kernels take on it."""

    class ExactEx2:
        @staticmethod
        def elementwise_inline_asm(asm, args, constraints, pack, result_shape_dtypes):
            assert asm == "ex2.approx.ftz.f32 $0, $1;" and constraints == "=r,r" and pack == 1
            [y], [like] = args, result_shape_dtypes
            assert like.shape == y.shape and like.dtype == jnp.float32
            return [jnp.exp2(y)]

    monkeypatch.setattr(km.dispatch, "pallas_modules", lambda: (None, ExactEx2))
    x = np.random.default_rng(4).uniform(-12.0, 12.0, 2048)
    x32 = jnp.asarray(x, jnp.float32)
    exact = np.exp(np.asarray(x32, np.float64))
    # the product x log2(e) rounds once, |x| 2^-24 relative in the result (7.2e-7 at |x| = 12); 2^-21 for exp2's own
    # error (the stand-in's here, ex2.approx's 2^-22 on the GPU)
    error = np.abs(np.asarray(km.hardware_exp(x32), np.float64) / exact - 1)
    assert np.all(error <= np.abs(x) * 2.0**-24 + 2.0**-21) and np.max(error) > 1e-7  # the rounding is there
    value, slope = jax.jvp(km.hardware_exp, (x32,), (jnp.ones_like(x32),))
    np.testing.assert_array_equal(slope, value)  # the derivative is the result itself
    grad = jax.grad(lambda v: jnp.sum(km.softplus(v, km.hardware_exp) * km.silu(v, km.hardware_exp)))(x32)
    x64 = np.asarray(x32, np.float64)
    sig = 1 / (1 + np.exp(-x64))
    softplus, silu = np.log1p(np.exp(x64)), x64 * sig
    expected = sig * silu + softplus * (sig + x64 * sig * (1 - sig))
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="hardware_exp takes a float32 array .* got bfloat16"):
        km.hardware_exp(x32.astype(jnp.bfloat16))


def test_erf_sigmoid_and_gelu_match_float64():
    x = np.linspace(-9.0, 9.0, 1801)
    x32 = jnp.asarray(x, jnp.float32)
    assert np.max(np.abs(np.asarray(km.erf(x32), np.float64) - erf64(x))) < 5e-7
    np.testing.assert_allclose(km.sigmoid(x32), 1 / (1 + np.exp(-x)), rtol=2e-6, atol=1e-12)
    gelu = 0.5 * x * (1 + erf64(x / np.sqrt(2)))
    assert np.max(np.abs(np.asarray(km.gelu(x32), np.float64) - gelu)) < 5e-6
    with jax.enable_x64(True):  # float64 never enters a kernel: the exact GELU
        np.testing.assert_allclose(km.gelu(jnp.asarray(x)), gelu, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_contract_one_row_and_a_block_match_float64(axis):
    rng = np.random.default_rng(axis)
    W = rng.standard_normal((5, 6, 7))
    rows = rng.standard_normal((3, W.shape[axis]))
    expected = np.tensordot(rows, W, axes=([1], [axis]))
    W32 = jnp.asarray(W, jnp.float32)
    block = km.contract(jnp.asarray(rows, jnp.float32), W32, axis, jax.lax.Precision.HIGHEST)
    assert block.shape == (3,) + tuple(np.delete(W.shape, axis)) and block.dtype == jnp.float32
    assert _relative(block, expected) < 2e-6
    for r in range(3):  # one row (a kernel program): multiply-adds and a reduction
        row = km.contract(jnp.asarray(rows[r], jnp.float32), W32, axis)
        assert row.shape == block.shape[1:]
        assert _relative(row, expected[r]) < 2e-6
    # a kernel's block of fewer rows than a dot takes: multiply-adds over (R, *W.shape) and a reduction, no dot
    multiply_add = lambda v: km.contract(v, W32, axis, dispatch.MULTIPLY_ADD)  # noqa: E731
    small = multiply_add(jnp.asarray(rows, jnp.float32))
    chex.assert_shape(small, block.shape)
    chex.assert_type(small, jnp.float32)
    assert _relative(small, expected) < 2e-6
    assert "dot_general" not in str(jax.make_jaxpr(multiply_add)(jnp.asarray(rows, jnp.float32)))
    with jax.enable_x64(True):  # mixed dtypes promote: float64 rows with float32 parameters
        wide = km.contract(jnp.asarray(rows), W32, axis, jax.lax.Precision.HIGHEST)
        assert wide.dtype == jnp.float64


@pytest.mark.parametrize("axis", [0, 1])
def test_contract_real_part_sums_both_planes_once_and_matches_float64(axis):
    """``Re(v W)`` for complex rows ``v`` and a complex (``Planes``) or real ``W``: by multiply-adds (one row, a
    kernel's small block) the two planes' products are summed in one reduction; a block of rows takes two dots. All
    against float64, fresh random values."""
    rng = np.random.default_rng(10 + axis)
    W = rng.standard_normal((6, 9)) + 1j * rng.standard_normal((6, 9))
    rows = rng.standard_normal((3, W.shape[axis])) + 1j * rng.standard_normal((3, W.shape[axis]))
    expected = np.tensordot(rows, W, axes=([1], [axis])).real
    planes = cl.split(jnp.asarray(W, jnp.complex64))
    v = cl.split(jnp.asarray(rows, jnp.complex64))
    block = km.contract_real_part(v, planes, axis, km.Precisions(jax.lax.Precision.HIGHEST, None))
    chex.assert_shape(block, expected.shape)
    chex.assert_type(block, jnp.float32)
    assert _relative(block, expected) < 2e-6
    for r in range(3):
        row = km.contract_real_part(cl.Planes(v.re[r], v.im[r]), planes, axis)
        chex.assert_shape(row, expected.shape[1:])
        assert _relative(row, expected[r]) < 2e-6
    multiply_add = lambda v: km.contract_real_part(v, planes, axis, dispatch.MULTIPLY_ADD)  # noqa: E731
    assert _relative(multiply_add(v), expected) < 2e-6
    jaxpr = str(jax.make_jaxpr(multiply_add)(v))
    assert "dot_general" not in jaxpr and jaxpr.count("reduce_sum") == 1
    real = km.contract_real_part(v, jnp.asarray(W.real, jnp.float32), axis, jax.lax.Precision.HIGHEST)
    assert _relative(real, np.tensordot(rows.real, W.real, axes=([1], [axis]))) < 2e-6


def test_unknown_name_raises():
    for name in ("euler", "rglru", "s7"):  # RG-LRU and S7 have their own cells, not discretization modes
        with pytest.raises(ValueError, match=f"unknown discretization '{name}'"):
            km.discretize(name, jnp.ones(3), jnp.ones(3))


def test_xla_drivers_contract_at_highest_and_project_at_the_default_precision():
    """A block of rows under :class:`Precisions`: the SSM's contractions at ``state`` (HIGHEST), the dense
    projections at ``projection`` (None: JAX's default, as the forwards' linear layers); one row has no dot."""
    precisions = km.Precisions(state=jax.lax.Precision.HIGHEST, projection=None)
    rng = np.random.default_rng(40)
    V = jnp.asarray(rng.standard_normal((3, 8)), jnp.float32)
    W = jnp.asarray(rng.standard_normal((8, 5)), jnp.float32)

    def dot_precisions(fn, v):  # under a default other than the suite's float32 one, to tell them apart
        with jax.default_matmul_precision("bfloat16"):
            jaxpr = jax.make_jaxpr(lambda v, W: fn(v, W, 0, precisions))(v, W)
        return [eqn.params["precision"] for eqn in jaxpr.eqns if eqn.primitive.name == "dot_general"]

    default = dot_precisions(lambda v, W, axis, p: v @ W, V)  # a plain matmul: JAX's default (as configured)
    assert dot_precisions(km.contract, V) == [(jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)]
    assert dot_precisions(km.project, V) == default != [(jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)]
    assert dot_precisions(km.project, V[0]) == [] and dot_precisions(km.contract, V[0]) == []
    expected = np.asarray(V, np.float64) @ np.asarray(W, np.float64)
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(km.project(V, W, 0, precisions), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(km.contract(V, W, 0, precisions), expected, rtol=1e-5, atol=1e-5)
