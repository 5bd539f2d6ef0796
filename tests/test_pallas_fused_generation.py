"""pallas_kernels.fused_generation: every fused kernel in Pallas interpret mode against the unfused
``generate``, the block (dot) path, the generation-program builder, the in-kernel math, and the
documented fallbacks (models and sizes the kernels do not take, and the switch taking the XLA path).
"""

from __future__ import annotations

import io
import types
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import relative_error
from lrnnx_jax import generation
from lrnnx_jax.convert import model_class
from pallas_kernels import dispatch
from pallas_kernels import fused_generation as fg
from pallas_kernels import gpu_fused_selftest as selftest
from zoo import H

BATCH, STEPS = 3, 24
#: float32 rounding, accumulated over the fed-back steps
TOL = 1e-5
MAMBA_DT = dict(dt_min=0.05, dt_max=0.5)  # steps at which the discretizations differ visibly

#: name -> (lrnnx model name, kwargs, event): one configuration per code path: skips (diagonal,
#: full, none), real and complex B and C, timesteps per row and per step, every family, the conv
#: with and without bias, linear biases, dirac's gamma = 1, expand 1.5 (padded channels)
CONFIGS = {
    "LRU": ("lti.LRU", dict(d_model=H, d_state=5, r_min=0.4, r_max=0.95), None),
    "S5-async-event-row": ("lti.S5", dict(d_model=H, d_state=4, discretization="async"), "row"),
    "ltv.S5-bilinear-conj-event": ("ltv.S5", dict(d_model=H, d_state=3, discretization="bilinear", conj_sym=True), "step"),
    "CentaurusDWS": ("lti.Centaurus", dict(d_model=H, d_state=H, sub_state_dim=2, mode="dws"), None),
    "Mamba-zoh-k2-e1.5-bias": ("ltv.Mamba", dict(d_model=H, d_state=3, d_conv=2, expand=1.5, discretization="zoh",
                                                 bias=True, dt_rank=2, **MAMBA_DT), None),
    "Mamba-k2-e1.5-bias": ("ltv.Mamba", dict(d_model=H, d_state=3, d_conv=2, expand=1.5, bias=True, dt_rank=2,
                                             **MAMBA_DT), None),
    "Mamba-dirac-event-noconvbias": ("ltv.Mamba", dict(d_model=H, d_state=4, d_conv=3, discretization="dirac",
                                                       conv_bias=False, **MAMBA_DT), "step"),
    "RGLRU-e2-k2-bias": ("ltv.RGLRU", dict(d_model=H, d_conv=2, expand=2, bias=True, conv_bias=False), None),
    # S4D: bottleneck, 2 channels flattened (h c), input gate and output gate; and the identity output
    "S4D-bottleneck-c2-swap-gates": ("lti.S4D", dict(d_model=H, d_state=8, bottleneck=2, channels=2, gate=2,
                                                     swap_channels=True, disc="bilinear", transposed=False,
                                                     dt_min=0.01, dt_max=0.5), None),
    "S4D-no-output-layer": ("lti.S4D", dict(d_model=H, d_state=6, final_act=None, init="diag-lin", transposed=False,
                                            dt_min=0.01, dt_max=0.5), None),
    # S4 (DPLR, the full state): rank 1 with 2 channels and the gate split into blocks; rank 2 (legt) with
    # a bottleneck, 2 channels flattened (h c), the output gate and a step per state
    "S4-c2-gate-blocks": ("lti.S4", dict(d_model=H, d_state=6, channels=2, gate=2, transposed=False,
                                         dt_min=0.01, dt_max=0.5), None),
    "S4-legt-r2-bottleneck-c2-swap-gates": ("lti.S4", dict(d_model=H, d_state=8, rank=2, init="legt", bottleneck=2,
                                                           channels=2, gate=2, swap_channels=True, dt_tie=False,
                                                           transposed=False, dt_min=0.01, dt_max=0.5), None),
    "S7-J1": ("ltv.S7", dict(d_model=H, d_state=4), None),
    "S7-J2": ("ltv.S7", dict(d_model=H, d_state=8, J=2), None),
}
FUSED = ["LRU", "S5-async-event-row", "ltv.S5-bilinear-conj-event", "Mamba-zoh-k2-e1.5-bias",
         "Mamba-dirac-event-noconvbias", "RGLRU-e2-k2-bias", "S4D-bottleneck-c2-swap-gates", "S4-c2-gate-blocks",
         "S4-legt-r2-bottleneck-c2-swap-gates", "S7-J1", "S7-J2"]


