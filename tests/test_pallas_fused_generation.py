"""pallas_kernels.fused_generation: the one driver (``run_cell``) on a toy cell against a float64 NumPy
reference (rows, blocks, given inputs, ``num_valid``, padding values), every model's cell in Pallas
interpret mode against the unfused ``generate``, the block (dot) path, the generation program, the
Triton lowering, and the documented fallbacks (models and sizes the kernels do not take, the policies
that keep the XLA program).
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import re
import types
import warnings

import chex
import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks.benchmark_training import equations
from conftest import relative_error
from lrnnx_jax import generation
from lrnnx_jax.convert import model_class
from pallas_kernels import cells, dispatch
from pallas_kernels import fused_generation as fg
from pallas_kernels import kernel_math as km
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


ALWAYS = dispatch.KernelConfig(use_kernels="always")
NEVER = dispatch.KernelConfig(use_kernels="never")


def _unfused(model, x0, steps, taus):
    return generation.generate(model, x0, steps, integration_timesteps=taus, kernel_config=NEVER)


# ----------------------------------------------------------------------------- the driver, on a toy cell
def _toy_step(p, s, x, inputs, precision):
    """A real diagonal recurrence with a division by ``A`` (padded lanes must not divide by zero):
    ``h = exp(A) h + (exp(A) - 1)/A * (W x) * g``, ``y = V h + x``, ``g`` a per-row input."""
    a = jnp.exp(p["A"])
    h = a * s["h"] + (a - 1.0) / p["A"] * km.contract(x, p["W"], 1, precision) * inputs["g"][..., None]
    return km.contract(h, p["V"], 0, precision) + x, {"h": h}


def _toy(rng, H=5, N=3):
    params = {"A": jnp.asarray(-rng.uniform(0.1, 1.0, N), jnp.float32),
              "W": jnp.asarray(rng.standard_normal((N, H)) / 3, jnp.float32),
              "V": jnp.asarray(rng.standard_normal((N, H)) / 3, jnp.float32)}
    return cells.Cell(_toy_step, params, pad_values={"A": -1.0}, blockable=True), params


def _toy_reference(params, h, x0, g, steps, xs=None):
    A, W, V = (np.asarray(params[k], np.float64) for k in ("A", "W", "V"))
    h, x, ys = np.asarray(h, np.float64), np.asarray(x0, np.float64), []
    for t in range(steps):
        if xs is not None:
            x = np.asarray(xs[:, t], np.float64)
        h = np.exp(A) * h + (np.exp(A) - 1) / A * (x @ W.T) * np.asarray(g, np.float64)[:, None]
        x = h @ V + x
        ys.append(x)
    return np.stack(ys, 1), h


@pytest.mark.parametrize("block_batch,batch", [(1, 3), (16, 20)])
def test_run_cell_drives_any_cell(block_batch, batch):
    """Closed loop and given inputs, one row or blocks of 16 rows (a masked partial block), num_valid."""
    rng = np.random.default_rng(30)
    cell, params = _toy(rng)
    h0 = jnp.asarray(rng.standard_normal((batch, 3)), jnp.float32)
    x0 = jnp.asarray(rng.standard_normal((batch, 5)), jnp.float32)
    g = jnp.asarray(rng.uniform(0.5, 1.5, batch), jnp.float32)
    config = dispatch.KernelConfig(use_kernels="always", block_batch=block_batch)
    ys, state = fg.run_cell(cell, {"h": h0}, x0, 9, {"g": g}, config=config)
    ref, h_ref = _toy_reference(params, h0, x0, g, 9)
    chex.assert_shape(ys, (batch, 9, 5))
    chex.assert_shape(state["h"], (batch, 3))
    assert relative_error(ys, ref) < TOL and relative_error(state["h"], h_ref) < TOL
    xs = jnp.asarray(rng.standard_normal((batch, 6, 5)), jnp.float32)
    ys, state = fg.run_cell(cell, {"h": h0}, x0, 6, {"g": g}, config=config, xs=xs)
    ref, h_ref = _toy_reference(params, h0, x0, g, 6, xs=xs)
    assert relative_error(ys, ref) < TOL and relative_error(state["h"], h_ref) < TOL
    ys, state = fg.run_cell(cell, {"h": h0}, x0, 9, {"g": g}, config=config, num_valid=jnp.int32(4))
    ref, h_ref = _toy_reference(params, h0, x0, g, 4)
    chex.assert_shape(ys, (batch, 9, 5))
    assert relative_error(ys[:, :4], ref) < TOL and relative_error(state["h"], h_ref) < TOL


def test_run_cell_per_step_inputs_and_the_xla_drivers():
    """Per-step inputs (B, T); the XLA drivers of the same cell (one step, T tokens with every state) agree."""
    rng = np.random.default_rng(31)
    cell, params = _toy(rng)
    h0 = jnp.asarray(rng.standard_normal((2, 3)), jnp.float32)
    xs = jnp.asarray(rng.standard_normal((2, 5, 5)), jnp.float32)
    g = jnp.asarray(rng.uniform(0.5, 1.5, (2, 5)), jnp.float32)
    ys, state = fg.run_cell(cell, {"h": h0}, xs[:, 0], 5, step_inputs={"g": g}, config=ALWAYS, xs=xs)
    ys_xla, final, states = cells.xla_multi_step(cell, {"h": h0}, xs, {"g": g}, return_states=True)
    h, expected = np.asarray(h0, np.float64), []
    for t in range(5):  # per-step g: the reference one step at a time
        y_t, h = _toy_reference(params, h, xs[:, t], g[:, t], 1)
        expected.append(y_t[:, 0])
        np.testing.assert_allclose(states["h"][:, t], h, rtol=1e-5, atol=1e-6)
    for out in (ys, ys_xla):
        assert relative_error(out, np.stack(expected, 1)) < TOL
    assert relative_error(state["h"], h) < TOL and relative_error(final["h"], h) < TOL
    y1, s1 = cells.xla_step(cell, {"h": h0}, xs[:, 0], {"g": g[:, 0]})
    assert relative_error(y1, expected[0]) < TOL


def test_unsupported_reasons_of_a_cell():
    cell, _ = _toy(np.random.default_rng(32))
    assert fg.unsupported_reason(cell, 4) is None
    assert "inputs of dtype bfloat16" in fg.unsupported_reason(cell, 4, jnp.bfloat16)
    assert "batch_size=0" in fg.unsupported_reason(cell, 0)
    wide = cell._replace(params={**cell.params, "A": cell.params["A"].astype(jnp.float16)})
    assert "parameters of dtype float16" in fg.unsupported_reason(wide, 4)
    big = cell._replace(params={**cell.params, "W": jnp.zeros((300, 300), jnp.float32)})
    assert "too large for one program" in fg.unsupported_reason(big, 4)


def test_policy_is_data():
    policy = cells.KernelPolicy(rollout_max_batch=256, step_max_batch=0, evidence="measured")
    assert policy.slower_reason("rollout", 256) is None
    assert "batch 257 above 256 for the rollout kernel (measured)" == policy.slower_reason("rollout", 257)
    assert policy.slower_reason("step", 1) is not None
    assert cells.KernelPolicy().slower_reason("step", 10**6) is None


@pytest.mark.parametrize("name", FUSED)
def test_fused_generate_equals_generate(name):
    model, event = build(name, seed=1)
    assert fg.model_unsupported_reason(model, BATCH, event is not None) is None
    x0, taus = _inputs(2, event=event)
    ys = fg.fused_generate(model, x0, STEPS, taus)
    chex.assert_shape(ys, (BATCH, STEPS, H))
    chex.assert_type(ys, jnp.float32)
    ref = _unfused(model, x0, STEPS, taus)
    assert np.all(np.isfinite(ys)) and np.max(np.abs(ref)) > 1e-3
    assert relative_error(ys, ref) < TOL


@pytest.mark.parametrize("block", [16, 4])
def test_block_path_equals_generate(block):
    """Blocks of 16 rows with dots (HIGHEST in interpret mode), or of 4 with multiply-adds; 20 rows leave a masked
    partial block of 16.

    LTI S5 in event mode: the full skip matrix and the per-step ``A_bar`` streamed into a block.
    """
    model, _ = build("S5-async-event-row", seed=3)
    x0, taus = _inputs(4, batch=20, steps=12, event="step")
    ys = fg.fused_generate(model, x0, 12, taus, config=dispatch.KernelConfig(block_batch=block))
    assert relative_error(ys, _unfused(model, x0, 12, taus)) < TOL


@pytest.mark.parametrize("rule", cells.HOIST_RULES)
def test_fused_generate_with_leaves_re_read_by_each_rule(rule, monkeypatch):
    """With room for few parameter numbers in registers, each hoisting rule holds some leaves and re-reads the
    others every step (different ones under the two rules), and the rollout is unchanged (LTI S5 in event mode:
    the dense skip, the planes of ``B`` and ``C``)."""
    model, event = build("S5-async-event-row", seed=7)
    monkeypatch.setattr(fg, "HOIST_PER_WARP", 128)  # 4 warps: 512 numbers, two 16s and one 256, or two 256s
    monkeypatch.setattr(type(model), "kernel_policy", dataclasses.replace(model.kernel_policy, hoist=rule))
    config = dispatch.KernelConfig(num_warps=4)
    cell = fg.abstract_cell(model)
    sizes = fg._padded_sizes(cell.params, {}, 1)
    hoisted, streamed = fg.split_hoisted(sizes, 4, rule)
    assert hoisted and streamed and hoisted != fg.split_hoisted(sizes, 4, "smallest" if rule == "largest"
                                                               else "largest")[0]
    chosen, split_hoisted = [], fg.split_hoisted
    monkeypatch.setattr(fg, "split_hoisted", lambda *args: chosen.append(split_hoisted(*args)) or chosen[-1])
    fg._rollout.clear_cache()  # (its key is the model's structure and the config, not the class's policy)
    x0, taus = _inputs(8, event=event)
    ys = fg.fused_generate(model, x0, STEPS, taus, config=config)
    assert chosen == [(hoisted, streamed)]
    assert relative_error(ys, _unfused(model, x0, STEPS, taus)) < TOL


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
    graph = generation.capture_graph(model, BATCH, event_mode=event is not None, kernel_config=ALWAYS,
                                     config=generation.GenerationConfig(chunk_size=8))
    assert graph.spec.fused
    ys = generation.generate(model, x0, 19, graph_cache=graph, integration_timesteps=taus)
    assert relative_error(ys, _unfused(model, x0, 19, taus)) < TOL


@pytest.mark.parametrize("name", ["Mamba-k2-e1.5-bias", "RGLRU-e2-k2-bias", "S7-J2"])
def test_fused_program_cache_after_num_valid_steps(name):
    """The program stops after ``num_valid`` steps and returns that state, in the model's cache format."""
    model, _ = build(name, seed=9)
    x0, _ = _inputs(10)
    leaves, treedef = jax.tree.flatten(model)
    spec = types.SimpleNamespace(treedef=treedef, chunk_size=8, kernels=ALWAYS)
    cache = model.allocate_inference_cache(BATCH)
    ys, x_next, new_cache = jax.jit(fg.fused_program(spec))(leaves, x0, cache, None, jnp.int32(5))

    def step(carry, _):
        x, c = carry
        y, c = model.step(x, c)
        return (y, c), y

    (_, ref_cache), ref_ys = jax.lax.scan(step, (x0, cache), None, length=5)  # the XLA driver off-GPU
    chex.assert_shape(ys, (BATCH, 8, H))
    assert relative_error(ys[:, :5], jnp.moveaxis(ref_ys, 0, 1)) < TOL
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
    config = dispatch.KernelConfig(block_batch=block, interpret=False)
    lower_for_h100(lambda leaves, x0, taus: fg.fused_generate(jax.tree.unflatten(treedef, leaves), x0, STEPS, taus,
                                                             config=config), leaves, x0, taus)


