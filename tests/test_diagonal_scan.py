"""pallas_kernels.diagonal_scan: the training-scan kernels of ``h_t = a_t h_{t-1} + b_t`` (forward and backward under
``jax.custom_vjp``) against the pure-JAX reference and a float64 NumPy loop, in Pallas interpret mode on the CPU; and
every model that runs them (RG-LRU, S7, S5 LTV and LTI, LRU, Centaurus, S4D) with ``use_kernels="always"`` against
``"never"`` (its XLA path: the chunked scan, or the FFT).

* kernels vs reference: ``h``, ``h_last`` and the gradients of a random-weighted sum of both w.r.t. ``a``, ``b``,
  ``h0``: real and complex, time-varying and time-invariant ``a``, with a mask from lengths and ``h0``; without the
  optional inputs; bfloat16;
* models: the forward, the final cache and the gradients w.r.t. ``x``, every parameter and the cache, with
  ``lengths``, a cache, event mode where the model has one, and bfloat16 ``x``;
* dispatch: ``"auto"`` follows the measured policies (RG-LRU takes the kernels on a GPU, the others keep their XLA
  paths), float64 takes the reference;
* both kernels lower to Triton IR for an H100; bad arguments.

Shapes are tiny (batch 2, L = 9): interpret mode compiles every kernel body.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import relative_error
from lrnnx_jax.models.ltv import rglru as rglru_module
from pallas_kernels import KernelConfig, dispatch
from pallas_kernels import diagonal_scan as ds

ALWAYS = KernelConfig(use_kernels="always")  # interpret mode on the CPU (dispatch.interpret_mode)
NEVER = KernelConfig(use_kernels="never")
TRITON_DEPRECATION = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
BATCH, LENGTH, SIZE = 2, 9, 5
#: float32: the kernels and the reference run the same float32 operations per step in the same order; only the sum
#: of a time-invariant ``da`` over time and rows, and the models' XLA paths (an associative scan, an FFT) order
#: their roundings otherwise: measured below 1e-6
F32_TOL = 1e-5
#: bfloat16 inputs: both paths compute in float32 from the same bfloat16 values and round each bfloat16 result
#: once, so an element may differ by one bfloat16 ulp (2**-8 relative to it); twice that relative to the largest
BF16_TOL = 2.0**-7
LENGTHS_MASK = jnp.arange(LENGTH)[None, :] < jnp.asarray([LENGTH, 6])[:, None]


def _close(ours, theirs, tol) -> bool:
    """``relative_error < tol``, or both exactly zero (a parameter that does not act: Centaurus' skip)."""
    if np.max(np.abs(np.asarray(theirs))) == 0:
        return np.max(np.abs(np.asarray(ours))) == 0
    return relative_error(ours, theirs) < tol


def _assert_trees_close(ours, theirs, tol):
    leaves_ours, leaves_theirs = jax.tree.leaves(ours), jax.tree.leaves(theirs)
    assert len(leaves_ours) == len(leaves_theirs)
    for path_leaf, theirs_leaf in zip(jax.tree_util.tree_leaves_with_path(ours), leaves_theirs):
        path, ours_leaf = path_leaf
        assert ours_leaf.dtype == theirs_leaf.dtype, path
        assert _close(ours_leaf, theirs_leaf, tol), (jax.tree_util.keystr(path), relative_error(ours_leaf, theirs_leaf))


# ----------------------------------------------------------------------------- the op
def _inputs(seed, *, is_complex, invariant, dtype=jnp.float32, optional=True):
    """Random ``a`` of modulus in [0.5, 1) (stable, as the models'), ``b``, ``h0``."""
    rng = np.random.default_rng(seed)

    def value(shape, modulus=None):
        if modulus is not None:
            r = rng.uniform(*modulus, shape)
            z = r * np.exp(1j * rng.uniform(-np.pi, np.pi, shape)) if is_complex else r * rng.choice([-1, 1], shape)
        else:
            z = _random(rng, shape, is_complex)
        return jnp.asarray(z, jnp.complex64 if is_complex else dtype)

    arrays = {"a": value((SIZE,) if invariant else (BATCH, LENGTH, SIZE), (0.5, 1.0)), "b": value((BATCH, LENGTH, SIZE))}
    if optional:
        arrays["h0"] = value((BATCH, SIZE)).astype(jnp.complex64 if is_complex else jnp.float32)
    return arrays


def _outputs_and_grads(fn, arrays, mask, seed=1):
    """``(h, h_last)`` and the gradients of ``sum(Re(w_h conj(h))) + sum(Re(w_l conj(h_last)))``, in one program."""
    rng = np.random.default_rng(seed)

    @jax.jit
    def run(arrays):
        out, vjp = jax.vjp(lambda a: fn(**a, mask=mask), arrays)
        weights = jax.tree.map(lambda o: jnp.asarray(rng.standard_normal(o.shape), o.dtype), out)
        return out, vjp(weights)[0]

    return run(arrays)


def _compare_with_reference(arrays, mask, tol):
    (h_k, last_k), grads_k = _outputs_and_grads(lambda **a: ds.diagonal_scan(**a, config=ALWAYS), arrays, mask)
    (h_r, last_r), grads_r = _outputs_and_grads(ds.reference, arrays, mask)
    is_complex = jnp.iscomplexobj(arrays["b"])
    assert h_k.dtype == (jnp.complex64 if is_complex else jnp.float32) and h_k.shape == (BATCH, LENGTH, SIZE)
    _assert_trees_close((h_k, last_k), (h_r.astype(h_k.dtype), last_r.astype(h_k.dtype)), tol)
    assert set(grads_k) == set(arrays)
    _assert_trees_close(grads_k, grads_r, tol)


@pytest.mark.parametrize("is_complex", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("invariant", [False, True], ids=["time-varying", "time-invariant"])
def test_kernels_match_the_reference_with_lengths_and_h0(is_complex, invariant):
    _compare_with_reference(_inputs(0, is_complex=is_complex, invariant=invariant), LENGTHS_MASK, F32_TOL)


def test_kernels_without_the_optional_inputs():
    _compare_with_reference(_inputs(2, is_complex=True, invariant=False, optional=False), None, F32_TOL)


@pytest.mark.parametrize("invariant", [False, True], ids=["time-varying", "time-invariant"])
def test_bfloat16_inputs(invariant):
    """bfloat16 ``a`` and ``b`` (float32 ``h0``): float32 states, bfloat16 gradients of ``a`` and ``b``."""
    _compare_with_reference(_inputs(3, is_complex=False, invariant=invariant, dtype=jnp.bfloat16), LENGTHS_MASK, BF16_TOL)


def test_reference_matches_a_float64_numpy_loop():
    """The oracle itself, against the recurrence written out in NumPy (complex, mask, h0, time-invariant a)."""
    arrays = _inputs(4, is_complex=True, invariant=True)
    a, b, h0 = (np.asarray(arrays[k], np.complex128) for k in ("a", "b", "h0"))
    mask = np.asarray(LENGTHS_MASK)
    h, expected = h0.copy(), np.zeros(b.shape, np.complex128)
    for t in range(LENGTH):
        h = np.where(mask[:, t, None], a * h + b[:, t], h)
        expected[:, t] = h
    h_r, last_r = ds.reference(**arrays, mask=LENGTHS_MASK)
    assert relative_error(h_r, expected) < 1e-6 and relative_error(last_r, expected[:, -1]) < 1e-6


# ----------------------------------------------------------------------------- the models
MODELS = {
    "RGLRU": ("lrnnx_jax.models.ltv.rglru", "RGLRU", dict(d_model=4, d_conv=2, expand=2, bias=True, chunk_size=4), False),
    "S7": ("lrnnx_jax.models.ltv.s7", "S7", dict(d_model=4, d_state=4, J=2, chunk_size=4), False),
    "ltv.S5-bilinear-conj": ("lrnnx_jax.models.ltv.s5", "S5", dict(d_model=4, d_state=3, discretization="bilinear",
                                                                   conj_sym=True), True),
    "LRU": ("lrnnx_jax.models.lti.lru", "LRU", dict(d_model=4, d_state=5, r_min=0.4, r_max=0.95), False),
    "S5-zoh": ("lrnnx_jax.models.lti.s5", "S5", dict(d_model=4, d_state=4, discretization="zoh"), False),
    "S5-async": ("lrnnx_jax.models.lti.s5", "S5", dict(d_model=4, d_state=4, discretization="async"), True),
    "CentaurusNeck": ("lrnnx_jax.models.lti.centaurus", "Centaurus", dict(d_model=4, d_state=3, sub_state_dim=2,
                                                                         mode="neck"), False),
    "S4D-bilinear-c2": ("lrnnx_jax.models.lti.s4d", "S4D", dict(d_model=4, d_state=6, disc="bilinear", init="diag-lin",
                                                               channels=2, transposed=False, dt_min=0.01, dt_max=0.5),
                        False),
}


def _random(rng, shape, is_complex):
    return rng.standard_normal(shape) + (1j * rng.standard_normal(shape) if is_complex else 0)


def _build(name, config, **overrides):
    module, cls, kwargs, _ = MODELS[name]
    return getattr(importlib.import_module(module), cls)(**kwargs, **overrides, kernel_config=config, rngs=nnx.Rngs(0))


def _model_outputs_and_grads(model, x, tau, lengths, cache, w):
    """The forward, the cache, and the gradients w.r.t. every parameter, ``x`` and the cache, in one program; and
    whether that program runs the backward kernel."""
    graphdef, params = nnx.split(model)

    def loss(params, x, cache):
        y, new_cache = nnx.merge(graphdef, params)(x, tau, lengths, cache=cache, return_cache=True)
        state = jax.tree.leaves(new_cache)
        return jnp.sum(w * y.astype(jnp.float32)) + sum(jnp.sum(jnp.abs(s) ** 2) for s in state), (y, new_cache)

    traced = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True)).trace(params, x, cache)
    return traced.lower().compile()(params, x, cache), f"name={ds.OP}_bwd" in str(traced.jaxpr)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(MODELS))