@pytest.fixture(autouse=True)
def _fresh_warnings():
    """``dispatch.choose_kernel`` warns once per reason and process; every test sees its own warnings."""
    dispatch._WARNED.clear()
    yield


def build(name, seed=0):
    lrnnx_name, kwargs, event = CONFIGS[name]
    return model_class(lrnnx_name)(**kwargs, rngs=nnx.Rngs(seed)), event


def _inputs(seed, batch=BATCH, steps=STEPS, event=None):
    rng = np.random.default_rng(seed)
    x0 = jnp.asarray(rng.standard_normal((batch, H)), jnp.float32)
    taus = None if event is None else rng.uniform(0.05, 1.5, (batch, 1 if event == "row" else steps)).astype(np.float32)
    return x0, taus


def _unfused(model, x0, steps, taus):
    return generation.generate(model, x0, steps, integration_timesteps=taus)


@pytest.mark.parametrize("name", FUSED)
def test_fused_generate_equals_generate(name):
    model, event = build(name, seed=1)
    assert fg.fused_generate_supported(model, BATCH, event is not None) is None
    x0, taus = _inputs(2, event=event)
    ys = fg.fused_generate(model, x0, STEPS, taus)
    chex.assert_shape(ys, (BATCH, STEPS, H))
    chex.assert_type(ys, jnp.float32)
    ref = _unfused(model, x0, STEPS, taus)
    assert np.all(np.isfinite(ys)) and np.max(np.abs(ref)) > 1e-3
    assert relative_error(ys, ref) < TOL


def test_block_path_equals_generate():
    """Blocks of 16 rows with dots (HIGHEST in interpret mode); 20 rows leave a masked partial block.

    LTI S5 in event mode: the full skip matrix and the per-step ``A_bar`` streamed into a block.
    """
    model, _ = build("S5-async-event-row", seed=3)
    x0, taus = _inputs(4, batch=20, steps=12, event="step")
    ys = fg.fused_generate(model, x0, 12, taus, config=fg.FusedConfig(block_batch=16))
    assert relative_error(ys, _unfused(model, x0, 12, taus)) < TOL


def test_parameters_are_arguments():
    """New parameter values reuse the compiled rollout (nothing is baked into the kernel)."""
    model, _ = build("LRU", seed=5)
    x0, _ = _inputs(6)
    # With jax 0.11.2 the first call of a process compiles twice (an identical second call adds one
    # cache entry; later calls add none), so the count is taken after a repeated call.
    fg.fused_generate(model, x0, STEPS)
    first = fg.fused_generate(model, x0, STEPS)
    compiled = fg._rollout._cache_size()
    nnx.update(model, jax.tree.map(lambda a: 0.9 * a, nnx.state(model, nnx.Param)))
    second = fg.fused_generate(model, x0, STEPS)
    assert fg._rollout._cache_size() == compiled
    assert relative_error(second, _unfused(model, x0, STEPS, None)) < TOL
    assert relative_error(first, second) > 1e-3


@pytest.mark.parametrize("name", ["ltv.S5-bilinear-conj-event", "CentaurusDWS", "S4D-no-output-layer",
                                  "S4-c2-gate-blocks"])
def test_fused_program_in_generate(name, monkeypatch):
    """``generate`` through fused_program: chunks of 8 carry the cache across calls; 19 steps end in a partial call."""
    model, event = build(name, seed=7)
    x0, taus = _inputs(8, steps=19, event=event)
    monkeypatch.setitem(generation.PROGRAM_BUILDERS, "fused_test", fg.fused_program)
    config = generation.GenerationConfig(chunk_size=8, block_size=8, backend="fused_test")
    ys = generation.generate(model, x0, 19, integration_timesteps=taus, config=config)
    assert relative_error(ys, _unfused(model, x0, 19, taus)) < TOL


@pytest.mark.parametrize("name", ["Mamba-k2-e1.5-bias", "RGLRU-e2-k2-bias", "S7-J2"])
def test_fused_program_cache_after_num_valid_steps(name):
    """The program stops after ``num_valid`` steps and returns that state, in the model's cache format."""
    model, _ = build(name, seed=9)
    x0, _ = _inputs(10)
    leaves, treedef = jax.tree.flatten(model)
    spec = types.SimpleNamespace(treedef=treedef, config=generation.GenerationConfig(chunk_size=8, block_size=8))
    cache = model.allocate_inference_cache(BATCH)
    ys, x_next, new_cache = jax.jit(fg.fused_program(spec))(leaves, x0, cache, None, jnp.int32(5))

    def step(carry, _):
        x, c = carry
        y, c = model.step(x, c)
        return (y, c), y

    (_, ref_cache), ref_ys = jax.lax.scan(step, (x0, cache), None, length=5)
    chex.assert_shape(ys, (8, BATCH, H))
    assert relative_error(ys[:5], ref_ys) < TOL
    assert relative_error(x_next, ref_ys[4]) < TOL
    chex.assert_trees_all_equal_shapes_and_dtypes(new_cache, cache)
    for key in cache:
        assert relative_error(new_cache[key], ref_cache[key]) < TOL


