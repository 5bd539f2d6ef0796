"""``model.step`` and ``model.multi_step`` on the one-step / multi-token fused kernels against the XLA
driver of the same cell, for every model.

Every configuration of the zoo runs a few steps from a prefilled (nonzero) cache twice: with
``use_kernels="never"`` (the XLA driver) and with ``use_kernels="always"`` (the kernels, in
Pallas interpret mode on the CPU; the same test runs the real kernels on a GPU). The kernel
path must really contain a ``pallas_call`` and take no fallback, and both paths must agree
within 1e-5 relative in float32 (outputs and every cache entry). The comparisons run at
``jax.default_matmul_precision("highest")``: on a GPU, XLA's default float32 matmul is TF32
(about 1e-3 relative), while the kernels compute in float32.
"""

from __future__ import annotations

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import relative_error, run_steps
from pallas_kernels import dispatch
from zoo import ZOO, H

BATCH, PREFILL, STEPS = 3, 5, 4
TOL = 1e-5
NEVER = dispatch.KernelConfig(use_kernels="never")
ALWAYS = dispatch.KernelConfig(use_kernels="always")


def _inputs(entry, seed):
    keys = jax.random.split(jax.random.key(seed), 4)
    x_pre = jax.random.normal(keys[0], (BATCH, PREFILL, H), jnp.float32)
    x = jax.random.normal(keys[1], (BATCH, STEPS, H), jnp.float32)
    tau_pre = tau = None
    if entry.event:
        tau_pre = jax.random.uniform(keys[2], (BATCH, PREFILL), jnp.float32, 0.5, 2.0)
        tau = jax.random.uniform(keys[3], (BATCH, STEPS), jnp.float32, 0.5, 2.0)
    return x_pre, tau_pre, x, tau


def _runs_a_kernel(jaxpr) -> bool:
    """Whether the (printed, nested) program contains a ``pallas_call``."""
    return "pallas_call" in str(jaxpr)




@pytest.mark.parametrize("entry", ZOO, ids=lambda e: e.name)
def test_step_on_kernels_equals_pure_jax_step(entry):
    model = entry.build(seed=3)
    x_pre, tau_pre, x, tau = _inputs(entry, seed=11)
    _, cache = model(x_pre, tau_pre, return_cache=True)
    y_ref, cache_ref = run_steps(model, x, tau, cache, kernel_config=NEVER)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to the reference would warn
        tau_t = None if tau is None else tau[:, 0]
        jaxpr = jax.make_jaxpr(lambda x_t, c: model.step(x_t, c, tau_t, kernel_config=ALWAYS))(x[:, 0], cache)
        assert _runs_a_kernel(jaxpr), f"{entry.name}: step did not run a kernel"
        y_kernel, cache_kernel = run_steps(model, x, tau, cache, kernel_config=ALWAYS)
        y_multi, cache_multi = model.multi_step(x, cache, tau, kernel_config=ALWAYS)
    chex.assert_shape(y_kernel, (BATCH, STEPS, H))
    chex.assert_trees_all_equal_shapes_and_dtypes(cache_kernel, cache_ref)
    chex.assert_trees_all_equal_shapes_and_dtypes(cache_multi, cache_ref)
    assert relative_error(y_kernel, y_ref) <= TOL
    assert relative_error(y_multi, y_ref) <= TOL
    for key in cache_ref:
        assert relative_error(cache_kernel[key], cache_ref[key]) <= TOL, key
        assert relative_error(cache_multi[key], cache_ref[key]) <= TOL, key
    assert np.max(np.abs(np.asarray(y_ref))) > 1e-3  # the comparison is not between zeros


@pytest.mark.parametrize("entry", [e for e in ZOO if e.name in ("LRU", "Mamba", "S4D-bilinear-lin-c2-gate2")],
                         ids=lambda e: e.name)
def test_default_step_follows_the_platform(entry):
    """``"auto"`` (the default): off-GPU the XLA driver (no kernel in the program); on an NVIDIA GPU the
    kernel where the cell's policy declares it faster at this batch."""
    model = entry.build()
    cache = model.allocate_inference_cache(BATCH)
    auto = dispatch.KernelConfig(use_kernels="auto")
    jaxpr = jax.make_jaxpr(lambda x_t, c: model.step(x_t, c, kernel_config=auto))(jnp.ones((BATCH, H)), cache)
    faster = model.cell().policy.slower_reason("step", BATCH) is None
    assert _runs_a_kernel(jaxpr) == (dispatch.on_nvidia_gpu() and faster)


def test_float64_step_takes_the_reference():
    """The kernels compute in float32: a float64 step keeps the XLA driver, also under "always"."""
    entry = next(e for e in ZOO if e.name == "Mamba")
    with jax.enable_x64(True):
        model = entry.build()
        cache = model.allocate_inference_cache(BATCH, dtype=jnp.float64)
        x_t = jax.random.normal(jax.random.key(0), (BATCH, H), jnp.float64)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            jaxpr = jax.make_jaxpr(lambda x_t, c: model.step(x_t, c, kernel_config=ALWAYS))(x_t, cache)
    assert not _runs_a_kernel(jaxpr)
    assert any("float64" in str(w.message) for w in caught)