@TRITON_DEPRECATION
def test_program_lowers_to_triton(lower_for_h100, monkeypatch):
    """The generation program (one row per program): a dynamic trip count (``num_valid``), a time-major output."""
    model, _ = build("ltv.S5-bilinear-conj-event")
    leaves, treedef = jax.tree.flatten(model)
    spec = types.SimpleNamespace(treedef=treedef, chunk_size=8, kernels=dispatch.KernelConfig(interpret=False))
    taus = jnp.ones((BATCH, 8))
    lower_for_h100(fg.fused_program(spec), leaves, _inputs(14)[0], model.allocate_inference_cache(BATCH), taus,
                   jnp.int32(5))


@TRITON_DEPRECATION
@pytest.mark.parametrize("name", ["LRU", "Mamba-dirac-event-noconvbias", "S4-c2-gate-blocks", "S7-J1"])
def test_one_step_and_multi_token_kernels_lower_to_triton(lower_for_h100, name):
    """model.step and model.multi_step on the kernels (one row per program; given inputs)."""
    model, event = build(name)
    config = dispatch.KernelConfig(use_kernels="always", interpret=False)
    x0, _ = _inputs(15)
    xs = jnp.stack([x0] * 4, axis=1)
    cache = model.allocate_inference_cache(BATCH)
    taus = None if event is None else jnp.ones((BATCH, 4))
    graphdef, state = nnx.split(model)
    lower_for_h100(lambda state, x, c: nnx.merge(graphdef, state).step(x, c, None if taus is None else taus[:, 0],
                                                                        kernel_config=config), state, x0, cache)
    lower_for_h100(lambda state, x, c: nnx.merge(graphdef, state).multi_step(x, c, taus, kernel_config=config),
                   state, xs, cache)