TRITON_DEPRECATION = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")


@TRITON_DEPRECATION
@pytest.mark.parametrize("name,block", [("S5-async-event-row", 16), ("Mamba-dirac-event-noconvbias", None),
                                        ("RGLRU-e2-k2-bias", None), ("S4D-bottleneck-c2-swap-gates", None),
                                        ("S4-legt-r2-bottleneck-c2-swap-gates", None), ("S7-J2", None)])
def test_kernels_lower_to_triton(lower_for_h100, name, block):
    model, event = build(name)
    x0, taus = _inputs(13, event=None if event is None else "step")
    leaves, treedef = jax.tree.flatten(model)
    config = fg.FusedConfig(block_batch=block, interpret=False)
    lower_for_h100(lambda leaves, x0, taus: fg.fused_generate(jax.tree.unflatten(treedef, leaves), x0, STEPS, taus,
                                                             config=config), leaves, x0, taus)


@TRITON_DEPRECATION
def test_program_lowers_to_triton(lower_for_h100, monkeypatch):
    """The generation program (one row per program): a dynamic trip count (``num_valid``), a time-major output."""
    monkeypatch.setattr(dispatch, "on_nvidia_gpu", lambda: True)  # FusedConfig() then means the GPU kernel
    model, _ = build("ltv.S5-bilinear-conj-event")
    leaves, treedef = jax.tree.flatten(model)
    spec = types.SimpleNamespace(treedef=treedef, config=generation.GenerationConfig(chunk_size=8, block_size=8))
    taus = jnp.ones((BATCH, 8))
    lower_for_h100(fg.fused_program(spec), leaves, _inputs(14)[0], model.allocate_inference_cache(BATCH), taus,
                   jnp.int32(5))


def test_erf_and_gelu():
    x = jnp.asarray(np.random.default_rng(11).uniform(-6, 6, 4001), jnp.float32)
    assert float(jnp.max(jnp.abs(fg.erf(x) - jax.lax.erf(x)))) < 5e-7
    np.testing.assert_allclose(fg.gelu(x), jax.nn.gelu(x, approximate=False), rtol=1e-6, atol=2e-6)
    np.testing.assert_allclose(fg.sigmoid(x), jax.nn.sigmoid(x), rtol=2e-6)