def test_model_forward_and_gradients_on_kernels_equal_xla(name, dtype):
    """``use_kernels="always"`` against ``"never"`` (the same parameters): outputs, the final cache, and the gradients
    of every parameter, of ``x`` and of the cache, with lengths (9, 6), from a random cache, in event mode where the
    model has one. bfloat16 ``x``: the models compute in float32, so only the rounding of ``y`` and of ``dx`` to
    bfloat16 can differ (:data:`BF16_TOL`)."""
    kernels, xla = _build(name, ALWAYS), _build(name, NEVER)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((BATCH, LENGTH, 4)), dtype)
    tau = jnp.asarray(rng.uniform(0.1, 2.0, (BATCH, LENGTH)), jnp.float32) if MODELS[name][3] else None
    lengths = jnp.asarray([LENGTH, 6])
    cache = jax.tree.map(lambda a: jnp.asarray(_random(rng, a.shape, jnp.iscomplexobj(a)), a.dtype),
                         xla.allocate_inference_cache(BATCH))
    w = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    (grads_k, aux_k), on_kernels = _model_outputs_and_grads(kernels, x, tau, lengths, cache, w)
    (grads_x, aux_x), on_xla_kernels = _model_outputs_and_grads(xla, x, tau, lengths, cache, w)
    assert on_kernels and not on_xla_kernels
    tol = F32_TOL if dtype == jnp.float32 else BF16_TOL
    _assert_trees_close(aux_k, aux_x, tol)
    _assert_trees_close(grads_k, grads_x, tol)