# ----------------------------------------------------------------------------- split cells
#: cells whose parameters are cut over the programs of a row: Mamba (x_proj and out_proj completed by psum; the
#: in_proj, conv and out_proj biases, 3 taps, bilinear; event mode), RG-LRU (gates by psum_scatter; biases, 2 taps)
#: and S4 (complex planes cut over the SSM channels; 2 channels with each program's slice of x; a bottleneck with
#: the full gate completed by psum)
SPLIT = {
    "Mamba-bilinear-k3-bias": ("ltv.Mamba", dict(d_model=32, d_state=16, d_conv=3, discretization="bilinear",
                                                 bias=True, **MAMBA_DT), None),
    "Mamba-zoh-event": ("ltv.Mamba", dict(d_model=32, d_state=16, discretization="zoh", **MAMBA_DT), "step"),
    "RGLRU-k2-bias": ("ltv.RGLRU", dict(d_model=32, d_conv=2, bias=True, conv_bias=False), None),
    "S4-channels2": ("lti.S4", dict(d_model=32, d_state=8, transposed=False, channels=2), None),
    "S4-gate-bottleneck": ("lti.S4", dict(d_model=64, d_state=8, transposed=False, gate=2, bottleneck=2), None),
}


def pallas_calls(fn, *args) -> list:
    """The ``pallas_call`` equations of ``fn``'s program (every nested jaxpr), in order."""
    return [eqn for eqn in equations(jax.make_jaxpr(fn)(*args).jaxpr) if eqn.primitive.name == "pallas_call"]


def pallas_grids(fn, *args) -> list:
    """The grids of the ``pallas_call``s in ``fn``'s program, in order."""
    return [tuple(eqn.params["grid_mapping"].grid) for eqn in pallas_calls(fn, *args)]


def _split_model(name, seed=0):
    lrnnx_name, kwargs, event = SPLIT[name]
    model = model_class(lrnnx_name)(**kwargs, rngs=nnx.Rngs(seed))
    model.eval()
    return model, event


@pytest.mark.parametrize("name,parts", [("Mamba-bilinear-k3-bias", 2), ("Mamba-bilinear-k3-bias", 4),
                                        ("Mamba-zoh-event", 4), ("RGLRU-k2-bias", 2), ("S4-channels2", 2),
                                        ("S4-gate-bottleneck", 2)])  # slices of >= 16 channels
def test_split_step_equals_the_whole_step(name, parts):
    """The cell's split declaration and its collectives: the step emulated on ``parts`` programs (``jax.vmap``
    with ``psum`` / ``psum_scatter``) equals the whole step, outputs and every state leaf, from a random state."""
    model, event = _split_model(name)
    cell = model.cell()
    rng = np.random.default_rng(parts)
    state = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float32),
                         model.cell_state(model.allocate_inference_cache(BATCH)))
    x = jnp.asarray(rng.standard_normal((BATCH, model.d_model)), jnp.float32)
    inputs = model.cell_inputs((BATCH,), None if event is None else jnp.asarray(rng.uniform(0.1, 1.0, BATCH)))
    with jax.default_matmul_precision("highest"):
        y, new_state = cells.xla_step(cell, state, x, inputs)
        y_split, new_split = cells.xla_split_step(cell, state, x, inputs, parts)
    chex.assert_trees_all_equal_shapes_and_dtypes((y_split, new_split), (y, new_state))
    # float32 sums over the channels regrouped by program: a few ulps of the outputs' scale
    assert relative_error(y_split, y) < 1e-6
    for key in new_state:  # every array of each leaf (both planes of a complex state)
        for got, want in zip(jax.tree.leaves(new_split[key]), jax.tree.leaves(new_state[key])):
            assert relative_error(got, want) < 1e-6, key


@pytest.mark.parametrize("name", list(SPLIT))
def test_split_kernel_against_unfused_generate(name):
    """The split kernel path (``split_programs=2``; interpret mode runs it with one program per row, through the
    same exchange arrays and barrier) against the unfused ``generate``, and the multi-token kernel against the XLA
    multi-step from a random state."""
    model, event = _split_model(name)
    x0, _ = _inputs(21)
    x0 = x0[:, :1].repeat(model.d_model, axis=1) * jnp.linspace(-1.0, 1.0, model.d_model)
    taus = None if event is None else jnp.asarray(np.random.default_rng(3).uniform(0.05, 1.5, (BATCH, STEPS)),
                                                  jnp.float32)
    config = dispatch.KernelConfig(use_kernels="always", split_programs=2)
    assert fg.run_parts(model.cell(), BATCH, config) == 1  # interpret mode: one program per row
    ys = fg.fused_generate(model, x0, STEPS, taus, config=config)
    ref = _unfused(model, x0, STEPS, taus)
    chex.assert_shape(ys, (BATCH, STEPS, model.d_model))
    assert relative_error(ys, ref) < TOL
    xs = jnp.asarray(np.random.default_rng(4).standard_normal((BATCH, 5, model.d_model)), jnp.float32)
    cache = model.allocate_inference_cache(BATCH)
    cache = jax.tree.map(lambda a: jnp.asarray(np.random.default_rng(5).standard_normal(a.shape), a.dtype), cache)
    step_taus = None if taus is None else taus[:, :5]
    got, got_cache = model.multi_step(xs, cache, step_taus, kernel_config=config)
    want, want_cache = model.multi_step(xs, cache, step_taus, kernel_config=NEVER)
    assert relative_error(got, want) < TOL
    for key in cache:
        assert relative_error(got_cache[key], want_cache[key]) < TOL, key