def test_mv_rows_and_blocks():
    rng = np.random.default_rng(12)
    W = jnp.asarray(rng.standard_normal((16, 32)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((32,)), jnp.float32)
    V = jnp.asarray(rng.standard_normal((4, 16)), jnp.float32)
    np.testing.assert_allclose(fg.mv(v, W, 1), np.asarray(W, np.float64) @ np.asarray(v, np.float64), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fg.mv(V, W, 0, jax.lax.Precision.HIGHEST), np.asarray(V, np.float64) @ np.asarray(W, np.float64),
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- fallbacks
@pytest.mark.parametrize("name,lrnnx_name,kwargs", selftest.FALLBACKS, ids=[f[0] for f in selftest.FALLBACKS])
def test_fallback_reason_and_switch(name, lrnnx_name, kwargs):
    """Models and sizes without a fused kernel are refused with a reason; the switch then takes the XLA path."""
    model = selftest.abstract_model(lrnnx_name, kwargs)
    reason = fg.fused_generate_supported(model, 4, False)
    assert isinstance(reason, str) and type(model).__name__ in reason
    with pytest.warns(RuntimeWarning, match="fused_generation: using the pure-JAX reference"):
        assert not fg.use_fused_kernel(model, 4, False, kernel_config=dispatch.KernelConfig(use_kernels="always"))
    with pytest.raises(ValueError, match="fused_generate does not support"):
        fg.fused_generate(model, jnp.zeros((4, model.d_model)), 3)


def test_other_refusals_and_the_switch(monkeypatch):
    lru, mamba = (selftest.abstract_model(*CONFIGS[name][:2]) for name in ("LRU", "Mamba-k2-e1.5-bias"))
    assert "event mode on LRU" in fg.fused_generate_supported(lru, 4, True)
    assert "x of dtype bfloat16" in fg.fused_generate_supported(lru, 4, False, jnp.bfloat16)
    assert fg.fused_generate_supported(mamba, 4096, False) is None  # batch size alone is never a refusal
    s7 = selftest.abstract_model("ltv.S7", dict(d_model=16, d_state=8))
    assert fg.slower_than_xla(s7, fg.MAX_STREAMING_BATCH) is None  # measured faster up to batch 256
    assert "S7 above batch 512" in fg.slower_than_xla(s7, fg.MAX_STREAMING_BATCH + 1)
    s4d = selftest.abstract_model("lti.S4D", dict(d_model=128, d_state=64, transposed=False))
    assert fg.slower_than_xla(s4d, 4096) is None  # measured faster at B=4096 (64 vs 94 us/step)
    assert not fg.use_fused_kernel(lru, 4, False)  # "auto" off-GPU: the XLA program
    assert fg.use_fused_kernel(lru, 4, False, kernel_config=dispatch.KernelConfig(use_kernels="always"))
    assert not fg.use_fused_kernel(lru, 4, False, kernel_config=dispatch.KernelConfig(use_kernels="never"))
    monkeypatch.setattr(dispatch, "on_nvidia_gpu", lambda: True)
    assert fg.use_fused_kernel(lru, 4, False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert not fg.use_fused_kernel(lru, 4, True)


# ----------------------------------------------------------------------------- errors
def test_bad_arguments():
    model, _ = build("S5-async-event-row")
    x0 = jnp.zeros((2, H))
    with pytest.raises(ValueError, match=r"x0 must have shape \(B, H\) with H=6"):
        fg.fused_generate(model, jnp.zeros((2, H + 1)), 3, jnp.ones((2, 1)))
    with pytest.raises(TypeError, match="x0 must be float32 for the fused kernels, got bfloat16"):
        fg.fused_generate(model, x0.astype(jnp.bfloat16), 3, jnp.ones((2, 1)))
    with pytest.raises(ValueError, match="num_steps must be a positive integer, got 0"):
        fg.fused_generate(model, x0, 0, jnp.ones((2, 1)))
    with pytest.raises(ValueError, match=r"integration_timesteps must have shape \(B, 1\) or \(B, num_steps\) = \(2, 1\) or \(2, 3\), got \(2, 2\)"):
        fg.fused_generate(model, x0, 3, jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="LRU has no event mode"):
        fg.fused_generate(build("LRU")[0], x0, 3, jnp.ones((2, 1)))
    with pytest.raises(ValueError, match="32-bit offsets, but 2 rows x 268435456 steps make an array of 3221225472"):
        fg.fused_generate(model, x0, 2**28, jnp.ones((2, 1)))


@pytest.mark.parametrize("changes,message", [
    (dict(block_batch=8), "block_batch must be 1 or a power of two >= 16, got 8"),
    (dict(num_warps=3), "num_warps must be a power of two >= 1, got 3"),
    (dict(precision="tf32"), "precision must be one of"),
    (dict(interpret="yes"), "interpret must be None, True or False"),
])
def test_config_rejects_bad_values(changes, message):
    with pytest.raises(ValueError, match=message):
        fg.FusedConfig(**changes)


def test_selftest_run_prints_a_table():
    """The GPU self-test's own loop, on one small case (interpret mode here)."""
    case = selftest.Case("small LRU", "lti.LRU", dict(d_model=H, d_state=5, r_min=0.4, r_max=0.95), batch=2, steps=STEPS)
    out = io.StringIO()
    ok, results = selftest.run([case], out=out, with_fallbacks=False, with_program=False)
    assert ok and results["cases"][0]["err"] < TOL
    row = next(line for line in out.getvalue().splitlines() if line.startswith("| small LRU |"))
    assert row.startswith("| small LRU | 2 | 24 | rows |") and row.endswith("|") and "| PASS |" in row


def test_selftest_helpers_bound_the_loop():
    """The GPU self-test's bounded_model halves the output gain until the closed loop stays bounded."""
    case = selftest.Case("LRU", "lti.LRU", dict(d_model=H, d_state=5, r_min=0.9, r_max=0.99), batch=2, steps=64)
    model, x0, _ = selftest.build(case)
    selftest.scale_output(model, 8.0)  # a loop gain far above one
    ref, gain = selftest.bounded_model(model, x0, case.steps, None)
    assert gain < 1 and np.all(np.isfinite(ref))
    assert np.max(np.abs(ref)) <= 100 * np.max(np.abs(ref[:, 0]))