def test_model_kernel_config_is_checked():
    with pytest.raises(TypeError, match="config must be a pallas_kernels.KernelConfig or None, got dict"):
        _build("LRU", {"use_kernels": "always"})


# ----------------------------------------------------------------------------- dispatch
def test_auto_follows_each_models_measured_policy_on_a_gpu(monkeypatch):
    """POLICY (measured slower or no faster on an H200): "auto" takes the reference (and LRU its XLA path) even on an
    NVIDIA GPU; RG-LRU's own policy (measured faster) takes the kernels there, and its XLA scan off a GPU."""
    a = _inputs(6, is_complex=True, invariant=True)
    monkeypatch.setattr(dispatch, "on_nvidia_gpu", lambda: True)
    assert not ds.POLICY.auto and "H200" in ds.POLICY.evidence
    assert not ds.choose(a["a"], a["b"], a["h0"], config=KernelConfig(use_kernels="auto"))
    assert ds.choose(a["a"], a["b"], a["h0"], config=ALWAYS)
    assert not ds.choose(a["a"], a["b"], a["h0"], config=NEVER)
    assert ds.choose(a["a"], a["b"], config=KernelConfig(use_kernels="auto"), policy=ds.ScanPolicy(True, "test"))
    assert ds.model_scan(a["a"], a["b"], config=KernelConfig(use_kernels="auto")) is None

    def no_kernels(*args, **kwargs):
        raise AssertionError("the kernels ran under 'auto'")

    x = jax.random.normal(jax.random.key(3), (BATCH, LENGTH, 4), jnp.float32)
    assert rglru_module.SCAN_POLICY.auto and "H200" in rglru_module.SCAN_POLICY.evidence
    kernel_calls, kernel_scan = [], ds.kernel_scan
    monkeypatch.setattr(ds, "kernel_scan", lambda *args, **kwargs: kernel_calls.append(1) or kernel_scan(*args, **kwargs))
    on_kernels = _build("RGLRU", KernelConfig(use_kernels="auto", interpret=True))(x)  # as on a GPU, interpreted here
    assert kernel_calls
    on_xla = _build("RGLRU", NEVER)(x)
    np.testing.assert_allclose(np.asarray(on_kernels), np.asarray(on_xla), rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(ds, "kernel_scan", no_kernels)
    _build("LRU", KernelConfig(use_kernels="auto"))(x)


def test_float64_takes_the_reference():
    """float64 and complex128 never reach a kernel (a warning under "always"); the reference computes them in float64."""
    with jax.enable_x64(True):
        arrays = {k: v.astype(jnp.complex128) for k, v in _inputs(7, is_complex=True, invariant=False).items()}
        with pytest.warns(RuntimeWarning, match="complex128"):
            h, last = ds.diagonal_scan(**arrays, mask=LENGTHS_MASK, config=ALWAYS)
        h_r, _ = ds.reference(**arrays, mask=LENGTHS_MASK)
        assert h.dtype == jnp.complex128 and last.dtype == jnp.complex128
        np.testing.assert_array_equal(h, h_r)


def test_bad_arguments():
    a = _inputs(8, is_complex=False, invariant=False)
    with pytest.raises(ValueError, match=r"a must have shape \(batch, L, S\) = \(2, 9, 5\) or \(S,\) = \(5,\), got \(4,\)"):
        ds.diagonal_scan(a["a"][0, 0, :4], a["b"])
    with pytest.raises(ValueError, match=r"b must have shape \(batch, L, S\)"):
        ds.diagonal_scan(a["a"][0], a["b"][0])
    with pytest.raises(ValueError, match=r"h0 must have shape \(2, 5\), got \(2, 4\)"):
        ds.diagonal_scan(a["a"], a["b"], a["h0"][:, :4])
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 9\), got \(2, 8\)"):
        ds.diagonal_scan(a["a"], a["b"], mask=LENGTHS_MASK[:, :8])
    with pytest.raises(TypeError, match="b must have a floating or complex dtype, got int32"):
        ds.diagonal_scan(a["a"], a["b"].astype(jnp.int32))


@TRITON_DEPRECATION
@pytest.mark.parametrize("is_complex,invariant", [(True, False), (True, True), (False, False)],
                         ids=["complex-time-varying", "complex-time-invariant", "bfloat16-time-varying"])
def test_kernels_lower_to_triton(lower_for_h100, is_complex, invariant):
    """The forward and backward kernels (a mask, a ragged S = 300 over two programs of 256 lanes)."""
    config = KernelConfig(use_kernels="always", interpret=False)
    dtype = jnp.complex64 if is_complex else jnp.bfloat16
    a = jnp.ones((300,) if invariant else (2, 12, 300), dtype)
    mask = jnp.ones((2, 12), bool)

    def loss(a, b, h0):
        h, h_last = ds.kernel_scan(a, b, h0, mask, config=config)
        return jnp.sum(jnp.real(h)) + jnp.sum(jnp.abs(h_last))

    h0 = jnp.zeros((2, 300), jnp.complex64 if is_complex else jnp.float32)
    lower_for_h100(jax.grad(loss, argnums=(0, 1, 2)), a, jnp.ones((2, 12, 300), dtype), h0, kernels=2)