@pytest.mark.parametrize("name,block", [("Mamba-bilinear-k3-bias", 16), ("Mamba-zoh-event", 16),
                                        ("RGLRU-k2-bias", 16), ("Mamba-zoh-event", 8), ("RGLRU-k2-bias", 4)])
def test_split_block_kernel_against_unfused_generate(name, block):
    """A split cell with a block of rows per program (``block_batch`` 16: the step's tensor-core dots at 3-pass
    precision on a GPU; 4 or 8: multiply-adds; 20 rows: full blocks and a ragged one) against the unfused
    ``generate``: the step on a block, the block's exchange arrays and barrier."""
    model, event = _split_model(name, seed=1)
    batch = 20
    rng = np.random.default_rng(6)
    x0 = jnp.asarray(rng.standard_normal((batch, model.d_model)), jnp.float32)
    taus = None if event is None else jnp.asarray(rng.uniform(0.05, 1.5, (batch, STEPS)), jnp.float32)
    config = dispatch.KernelConfig(use_kernels="always", split_programs=2, block_batch=block)
    cell = model.cell()
    assert cell.blockable and fg.split_block(cell, batch, config) == block and fg.run_parts(cell, batch, config) == 1
    # one program per block and part (P = 1 in interpret mode); a program per row would leave programs outside
    # the rows, waiting at barriers for programs that can never be resident on a GPU
    assert pallas_grids(lambda x0: fg.fused_generate(model, x0, STEPS, taus, config=config), x0) == [
        (-(-batch // block), 1)]
    ys = fg.fused_generate(model, x0, STEPS, taus, config=config)
    chex.assert_shape(ys, (batch, STEPS, model.d_model))
    assert relative_error(ys, _unfused(model, x0, STEPS, taus)) < TOL


def test_hoisted_parameters_by_each_rule():
    """``split_hoisted``: up to ``num_warps * HOIST_PER_WARP`` numbers stay in registers, the rest is re-read every
    step. ``"smallest"``: the smallest leaves first; ``"largest"``: the subset of largest total that fits, and of
    those the one of most leaves (both checked against every subset of random sizes)."""
    rng = np.random.default_rng(8)
    for _ in range(200):
        sizes = [int(s) for s in rng.choice([16, 64, 256, 1024, 2048, 4096, 8192], rng.integers(1, 9))]
        warps = int(rng.choice([1, 2, 4]))
        capacity = warps * fg.HOIST_PER_WARP
        fitting = [subset for r in range(len(sizes) + 1) for subset in itertools.combinations(range(len(sizes)), r)
                   if sum(sizes[i] for i in subset) <= capacity]
        hoisted, streamed = fg.split_hoisted(sizes, warps, "largest")
        assert sorted(hoisted + streamed) == list(range(len(sizes)))
        best = max((sum(sizes[i] for i in subset), len(subset)) for subset in fitting)
        assert (sum(sizes[i] for i in hoisted), len(hoisted)) == best
        hoisted, streamed = fg.split_hoisted(sizes, warps, "smallest")
        order = sorted(range(len(sizes)), key=lambda i: (sizes[i], i))
        prefix = [i for k, i in enumerate(order) if sum(sizes[j] for j in order[:k + 1]) <= capacity]
        assert hoisted == sorted(prefix) and sorted(hoisted + streamed) == list(range(len(sizes)))
    assert fg.split_hoisted([fg.HOIST_PER_WARP + 1], 1) == ([], [0])
    with pytest.raises(ValueError, match="rule='most'"):
        fg.split_hoisted([1], 1, "most")
    with pytest.raises(ValueError, match="KernelPolicy.hoist='most'"):
        cells.KernelPolicy(hoist="most")


def test_s5_lti_holds_its_dense_skip_in_registers():
    """S5 LTI at H=128, N=64 (41 K numbers: 16 warps, the cap) contracts its real ``B`` once and scales by ``gamma``
    (``B_bar = gamma B``, :meth:`S5.factored_input`: 8,192 numbers fewer than ``B_bar``'s two planes) and declares
    ``hoist="largest"`` (measured faster on an H200): it keeps its dense 128 x 128 skip (folded with ``C B_bar`` into
    ``direct``), ``B`` and both planes of ``C`` in registers and re-reads only ``A_bar`` and ``gamma``, 256 numbers a
    step; by the smallest first it would re-read ``direct``, 16,384. With 32 warps everything fits."""
    s5 = fg.abstract_cell(selftest.abstract_model("lti.S5", dict(d_model=128, d_state=64, discretization="zoh")))
    names = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(s5.params)[0]]
    sizes = fg._padded_sizes(s5.params, {}, 1)
    assert sorted(zip(names, sizes)) == sorted([("['B']", 8192), ("['CT'].re", 8192), ("['CT'].im", 8192),
                                               ("['direct']", 16384), ("['a'].re", 64), ("['a'].im", 64),
                                               ("['gamma'].re", 64), ("['gamma'].im", 64)])
    assert s5.policy.hoist == "largest"
    warps = fg._auto_num_warps(sizes, 1, dispatch.KernelConfig())
    hoisted, streamed = fg.split_hoisted(sizes, warps, s5.policy.hoist)
    assert warps == 16 and "['direct']" in [names[i] for i in hoisted]
    assert sorted(names[i] for i in streamed) == ["['a'].im", "['a'].re", "['gamma'].im", "['gamma'].re"]
    assert [names[i] for i in fg.split_hoisted(sizes, warps, "smallest")[1]] == ["['direct']"]
    assert fg.split_hoisted(sizes, 32, s5.policy.hoist) == (list(range(8)), [])


@pytest.mark.parametrize("name, kwargs, folded", [
    ("lti.S5", dict(d_model=12, d_state=6, discretization="zoh"), True),
    ("lti.S5", dict(d_model=12, d_state=6, discretization="bilinear", conj_sym=True), True),
    ("lti.LRU", dict(d_model=12, d_state=6), False),
    ("ltv.S5", dict(d_model=12, d_state=6), False),
])
def test_a_dense_skip_is_folded_into_the_direct_path(name, kwargs, folded):
    """S5 LTI's dense skip ``x @ D`` takes ``Re(C B_bar)`` in (``direct``), and its cell reads the output from the
    decayed previous state: one step of a block of rows and of one row (the kernels' form) equals the float64
    recurrence ``h = A_bar h + B_bar x``, ``y = Re(C h) + skip(x)``. LRU and S5 LTV (diagonal skips) keep the plain
    readout. Fresh random parameters, state and input; float32 steps, so 1e-5."""
    model = model_class(name)(**kwargs, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(7)
    nnx.update(model, jax.tree.map(lambda a: a + 0.1 * rng.standard_normal(a.shape).astype(np.float32),
                                   nnx.state(model, nnx.Param)))
    cell = model.cell()
    assert ("direct" in cell.params) is folded and ("D_full" not in cell.params)
    A_bar, B_bar, C = (np.asarray(m, np.complex128) for m in model.discrete_system(jnp.ones(())))
    h0 = rng.standard_normal((3, kwargs["d_state"])) + 1j * rng.standard_normal((3, kwargs["d_state"]))
    x = rng.standard_normal((3, kwargs["d_model"]))
    h = A_bar * h0 + x @ B_bar.T
    expected = (h @ C.T).real + np.asarray(model.skip(jnp.asarray(x, jnp.float32)), np.float64)
    cache = {"lrnn_state": jnp.asarray(h0.reshape((3,) + model.state_shape()), jnp.complex64)}
    y, state = cells.xla_step(cell, model.cell_state(cache), jnp.asarray(x, jnp.float32), {})
    chex.assert_shape(y, (3, kwargs["d_model"]))
    chex.assert_type(y, jnp.float32)
    assert relative_error(y, expected) < 1e-5
    assert relative_error(np.asarray(state["h"].re) + 1j * np.asarray(state["h"].im), h.reshape(3, -1)) < 1e-5
    one_row = cell.step(cell.params, jax.tree.map(lambda leaf: leaf[0], model.cell_state(cache)),
                        jnp.asarray(x[0], jnp.float32), {}, km.Precisions(jax.lax.Precision.HIGHEST, None))[0]
    assert relative_error(one_row, expected[0]) < 1e-5


def test_split_plan(monkeypatch):
    """How many programs a row gets, and the reasons when none fits (an H200's 132 SMs)."""
    monkeypatch.setattr(fg, "resident_programs", lambda: 132)
    mamba = fg.abstract_cell(selftest.abstract_model("ltv.Mamba", dict(d_model=128, d_state=16)))
    auto = dispatch.KernelConfig()
    # the most programs that can be resident: 256 channels into 16 at B=1, 4 at B=32 (128 of 132 SMs)
    assert [fg.split_plan(mamba, b, auto) for b in (1, 8, 32)] == [(16, None), (16, None), (4, None)]
    assert fg.split_plan(mamba, 4, dataclasses.replace(auto, split_programs=8)) == (8, None)
    # 34 rows x 4 > 132 (and 2 programs per row do not hold the parameters): blocks of 16 rows, each over the fewest
    # programs (4), up to 33 blocks x 4 = 132 programs at B=528; beyond, the unsplit path (which fits the
    # one-program limits, re-reading parameters every step)
    assert [fg.split_block(mamba, b, auto) for b in (1, 33, 34, 512)] == [1, 1, 16, 16]  # 33 x 4 = 132
    assert [fg.split_plan(mamba, b, auto) for b in (34, 528, 529)] == [(4, None), (4, None), (None, None)]
    assert fg.unsupported_reason(mamba, 529) is None
    rows = dataclasses.replace(auto, split_programs=4, block_batch=1)
    reason = fg.split_plan(mamba, 34, rows)[1]
    assert "34 rows x 4 programs each: over the 132 programs" in reason
    reason = fg.unsupported_reason(mamba, 1, config=dataclasses.replace(auto, split_programs=2))
    assert "no split of its 256 channels into [2] programs fits" in reason
    reason = fg.unsupported_reason(mamba, 1, config=dataclasses.replace(auto, split_programs=32))
    assert "split_programs=32 does not cut 256 channels into powers of two of at least 16" in reason
    with pytest.raises(ValueError, match="split_programs must be a power of two"):
        dispatch.KernelConfig(split_programs=3)
    # blocks of 16 rows asked for: the fewest programs per block (4), whatever the batch
    blocks = dataclasses.replace(auto, block_batch=16)
    assert [fg.split_block(mamba, b, blocks) for b in (1, 32)] == [16, 16]
    assert [fg.split_plan(mamba, b, blocks) for b in (32, 256)] == [(4, None), (4, None)]
    reason = fg.split_plan(mamba, 4096, dataclasses.replace(blocks, split_programs=4))[1]
    assert "256 blocks of 16 rows x 4 programs each: over the 132 programs" in reason
    small = fg.abstract_cell(selftest.abstract_model("ltv.Mamba", dict(d_model=16, d_state=4)))
    assert fg.split_plan(small, 4, auto) == (None, None)  # its parameters fit one program's registers
    # S4 (H=128, N=64, rank 1: 394 KB of parameters) over its 128 SSM channels; S4D declares no split
    s4 = fg.abstract_cell(selftest.abstract_model("lti.S4", dict(d_model=128, d_state=64, transposed=False)))
    assert [fg.split_plan(s4, b, auto) for b in (1, 32)] == [(8, None), (4, None)] and s4.split.splits_x
    s4d = fg.abstract_cell(selftest.abstract_model("lti.S4D", dict(d_model=128, d_state=64, transposed=False)))
    assert s4d.split is None
    # RG-LRU (H=128: 4 or 8 programs) declares blocks of 8 rows (multiply-adds): rows up to B=33, then blocks of 8
    # over the most programs that are resident (8 up to 16 blocks, then 4), up to 33 blocks x 4 = 132 programs at
    # B=264; beyond, blocks of 16 (dots) over the fewest
    rglru = fg.abstract_cell(selftest.abstract_model("ltv.RGLRU", dict(d_model=128)))
    assert rglru.policy.split_block == 8 and mamba.policy.split_block is None
    assert [fg.split_block(rglru, b, auto) for b in (32, 33, 34, 64, 128, 264, 265, 512)] == [1, 1, 8, 8, 8, 8, 16, 16]
    assert [fg.split_plan(rglru, b, auto)[0] for b in (32, 64, 128, 136, 264, 512)] == [4, 8, 8, 4, 4, 4]
    assert dataclasses.replace(rglru.policy, split_block=None).split_block is None
    for bad in (1, 3, 6, True, 8.0):
        with pytest.raises(ValueError, match=f"^KernelPolicy.split_block must be None or a power of two >= 2, got "
                                             f"{re.escape(repr(bad))}$"):
            dataclasses.replace(rglru.policy, split_block=bad)


@TRITON_DEPRECATION
@pytest.mark.parametrize("name,kwargs,batch,grid,warps", [
    ("ltv.RGLRU", dict(d_model=128), 32, (32, 4), 4),  # rows over 4 programs: its split_row_warps
    ("ltv.RGLRU", dict(d_model=128), 8, (8, 8), 2),  # rows over 8 programs: its split_row_warps
    ("ltv.RGLRU", dict(d_model=128), 256, (32, 4), 8),  # blocks of 8 rows over 4 programs: split_num_warps's rule
    ("ltv.Mamba", dict(d_model=128, d_state=16), 32, (32, 4), 8),  # rows over 4 programs: the rule
    ("ltv.Mamba", dict(d_model=128, d_state=16), 8, (8, 16), 4),  # rows over 16 programs: the rule
])
def test_split_programs_take_the_cells_warps(lower_for_h100, monkeypatch, name, kwargs, batch, grid, warps):
    """The warps a split kernel is lowered with (an H200's 132 SMs): RG-LRU declares ``split_row_warps`` (4 warps
    over 4 programs per row, 2 over 8: measured faster), which applies to one row per program only; Mamba keeps the
    rule."""
    monkeypatch.setattr(fg, "resident_programs", lambda: 132)
    model = model_class(name)(**kwargs, rngs=nnx.Rngs(0))
    model.eval()
    policy = model.cell().policy
    assert policy.split_row_warps == (((4, 4), (8, 2)) if name == "ltv.RGLRU" else ())
    assert policy.row_warps(16) is None and fg._auto_num_warps([1], 16, dispatch.KernelConfig(), 4, policy) == 8
    leaves, treedef = jax.tree.flatten(model)
    config = dispatch.KernelConfig(interpret=False)
    text = lower_for_h100(lambda leaves, x0: fg.fused_generate(jax.tree.unflatten(treedef, leaves), x0, 4, None,
                                                               config=config),
                          leaves, jnp.zeros((batch, 128), jnp.float32))
    assert re.search(rf"grid_x = {grid[0]} : i32, grid_y = {grid[1]} : i32", text)
    assert re.findall(r"num_warps = (\d+) : i32", text) == [str(warps)]


@pytest.mark.parametrize("bad,message", [
    (4, " must be a tuple of (programs per row, warps) pairs, got 4"),
    (((4,),), " must be a tuple of (programs per row, warps) pairs, got ((4,),)"),
    (((3, 4),), "' programs per row must be a power of two >= 1, got 3"),
    (((4, 0),), "' warps must be a power of two >= 1, got 0"),
    (((4, True),), "' warps must be a power of two >= 1, got True"),
])
def test_split_row_warps_is_checked(bad, message):
    with pytest.raises(ValueError, match=re.escape("KernelPolicy.split_row_warps" + message)):
        cells.KernelPolicy(split_row_warps=bad)


def _rollout_with_exchange(model, x0, taus, config, exchange):
    """The fused rollout of ``model`` (a split cell) through ``run_cell``, its ``Split.exchange`` replaced."""
    cell = model.cell()
    cell = cell._replace(split=cell.split._replace(exchange=exchange))
    step_inputs = {} if taus is None else model.cell_inputs(taus.shape, taus)
    state = model.cell_state(model.allocate_inference_cache(x0.shape[0]))
    return fg.run_cell(cell, state, x0, STEPS, {}, step_inputs, config=config)[0]


def _split_case(name, block, seed):
    """A split model and its inputs: ``BATCH`` rows, or 20 (a full block of 16 and a ragged one) for blocks."""
    model, event = _split_model(name)
    batch = BATCH if block == 1 else 20
    rng = np.random.default_rng(seed)
    x0 = jnp.asarray(rng.standard_normal((batch, model.d_model)), jnp.float32)
    taus = None if event is None else jnp.asarray(rng.uniform(0.05, 1.5, (batch, STEPS)), jnp.float32)
    return model, x0, taus


def test_split_exchanges_are_declared_as_measured():
    """S4 exchanges tagged words, Mamba and RG-LRU take the barrier (the H200 measurements of ``SPLIT_EXCHANGE``);
    an unknown exchange is refused by name."""
    declared = {name: _split_model(name)[0].cell().split.exchange for name in SPLIT}
    assert declared == {"Mamba-bilinear-k3-bias": "barrier", "Mamba-zoh-event": "barrier", "RGLRU-k2-bias": "barrier",
                        "S4-channels2": "tagged", "S4-gate-bottleneck": "tagged"}
    model, x0, taus = _split_case("RGLRU-k2-bias", 1, 8)
    with pytest.raises(ValueError, match="Split.exchange='atomic': expected one of"):
        _rollout_with_exchange(model, x0, taus, dispatch.KernelConfig(use_kernels="always", split_programs=2), "atomic")


@pytest.mark.parametrize("name,block,one_load", [("Mamba-zoh-event", 1, False), ("Mamba-zoh-event", 1, True),
                                                 ("Mamba-bilinear-k3-bias", 16, False), ("Mamba-zoh-event", 4, True),
                                                 ("RGLRU-k2-bias", 1, False), ("RGLRU-k2-bias", 4, False),
                                                 ("S4-channels2", 1, False), ("S4-channels2", 1, True)])
def test_split_exchanges_agree(name, block, one_load, monkeypatch):
    """Both exchanges of a split run (interpret mode: one program per row group, through each exchange's arrays),
    reading a row's partials in one load or one program's at a time (a block always the latter), equal the unfused
    ``generate``, and each other to float32 rounding (the words carry every bit, but XLA may fuse the arithmetic
    around the two differently, e.g. into FMAs)."""
    monkeypatch.setattr(fg, "ONE_LOAD_MIN_PARTS", 1 if one_load else 2)  # (interpret mode: one program a group)
    model, x0, taus = _split_case(name, block, 9)
    config = dispatch.KernelConfig(use_kernels="always", split_programs=2, block_batch=block)
    barrier, tagged = (_rollout_with_exchange(model, x0, taus, config, exchange) for exchange in cells.EXCHANGES)
    chex.assert_shape(tagged, (x0.shape[0], STEPS, model.d_model))
    assert relative_error(tagged, barrier) < 1e-6
    reference = _unfused(model, x0, STEPS, taus)
    assert relative_error(tagged, reference) < TOL and relative_error(barrier, reference) < TOL


@TRITON_DEPRECATION
@pytest.mark.parametrize("name,block,exchange,one_load", [
    ("Mamba-zoh-event", 1, "barrier", False), ("Mamba-zoh-event", 1, "tagged", False),
    ("Mamba-zoh-event", 1, "barrier", True), ("Mamba-zoh-event", 1, "tagged", True),
    ("RGLRU-k2-bias", 1, "barrier", False), ("RGLRU-k2-bias", 1, "tagged", False), ("S4-channels2", 1, "tagged", False),
    ("S4-channels2", 1, "barrier", False), ("Mamba-zoh-event", 16, "barrier", False),
    ("Mamba-zoh-event", 16, "tagged", False), ("RGLRU-k2-bias", 16, "tagged", False),
    ("Mamba-zoh-event", 4, "barrier", True), ("RGLRU-k2-bias", 8, "tagged", True)])
def test_split_kernel_lowers_to_triton(lower_for_h100, name, block, exchange, one_load, monkeypatch):
    """Split over 2 programs per row, or per block of 16 rows (the step's dots and 3-D state tiles), with each
    exchange: the barrier's atomic arrivals, or the tagged words (their stores and volatile loads) and no atomic; a row's
    partials read one program's at a time, or all in one load."""
    monkeypatch.setattr(fg, "ONE_LOAD_MIN_PARTS", 2 if one_load else 4)
    model, x0, taus = _split_case(name, block, 22)
    leaves, treedef = jax.tree.flatten(model)
    config = dispatch.KernelConfig(interpret=False, split_programs=2, block_batch=block)
    text = lower_for_h100(lambda leaves, x0, taus: _rollout_with_exchange(jax.tree.unflatten(treedef, leaves), x0,
                                                                          taus, config, exchange), leaves, x0, taus)
    if exchange == "tagged":
        assert "tagged_words" in text and "untagged_value" in text and "atomic_rmw" not in text
    else:
        assert "atomic_rmw" in text and "tagged_words" not in text
    kernel = _kernel_jaxpr(lambda x0: _rollout_with_exchange(model, x0, taus, config, exchange), x0)
    assert (_count(kernel, "dot_general") > 0) == (block >= dispatch.DOT_MIN_ROWS)  # fewer rows: multiply-adds


def untied_volatile_loads(jaxpr) -> list:
    """The volatile loads of ``jaxpr`` (and, each on its own, of the jaxprs nested in it) that follow a ``while``
    loop in the same jaxpr but do not index from a loop's results."""
    untied, tied, after_loop = [], set(), False
    for eqn in jaxpr.eqns:
        subs = list(jex.core.jaxprs_in_params(eqn.params))
        for sub in subs:
            untied += untied_volatile_loads(sub)
        inputs = {v for v in eqn.invars if not isinstance(v, jex.core.Literal)}
        if eqn.primitive.name == "while":
            tied.update(eqn.outvars)
            after_loop = True
            continue
        if eqn.primitive.name == "masked_load" and eqn.params["is_volatile"] and after_loop and not inputs & tied:
            untied.append(eqn)
        if inputs & tied:
            tied.update(eqn.outvars)
    return untied


def _kernel_jaxpr(fn, *args):
    """The kernel body of the one ``pallas_call`` in ``fn``'s program."""
    [call] = pallas_calls(fn, *args)
    return call.params["jaxpr"]


def _count(jaxpr, name: str) -> int:
    return sum(eqn.primitive.name == name for eqn in equations(jaxpr))


def test_a_wait_loop_is_kept_only_through_its_result():
    """Why the exchanges' loads index from their wait loops' results: JAX drops a ``while`` loop whose results are
    unused and whose body has no effect (a volatile load is none), so a spin on volatile loads disappears from the
    kernel unless what follows uses its result. On the H200 an untied spin read the partials before they were
    written (BENCHMARKS.md section 9)."""
    pl, plgpu = dispatch.pallas_modules()

    def kernel_jaxpr(tie: bool):
        def kernel(flags_ref, words_ref, out_ref):
            zero = 0 * pl.program_id(0)
            settled = jax.lax.while_loop(lambda n: n < 1, lambda n: plgpu.load(flags_ref.at[zero], volatile=True), zero)
            out_ref[...] = plgpu.load(words_ref.at[pl.ds(settled if tie else zero, 16)], volatile=True)

        call = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((16,), jnp.float32), grid=(1,), interpret=False)
        return _kernel_jaxpr(call, jnp.zeros((1,), jnp.int32), jnp.zeros((16,), jnp.float32))

    assert _count(kernel_jaxpr(tie=False), "while") == 0  # the wait is gone
    tied = kernel_jaxpr(tie=True)
    assert _count(tied, "while") == 1 and untied_volatile_loads(tied) == []


@pytest.mark.parametrize("name,block,exchange", [("Mamba-zoh-event", 1, "tagged"), ("Mamba-zoh-event", 16, "tagged"),
                                                 ("RGLRU-k2-bias", 1, "tagged"), ("S4-channels2", 1, "tagged"),
                                                 ("Mamba-zoh-event", 1, "barrier"), ("S4-channels2", 1, "barrier")])
def test_split_exchange_keeps_its_wait_loops(name, block, exchange):
    """Every exchange of a split kernel keeps its wait loops (tagged: the sentinels' and the check's, after one CTA
    barrier; barrier: one atomic arrival and the spin on the counter's volatile loads, between two CTA barriers), and
    every volatile load after a loop indexes from a loop's result."""
    model, x0, taus = _split_case(name, block, 23)
    config = dispatch.KernelConfig(interpret=False, split_programs=2, block_batch=block)
    kernel = _kernel_jaxpr(lambda x0: _rollout_with_exchange(model, x0, taus, config, exchange), x0)
    loops, barriers = _count(kernel, "while"), _count(kernel, "debug_barrier_p")
    assert barriers >= 1 and loops == (2 * barriers if exchange == "tagged" else barriers // 2)
    assert _count(kernel, "atomic_rmw") == (0 if exchange == "tagged" else loops)
    assert untied_volatile_loads(kernel) == []


@pytest.mark.parametrize("exchange", cells.EXCHANGES)
def test_a_rows_partials_are_read_in_one_load_from_the_threshold(exchange, monkeypatch):
    """From ``ONE_LOAD_MIN_PARTS`` programs on, a row's partials are loaded in one load per leaf (and half of a
    tagged word; the tagged check loop too) instead of one per program: fewer volatile loads, each of ``P``
    partials; a block of rows reads one program's at a time at any ``P``."""
    model, x0, taus = _split_case("Mamba-zoh-event", 1, 24)
    config = dispatch.KernelConfig(interpret=False, split_programs=2)

    def volatile_loads(threshold, block=1):
        monkeypatch.setattr(fg, "ONE_LOAD_MIN_PARTS", threshold)
        xb = x0 if block == 1 else jnp.tile(x0, (6, 1))[:16]
        tb = taus if block == 1 or taus is None else jnp.tile(taus, (6, 1))[:16]
        kernel = _kernel_jaxpr(lambda x: _rollout_with_exchange(
            model, x, tb, dataclasses.replace(config, block_batch=block), exchange), xb)
        return [e for e in equations(kernel)  # the partials' loads (not the barrier counter's scalar ones)
                if e.primitive.name == "masked_load" and e.params["is_volatile"] and e.outvars[0].aval.ndim]

    at_once, one_by_one = volatile_loads(2), volatile_loads(4)
    assert 0 < len(at_once) < len(one_by_one)
    assert any(e.outvars[0].aval.shape[0] == 2 for e in at_once)
    assert len(volatile_loads(2, block=16)) == len(volatile_loads(4, block=16))


def test_exchange_words_carry_every_bit_and_the_tag():
    """``tagged_words`` / ``untagged_value``: every float32 bit pattern (random bits, signed zeros, infinities, NaN
    payloads, subnormals) survives the two 16-bit halves exactly, each word carries the tag, and the tags of the
    exchanges that share a slot (``n`` and ``n - 2``) differ and are never 0 (the arrays' initial words)."""
    rng = np.random.default_rng(11)
    bits = np.concatenate([rng.integers(-2**31, 2**31, 4096, dtype=np.int64).astype(np.int32),
                           np.array([0, -2**31, 0x7F800000, -8388608, 0x7FC00001, 1, 0x007FFFFF], np.int32)])
    value = jnp.asarray(bits.view(np.float32))
    for number in (0, 1, 5, fg.TAG_PERIOD - 1, fg.TAG_PERIOD, 3 * fg.TAG_PERIOD + 7, 2**31 - 1):
        tag = fg.exchange_tag(jnp.int32(number))
        assert 1 <= int(tag) <= fg.TAG_PERIOD
        high, low = fg.tagged_words(value, tag)
        chex.assert_type([high, low], jnp.int32)
        np.testing.assert_array_equal(fg.word_tag(high), int(tag))
        np.testing.assert_array_equal(fg.word_tag(low), int(tag))
        np.testing.assert_array_equal(np.asarray(fg.untagged_value(high, low)).view(np.int32), bits)
        if number >= 2:
            assert int(fg.exchange_tag(jnp.int32(number - 2))) != int(tag)
    assert int(fg.word_tag(jnp.int32(0))) == 0


# ----------------------------------------------------------------------------- fallbacks
@pytest.mark.parametrize("name,lrnnx_name,kwargs", selftest.FALLBACKS, ids=[f[0] for f in selftest.FALLBACKS])
def test_fallback_reason_and_switch(name, lrnnx_name, kwargs):
    """Models and sizes without a fused kernel are refused with a reason; the switch then takes the XLA path."""
    model = selftest.abstract_model(lrnnx_name, kwargs)
    reason = fg.model_unsupported_reason(model, 4, False)
    assert isinstance(reason, str) and type(model).__name__ in reason
    with pytest.warns(RuntimeWarning, match="fused_generation: using the pure-JAX reference"):
        assert not fg.use_fused_rollout(model, 4, False, config=ALWAYS)
    with pytest.raises(ValueError, match="fused_generate does not support"):
        fg.fused_generate(model, jnp.zeros((4, model.d_model)), 3)


def test_other_refusals_and_the_policies(monkeypatch):
    lru, mamba = (selftest.abstract_model(*CONFIGS[name][:2]) for name in ("LRU", "Mamba-k2-e1.5-bias"))
    assert "event mode on LRU" in fg.model_unsupported_reason(lru, 4, True)
    assert "inputs of dtype bfloat16" in fg.model_unsupported_reason(lru, 4, False, jnp.bfloat16)
    assert fg.model_unsupported_reason(mamba, 4096, False) is None  # batch size alone is never a refusal
    s7 = selftest.abstract_model("ltv.S7", dict(d_model=16, d_state=8))
    s7_policy = fg.abstract_cell(s7).policy
    assert s7_policy.slower_reason("rollout", 512) is None  # measured faster up to batch 512
    assert s7_policy.slower_reason("rollout", 513) is not None
    s4d = selftest.abstract_model("lti.S4D", dict(d_model=128, d_state=64, transposed=False))
    assert fg.abstract_cell(s4d).policy.slower_reason("rollout", 4096) is None  # measured faster at B=4096
    assert fg.use_fused_rollout(lru, 4, False) == dispatch.on_nvidia_gpu()  # "auto": the XLA program off-GPU
    assert fg.use_fused_rollout(lru, 4, False, config=ALWAYS)
    assert not fg.use_fused_rollout(lru, 4, False, config=NEVER)
    monkeypatch.setattr(dispatch, "on_nvidia_gpu", lambda: True)
    assert fg.use_fused_rollout(lru, 4, False)
    assert fg.use_fused_rollout(mamba, 512, False)  # its cell declares the fused rollout faster up to 512 rows
    assert not fg.use_fused_rollout(mamba, 513, False)  # and the XLA program above
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert not fg.use_fused_rollout(lru, 4, True)


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