TRITON_DEPRECATION = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")


@TRITON_DEPRECATION
@pytest.mark.parametrize("name", ["LRU", "S5-async-event", "CentaurusFull", "Mamba-bilinear-event-c4", "RGLRU-e1-k4",
                                  "S7-J2", "S4D-bilinear-lin-c2-gate2", "S4-legt-r2-c2-gate-bottleneck"])
def test_step_kernels_lower_to_triton(lower_for_h100, name):
    """``model.step`` on the kernels as the GPU compiles them: one Triton kernel per step, lowerable."""
    entry = next(e for e in ZOO if e.name == name)
    model = entry.build()
    cache = model.allocate_inference_cache(BATCH)
    tau = jnp.ones((BATCH,)) if entry.event else None
    config = dispatch.KernelConfig(use_kernels="always", interpret=False)
    lower_for_h100(lambda x_t, c: model.step(x_t, c, tau, kernel_config=config), jnp.ones((BATCH, H)), cache)


def test_auto_on_a_gpu_takes_the_kernels_where_measured_faster(monkeypatch):
    """``"auto"`` as on an NVIDIA GPU: the kernel where the cell's policy declares it measured faster (the
    diagonal cells at batch 1, S4D up to 32, Mamba nowhere); elsewhere the XLA driver, without a warning."""
    monkeypatch.setattr(dispatch, "on_nvidia_gpu", lambda: True)
    jax.clear_caches()  # programs traced earlier for the CPU must be traced again (the platform is not a key)
    lru, mamba, s4d = (next(e for e in ZOO if e.name == n).build() for n in ("LRU", "Mamba", "S4D-bilinear-lin-c2-gate2"))
    auto = dispatch.KernelConfig(use_kernels="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for model, batch, expected in ((lru, 1, True), (lru, BATCH, False), (s4d, BATCH, True), (s4d, 300, False),
                                       (mamba, 1, False)):
            cache = model.allocate_inference_cache(batch)
            jaxpr = jax.make_jaxpr(lambda x_t, c: model.step(x_t, c, kernel_config=auto))(jnp.ones((batch, H)), cache)
            assert _runs_a_kernel(jaxpr) == expected, (type(model).__name__, batch)


def test_dropout_model_steps_on_kernels_in_eval_mode_only(monkeypatch):
    """A block built with dropout: in eval mode the kernels (and generate) take it; in training mode the
    kernel refuses it (it has no dropout) and the XLA driver draws a fresh mask at every step."""
    from lrnnx_jax.generation import generate

    monkeypatch.setattr(dispatch, "_WARNED", set())
    model = next(e for e in ZOO if e.name == "S4D-bilinear-lin-c2-gate2").build(dropout=0.3)
    x0 = jax.random.normal(jax.random.key(5), (BATCH, H), jnp.float32)
    ref = generate(model, x0, 6, kernel_config=NEVER)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert relative_error(generate(model, x0, 6, kernel_config=ALWAYS), ref) <= TOL
    model.train()
    cache = model.allocate_inference_cache(BATCH)
    with pytest.warns(RuntimeWarning, match="active dropout"):
        first, _ = model.step(x0, cache, kernel_config=ALWAYS)
    second, _ = model.step(x0, cache, kernel_config=ALWAYS)
    assert relative_error(first, second) > 1e-3  # the random state advanced between the steps


@TRITON_DEPRECATION
@pytest.mark.parametrize("name", ["LRU", "Mamba", "S4D-bilinear-lin-c2-gate2"])
def test_vmapped_step_on_kernels(lower_for_h100, name):
    """``jax.vmap`` over ``model.step`` (e.g. independent caches): the kernels' batching rule gives the
    reference's values (interpret mode) and still lowers to one Triton kernel."""
    model = next(e for e in ZOO if e.name == name).build()
    cache = jax.tree.map(lambda c: jnp.stack([c, c + 0.5]), model.allocate_inference_cache(BATCH))
    x = jax.random.normal(jax.random.key(2), (2, BATCH, H), jnp.float32)
    step = lambda config: jax.vmap(lambda x_t, c: model.step(x_t, c, kernel_config=config))  # noqa: E731
    y_ref, cache_ref = step(NEVER)(x, cache)
    y, new_cache = step(ALWAYS)(x, cache)
    assert relative_error(y, y_ref) <= TOL
    for key in cache_ref:
        assert relative_error(new_cache[key], cache_ref[key]) <= TOL, key
    lower_for_h100(step(dispatch.KernelConfig(use_kernels="always", interpret=False)), x, cache)
