"""Compile-once generation: equality with a Python loop over ``model.step`` for every
model in tests/zoo.py, one compilation across step counts / seeds / parameter
updates, fresh state per call, the dispatch point, and the error messages.

Compilations are counted with JAX's compile logging (``jax.log_compiles``): every
XLA compilation logs "Finished XLA compilation of jit(<name>)", eager operations
included, so the counts below see everything that compiles.
"""

from __future__ import annotations

import re

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import compile_log, relative_error
from lrnnx_jax import generation
from lrnnx_jax.generation import CapturedModel, GenerationConfig, capture_graph, generate
from pallas_kernels import KernelConfig
from zoo import ZOO, H

ENTRIES = pytest.mark.parametrize("entry", ZOO, ids=[e.name for e in ZOO])
LRU_ENTRY = next(e for e in ZOO if e.name == "LRU")
EVENT_ENTRY = next(e for e in ZOO if e.event)
#: small chunks and blocks, so that a few steps cross every boundary (7 steps = a call of
#: two blocks, then a call of one block and the one-step remainder)
SMALL = GenerationConfig(chunk_size=4, block_size=2, unroll=1)
#: the XLA program whatever the platform (on an NVIDIA GPU "auto" picks the fused program for most models)
NEVER = KernelConfig(use_kernels="never")


def step_loop(model, x0, num_steps, tau=None):
    """Closed-loop reference: a Python loop over ``model.step``; ``tau`` is (B, 1) or (B, num_steps).

    Called as a user calls it (the base class compiles the step once per shape),
    with the shapes of tests/test_model_contract.py's loop, so that the suite
    compiles it once for both.
    """
    cache = model.allocate_inference_cache(x0.shape[0])
    x, ys = jnp.asarray(x0), []
    for t in range(num_steps):
        tau_t = None if tau is None else tau[:, t : t + 1] if tau.shape[1] > 1 else tau
        x, cache = model.step(x, cache, integration_timesteps=tau_t)
        ys.append(x)
    return np.stack(ys, axis=1)


def inputs(batch, seed, event=False, num_steps=1):
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((batch, H)).astype(np.float32)
    tau = rng.uniform(0.05, 1.5, (batch, num_steps)).astype(np.float32) if event else None
    return x0, tau


@ENTRIES
def test_generate_equals_step_loop(entry):
    """The cache crosses block, remainder and call boundaries."""
    model = entry.build(seed=11)
    num_steps = 7
    x0, tau = inputs(3, seed=12, event=entry.event, num_steps=num_steps)
    graph = capture_graph(model, batch_size=3, event_mode=entry.event, config=SMALL)
    schedules = [tau[:, :1], tau] if entry.event else [None]  # lrnnx's reused (B, 1) and a per-step schedule
    for schedule in schedules:
        ys = generate(model, x0, num_steps, graph_cache=graph, integration_timesteps=schedule)
        chex.assert_shape(ys, (3, num_steps, H))
        chex.assert_type(ys, jnp.float32)
        assert relative_error(ys, step_loop(model, x0, num_steps, schedule)) < 1e-5


def test_one_compilation_across_steps_seeds_and_parameters():
    model = LRU_ENTRY.build(seed=1)
    with compile_log() as captured:
        graph = capture_graph(model, batch_size=2, config=SMALL, kernel_config=NEVER)
    assert captured == ["generation_program"]
    optimizer = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x):
        optimizer.update(model, nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model))

    x0, _ = inputs(2, seed=3)
    before = generate(model, x0, 9, graph_cache=graph)
    with compile_log() as compiled:
        outputs = {}
        for num_steps in (1, 4, 9, 30):
            for seed in (3, 4):
                x0, _ = inputs(2, seed)
                outputs[num_steps, seed] = generate(model, x0, num_steps, graph_cache=graph)
    train_step(model, optimizer, jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, H)), jnp.float32))
    with compile_log() as compiled_after_update:
        after = generate(model, inputs(2, seed=3)[0], 9, graph_cache=graph)
    # the generation program never compiles again; on an accelerator only the output slicing, once per new
    # num_steps that is not one whole chunk (on the CPU the output is sliced on the host)
    assert compiled == ([] if jax.default_backend() == "cpu" else ["_assemble"] * 2)  # num_steps 1 and 30; 4 is a chunk
    assert compiled_after_update == []
    for (num_steps, seed), ys in outputs.items():
        chex.assert_shape(ys, (2, num_steps, H))
        np.testing.assert_allclose(ys, outputs[30, seed][:, :num_steps], rtol=1e-6, atol=1e-6)
    # the program reads the parameters as arguments: after the update it generates with the new weights
    assert relative_error(after, before) > 1e-2
    assert relative_error(after, step_loop(model, inputs(2, seed=3)[0], 9)) < 1e-5
    with compile_log() as compiled:
        generate(model, inputs(2, seed=5)[0], 30, graph_cache=graph).block_until_ready()
    assert compiled == []


CAPTURED_ENTRIES = [LRU_ENTRY] + [e for e in ZOO if e.name in ("Mamba", "Mamba-dirac-event")]


@pytest.mark.parametrize("entry", CAPTURED_ENTRIES, ids=lambda e: e.name)
def test_a_captured_model_generates_as_the_model_and_sees_parameter_updates(entry):
    """``generate`` through a CapturedModel runs the program the model runs, with the same leaves: the same outputs
    (with a graph and without one, in event mode too), and it compiles nothing the model's call did not. A graph
    captured from the CapturedModel serves the model too. An in-place update of every parameter is seen."""
    model = entry.build(seed=31)
    captured = CapturedModel(model)
    assert captured.model is model
    num_steps = 7
    x0, tau = inputs(3, seed=32, event=entry.event, num_steps=num_steps)
    graph = capture_graph(captured, 3, event_mode=entry.event, config=SMALL, kernel_config=NEVER)  # serves both

    def generated(**kwargs):
        """The model's outputs, checked equal to the capture's (whose call compiles nothing)."""
        ys = generate(model, x0, num_steps, integration_timesteps=tau, **kwargs)
        with compile_log() as compiled:
            through_capture = generate(captured, x0, num_steps, integration_timesteps=tau, **kwargs)
        assert compiled == []
        chex.assert_shape(through_capture, (3, num_steps, H))
        chex.assert_type(through_capture, jnp.float32)
        np.testing.assert_array_equal(np.asarray(through_capture), np.asarray(ys))
        return np.asarray(ys)

    before = generated(graph_cache=graph)
    assert np.all(np.isfinite(before)) and np.abs(before).max() > 1e-3
    np.testing.assert_allclose(generated(config=SMALL, kernel_config=NEVER), before, rtol=1e-6, atol=1e-6)
    # every parameter scaled in place by its own random factors (the Variables stay: the capture reads them)
    rng = np.random.default_rng(33)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda p: p * jnp.asarray(rng.uniform(0.5, 1.5, p.shape), p.dtype), params))
    after = generated(graph_cache=graph)
    assert relative_error(after, before) > 1e-2
    np.testing.assert_allclose(generated(config=SMALL, kernel_config=NEVER), after, rtol=1e-6, atol=1e-6)


def test_a_captured_model_does_not_see_structural_changes():
    """A Variable replaced (not its value updated) is a structural change: the capture keeps reading the old one."""
    model = LRU_ENTRY.build(seed=34)
    captured = CapturedModel(model)
    graph = capture_graph(model, 2, config=SMALL, kernel_config=NEVER)
    x0, _ = inputs(2, seed=34)
    before = np.asarray(generate(captured, x0, 5, graph_cache=graph))
    model.D = nnx.Param(2.0 * model.D.get_value())
    np.testing.assert_array_equal(np.asarray(generate(captured, x0, 5, graph_cache=graph)), before)
    assert relative_error(generate(model, x0, 5, graph_cache=graph), before) > 1e-2
    np.testing.assert_array_equal(np.asarray(generate(CapturedModel(model), x0, 5, graph_cache=graph)),
                                  np.asarray(generate(model, x0, 5, graph_cache=graph)))


def test_a_captured_model_of_another_structure_or_shapes_is_refused():
    """The graph's structure is compared with the capture's, and its parameter shapes with the Variables' current
    values at every call (an in-place update can assign a value of another shape)."""
    model = LRU_ENTRY.build(seed=35)
    graph = capture_graph(model, 2, config=SMALL, kernel_config=NEVER)
    x0, _ = inputs(2, seed=35)
    refused = r"graph_cache was captured for a model of another structure or parameter shapes than this {}; re-capture"
    mamba = next(e for e in ZOO if e.name == "Mamba").build()
    for other in (type(model)(d_model=H, d_state=7, rngs=nnx.Rngs(0)), mamba):  # other shapes; another structure
        for argument in (other, CapturedModel(other)):
            with pytest.raises(ValueError, match=refused.format(type(other).__name__)):
                generate(argument, x0, 3, graph_cache=graph)
    captured = CapturedModel(model)
    expected = np.asarray(generate(model, x0, 3, graph_cache=graph))
    np.testing.assert_array_equal(np.asarray(generate(captured, x0, 3, graph_cache=graph)), expected)
    d = model.D.get_value()
    model.D.set_value(jnp.zeros((H + 1,), d.dtype))  # another shape, in place: the treedef is unchanged
    with pytest.raises(ValueError, match=refused.format("LRU")):
        generate(captured, x0, 3, graph_cache=graph)
    model.D.set_value(d)
    np.testing.assert_array_equal(np.asarray(generate(captured, x0, 3, graph_cache=graph)), expected)


def _backend_compile_seconds():
    """A counter of XLA backend compilation time (JAX's monitoring event), for the blocks below."""
    seconds = [0.0]

    def listener(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            seconds[0] += duration

    jax.monitoring.register_event_duration_secs_listener(listener)
    return seconds, listener


def test_new_step_counts_cost_little_compilation_and_repeats_none():
    """After capture_graph, new step counts compile nothing on the CPU (< 0.2 s in all, to allow for
    unrelated work) and repeated ones nothing anywhere. (On an accelerator each new count compiles one
    slicing program; see BENCHMARKS.md for the H200's cost.)"""
    model = LRU_ENTRY.build(seed=21)
    graph = capture_graph(model, batch_size=2, config=GenerationConfig(chunk_size=64, block_size=8))
    x0, _ = inputs(2, seed=21)
    seconds, listener = _backend_compile_seconds()
    try:
        for num_steps in (1, 7, 64, 65, 200):
            generate(model, x0, num_steps, graph_cache=graph).block_until_ready()
        if jax.default_backend() == "cpu":
            assert seconds[0] < 0.2, seconds[0]
        before = seconds[0]
        for num_steps in (7, 200, 1):
            generate(model, x0, num_steps, graph_cache=graph).block_until_ready()
        assert seconds[0] == before
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize("entry", [LRU_ENTRY, EVENT_ENTRY], ids=lambda e: e.name)
def test_the_program_runs_exactly_num_valid_steps(entry):
    """The state the program returns is the one after exactly ``num_valid`` steps (no surplus steps: whole
    blocks, then one guarded scan per bit of the remainder), for every count up to the chunk."""
    model = entry.build(seed=22)
    config = GenerationConfig(chunk_size=11, block_size=4, unroll=1)
    graph = capture_graph(model, batch_size=2, event_mode=entry.event, config=config, kernel_config=NEVER)
    x0, tau = inputs(2, seed=22, event=entry.event, num_steps=11)
    leaves = jax.tree.leaves(model)
    cache = model.allocate_inference_cache(2)
    taus = None if tau is None else jnp.asarray(tau)
    reference = [cache]
    x = jnp.asarray(x0)
    for t in range(11):
        x, c = model.step(x, reference[-1], integration_timesteps=None if tau is None else tau[:, t])
        reference.append(c)
    for num_valid in range(1, 12):
        ys, x_next, final, all_finite = graph.compiled(leaves, jnp.asarray(x0), cache, taus, np.int32(num_valid))
        chex.assert_shape(ys, (2, 11, H))
        chex.assert_shape(all_finite, (2,))
        assert np.all(np.asarray(ys[:, num_valid:]) == 0) and np.all(np.asarray(all_finite))
        np.testing.assert_allclose(np.asarray(x_next), np.asarray(ys[:, num_valid - 1]))
        for key, value in reference[num_valid].items():
            assert relative_error(final[key], value) < 1e-5, (num_valid, key)


def test_a_model_in_training_mode_gets_a_clear_error():
    entry = next(e for e in ZOO if e.name.startswith("S4D"))
    model = entry.build(seed=23, dropout=0.5)
    model.train()
    x0, _ = inputs(2, seed=23)
    for call in (lambda: generate(model, x0, 3), lambda: capture_graph(model, 2)):
        with pytest.raises(ValueError, match=r"training mode.*call model\.eval\(\)"):
            call()
    model.eval()
    graph = capture_graph(model, 2, config=SMALL)
    model.train()
    with pytest.raises(ValueError, match=r"training mode.*call model\.eval\(\)"):
        generate(model, x0, 3, graph_cache=graph)
    model.eval()
    assert relative_error(generate(model, x0, 3, graph_cache=graph), step_loop(model, x0, 3)) < 1e-5


def test_the_mode_is_checked_once_per_structure_not_at_every_call(monkeypatch):
    """A module's mode is static (in its treedef): a model of the captured structure is in eval mode, so ``generate``
    with a graph walks no modules (the walk took 260 µs a call for Mamba on the host); it does when the structure
    changed, to say that the model is in training mode."""
    entry = next(e for e in ZOO if e.name.startswith("S4D"))
    model = entry.build(seed=29, dropout=0.5)
    model.eval()
    eval_structure = jax.tree.structure(model)
    model.train()
    assert jax.tree.structure(model) != eval_structure  # the assumption: the mode is part of the structure
    model.eval()
    assert jax.tree.structure(model) == eval_structure
    graph = capture_graph(model, 2, config=SMALL)
    x0, _ = inputs(2, seed=29)
    reference = step_loop(model, x0, 3)
    walks = []
    walk = type(model).dropout_active
    monkeypatch.setattr(type(model), "dropout_active", lambda self: walks.append(1) or walk(self))
    ys = generate(model, x0, 3, graph_cache=graph)
    assert walks == [] and relative_error(ys, reference) < 1e-5
    model.train()
    with pytest.raises(ValueError, match=r"training mode.*call model\.eval\(\)"):
        generate(model, x0, 3, graph_cache=graph)
    assert walks == [1]


def test_generate_without_graph_compiles_once_per_structure_and_batch():
    model = LRU_ENTRY.build(seed=2)
    x0, _ = inputs(2, seed=6)
    config = GenerationConfig(chunk_size=8, block_size=4)
    with compile_log() as compiled:
        first = generate(model, x0, 11, config=config, kernel_config=NEVER)
        second = generate(model, x0 + 1, 11, config=config, kernel_config=NEVER)
        generate(model, x0, 3, config=config, kernel_config=NEVER)
    assert compiled.count("generation_program") == 1
    assert relative_error(first, step_loop(model, x0, 11)) < 1e-5
    assert relative_error(second, step_loop(model, x0 + 1, 11)) < 1e-5
    model.D[...] = model.D[...] * 0.5  # new parameter values, same structure
    with compile_log() as compiled:
        generate(model, x0, 11, config=config, kernel_config=NEVER).block_until_ready()
    assert compiled == []
    with compile_log() as compiled:
        generate(model, np.concatenate([x0, x0]), 11, config=config, kernel_config=NEVER)  # another batch size
    assert compiled.count("generation_program") == 1


def test_65536_steps_without_recompiling():
    model = LRU_ENTRY.build(seed=3, r_max=0.5)
    for name in ("C_re", "C_im", "D"):  # a contracting closed loop, so that 65,536 steps stay finite
        getattr(model, name)[...] = 0.1 * getattr(model, name)[...]
    graph = capture_graph(model, batch_size=1, config=GenerationConfig(chunk_size=4096, block_size=256, unroll=4))
    x0, _ = inputs(1, seed=7)
    with compile_log() as compiled:
        long = generate(model, x0, 65_536, graph_cache=graph)
    assert "generation_program" not in compiled
    chex.assert_shape(long, (1, 65_536, H))
    assert np.all(np.isfinite(np.asarray(long)))
    assert relative_error(long[:, :20], step_loop(model, x0, 20)) < 1e-5


def test_each_call_starts_from_a_fresh_state():
    model = LRU_ENTRY.build(seed=4)
    graph = capture_graph(model, batch_size=2, config=SMALL)
    xa, _ = inputs(2, seed=8)
    xb, _ = inputs(2, seed=9)
    first = np.asarray(generate(model, xa, 6, graph_cache=graph))
    generate(model, xb, 9, graph_cache=graph)
    np.testing.assert_array_equal(generate(model, xa, 6, graph_cache=graph), first)
    np.testing.assert_array_equal(generate(model, xa, 6), generate(model, xa, 6))


@pytest.mark.parametrize(
    "chunk_size, block_size, unroll",
    [(1, 1, 1), (5, 4, 2), (6, 8, 1), (6, 2, 2), (16, 16, 4)],  # one step; remainders; capped block; blocks; one block
)
def test_chunk_block_and_unroll_settings_agree(chunk_size, block_size, unroll):
    model = LRU_ENTRY.build(seed=5)
    x0, _ = inputs(2, seed=10)
    ys = generate(model, x0, 11, config=GenerationConfig(chunk_size=chunk_size, block_size=block_size, unroll=unroll))
    assert relative_error(ys, step_loop(model, x0, 11)) < 1e-5


def test_bfloat16_generation_feeds_back_bfloat16():
    model = LRU_ENTRY.build(seed=6)
    x0 = jnp.asarray(inputs(2, seed=11)[0], jnp.bfloat16)
    ys = generate(model, x0, 5, config=SMALL)
    chex.assert_type(ys, jnp.bfloat16)
    assert relative_error(ys.astype(jnp.float32), step_loop(model, x0, 5).astype(np.float32)) < 1e-2


def test_capture_graph_describes_its_program():
    model = LRU_ENTRY.build()
    graph = capture_graph(model, 4, H=H, config=SMALL)
    assert (graph.batch_size, graph.event_mode, graph.d_model, graph.dtype) == (4, False, H, jnp.float32)
    assert isinstance(graph.compiled, jax.stages.Compiled)
    assert graph.compile_time_s > 0
    assert "batch_size=4" in repr(graph)
    platform_unroll = 1 if jax.default_backend() == "cpu" else generation.ACCELERATOR_UNROLL
    assert capture_graph(model, 4).spec.config.unroll == platform_unroll  # unroll=None resolves per platform


def test_build_program_is_the_dispatch_point(monkeypatch):
    """capture_graph compiles what build_program returns for the spec."""
    built = []
    original = generation.build_program

    def probe(spec):
        built.append(spec)
        return original(spec)

    monkeypatch.setattr(generation, "build_program", probe)
    model = LRU_ENTRY.build(seed=7)
    graph = capture_graph(model, 2, config=GenerationConfig(chunk_size=4, block_size=2, unroll=1), kernel_config=NEVER)
    assert len(built) == 1 and not built[0].fused
    assert built[0].batch_size == 2 and built[0].d_model == H
    x0, _ = inputs(2, seed=12)
    assert relative_error(generate(model, x0, 5, graph_cache=graph), step_loop(model, x0, 5)) < 1e-5


def test_errors_say_how_to_fix():
    model = LRU_ENTRY.build()
    graph = capture_graph(model, 4, config=SMALL)
    x4, _ = inputs(4, seed=0)
    fix = "Batch size 8 != captured 4. Re-capture with capture_graph(model, batch_size=8)."
    with pytest.raises(ValueError, match=re.escape(fix)):
        generate(model, np.concatenate([x4, x4]), 3, graph_cache=graph)
    with pytest.raises(ValueError, match=rf"x must have shape \(B, H\) with H={H}, got shape \(4, 1, {H}\)"):
        generate(model, x4[:, None], 3, graph_cache=graph)
    with pytest.raises(ValueError, match=rf"x must have shape \(B, H\) with H={H}, got shape \(4, {H + 1}\)"):
        generate(model, np.zeros((4, H + 1), np.float32), 3)
    for bad in (0, -2, 2.5):
        with pytest.raises(ValueError, match=f"num_steps must be a positive integer, got {bad}"):
            generate(model, x4, bad, graph_cache=graph)
    with pytest.raises(ValueError, match="captured without event_mode.*event_mode=True"):
        generate(model, x4, 3, graph_cache=graph, integration_timesteps=np.ones((4, 1), np.float32))
    with pytest.raises(ValueError, match="LRU has no event mode"):
        generate(model, x4, 3, integration_timesteps=np.ones((4, 1), np.float32))
    with pytest.raises(ValueError, match="LRU has no event mode"):
        capture_graph(model, 4, event_mode=True)
    with pytest.raises(ValueError, match=f"H=7 disagrees with the model's d_model={H}"):
        capture_graph(model, 4, H=7)
    with pytest.raises(ValueError, match="x has dtype bfloat16 but the generator was captured for float32"):
        generate(model, jnp.asarray(x4, jnp.bfloat16), 3, graph_cache=graph)
    other = type(model)(d_model=H, d_state=7, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="another structure or parameter shapes.*re-capture"):
        generate(other, x4, 3, graph_cache=graph)
    with pytest.raises(ValueError, match="block_size must be a power of two, got 3"):
        GenerationConfig(chunk_size=7, block_size=3)
    for name in ("chunk_size", "block_size", "unroll"):
        with pytest.raises(ValueError, match=f"{name} must be a positive integer, got 0"):
            GenerationConfig(**{name: 0})
    with pytest.raises(ValueError, match="config and kernel_config apply only without graph_cache"):
        generate(model, x4, 3, graph_cache=graph, config=SMALL)
    with pytest.raises(TypeError, match="config must be a GenerationConfig or None, got dict"):
        generate(model, x4, 3, config={"chunk_size": 4})
    with pytest.raises(TypeError, match="config must be a pallas_kernels.KernelConfig or None, got str"):
        generate(model, x4, 3, kernel_config="always")


def test_compiler_options_reach_xla_and_are_checked():
    model = LRU_ENTRY.build()
    config = GenerationConfig(chunk_size=4, block_size=2, unroll=1, compiler_options={"xla_backend_optimization_level": 0})
    assert config.compiler_options == (("xla_backend_optimization_level", 0),) and hash(config) == hash(
        GenerationConfig(chunk_size=4, block_size=2, unroll=1, compiler_options=config.compiler_options))
    x0, _ = inputs(2, seed=11)
    ys = generate(model, x0, 5, config=config)
    np.testing.assert_allclose(np.asarray(ys), np.asarray(generate(model, x0, 5, config=SMALL)), rtol=1e-6, atol=1e-6)
    with pytest.raises(Exception, match="No such compile option: 'xla_no_such_option'"):
        capture_graph(model, 2, config=GenerationConfig(chunk_size=4, compiler_options={"xla_no_such_option": 1}))
    with pytest.raises(TypeError, match="compiler_options must be a mapping .* got list"):
        GenerationConfig(compiler_options=["xla_gpu_autotune_level"])
    with pytest.raises(TypeError, match="option names \\(str\\) to bool, int, float or str values, got 'a': \\[1\\]"):
        GenerationConfig(compiler_options={"a": [1]})


def test_unroll_default_follows_the_platform_and_the_cells_policy(monkeypatch):
    assert GenerationConfig().resolved(2).unroll == 1  # CPU: unrolling only lengthens compilation
    assert GenerationConfig(unroll=3).resolved(2).unroll == 3
    monkeypatch.setattr(generation.jax, "default_backend", lambda: "gpu")
    assert GenerationConfig().resolved().unroll == generation.ACCELERATOR_UNROLL == 8
    s7 = next(e for e in ZOO if e.name == "S7-J2").build()
    for model, unroll in ((s7, 2), (LRU_ENTRY.build(), 8)):  # S7's policy: a long step compiles faster at unroll 2
        spec = generation._model_spec(*generation.flatten_model(model), 2, jnp.float32, False, 1, None,
                                      KernelConfig(use_kernels="never"))
        assert spec.config.unroll == unroll


def test_event_mode_errors():
    model = EVENT_ENTRY.build()
    graph = capture_graph(model, 2, event_mode=True, config=SMALL)
    x0, tau = inputs(2, seed=0, event=True, num_steps=5)
    with pytest.raises(ValueError, match="captured with event_mode=True: pass integration_timesteps"):
        generate(model, x0, 5, graph_cache=graph)
    expected = r"must have shape \(B, 1\) or \(B, num_steps\) = \(2, 1\) or \(2, 5\), got \(2, 3\)"
    with pytest.raises(ValueError, match=expected):
        generate(model, x0, 5, graph_cache=graph, integration_timesteps=tau[:, :3])
    with pytest.raises(ValueError, match="integration_timesteps must be > 0"):
        generate(model, x0, 5, graph_cache=graph, integration_timesteps=-tau)
    with pytest.raises(ValueError, match="integration_timesteps must be finite"):
        generate(model, x0, 5, graph_cache=graph, integration_timesteps=tau * np.nan)


def _zoo(name):
    return next(e for e in ZOO if e.name == name)


def _fused(model, batch, event=False, kernel_config=None):
    from pallas_kernels import fused_generation

    return fused_generation.use_fused_rollout(model, batch, event, jnp.float32, kernel_config)


@pytest.mark.parametrize("name", ["LRU", "ltv.S5-bilinear-conj-event"])
def test_the_kernel_switch_selects_the_fused_program(name):
    """``use_kernels="always"`` runs the fused Pallas kernel (interpret mode here), "never" the XLA program."""
    from pallas_kernels import KernelConfig, dispatch

    entry = _zoo(name)
    model = entry.build(seed=3)
    x0, tau = inputs(2, 3, event=entry.event)
    never, always = KernelConfig(use_kernels="never"), KernelConfig(use_kernels="always")
    graph = capture_graph(model, 2, event_mode=entry.event, kernel_config=never)
    assert not graph.spec.fused
    reference = generate(model, x0, 20, graph_cache=graph, integration_timesteps=tau)
    graph = capture_graph(model, 2, event_mode=entry.event, kernel_config=always)
    assert graph.spec.fused
    fused = generate(model, x0, 20, graph_cache=graph, integration_timesteps=tau)
    assert relative_error(generate(model, x0, 20, integration_timesteps=tau, kernel_config=always), reference) < 1e-5
    assert relative_error(fused, reference) < 1e-5
    # "auto": the fused kernel on an NVIDIA GPU, the XLA program elsewhere
    assert _fused(model, 2, entry.event) == dispatch.on_nvidia_gpu()


def test_fused_fallbacks_keep_the_xla_program(monkeypatch):
    """Models the fused kernels do not take, or where their cells declare them measured slower, keep the XLA program."""
    from pallas_kernels import KernelConfig, dispatch

    monkeypatch.setattr(dispatch, "_WARNED", set())  # the fallback warning is issued once per reason and process
    s7 = _zoo("S7-J1").build(d_model=256, d_state=64)  # 2 H^2 N projection weights: too large for one program
    with pytest.warns(RuntimeWarning, match="does not support S7: parameters too large"):
        assert not _fused(s7, 2, kernel_config=KernelConfig(use_kernels="always"))
    monkeypatch.setattr(dispatch, "on_nvidia_gpu", lambda: True)  # "auto" as on an NVIDIA GPU
    assert _fused(_zoo("LRU").build(), 2)
    # measured faster up to 512 rows (split over programs per row, then per block of rows, on an H200)
    assert _fused(_zoo("Mamba").build(), 32) and _fused(_zoo("Mamba").build(), 512)
    assert not _fused(_zoo("Mamba").build(), 513)
    assert not _fused(_zoo("S5-zoh").build(), 4096)
    assert _fused(_zoo("S5-zoh").build(), 32)
    assert not _fused(_zoo("CentaurusDWS").build(), 4096)
    assert _fused(_zoo("CentaurusNeck").build(), 4096)


def test_generate_warns_once_when_the_closed_loop_diverges(monkeypatch):
    """A closed loop with gain 10 (the skip D) overflows float32 within 40 steps: generate warns, once."""
    monkeypatch.setattr(generation, "_NONFINITE_REPORTED", [])
    model = LRU_ENTRY.build(seed=3)
    x0 = np.random.default_rng(3).standard_normal((2, H)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a finite rollout warns nothing
        assert np.all(np.isfinite(np.asarray(generate(model, x0, 16))))
    model.D.set_value(jnp.full_like(model.D.get_value(), 10.0))
    with pytest.warns(RuntimeWarning, match="generate produced non-finite values"):
        generate(model, x0, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(model, x0, 64)  # shown once


@pytest.mark.parametrize("kernels", [NEVER, KernelConfig(use_kernels="always")], ids=["xla", "fused"])
def test_the_finiteness_flag_is_per_row_and_covers_only_the_steps_run(kernels):
    """The program's ``(B,)`` flag: a zero row of a gain-10 loop stays finite while a random row overflows; over
    3 steps both are finite, whatever the fused program leaves in the steps it did not run."""
    model = LRU_ENTRY.build(seed=5)
    model.D.set_value(jnp.full_like(model.D.get_value(), 10.0))
    graph = capture_graph(model, batch_size=2, config=GenerationConfig(chunk_size=64), kernel_config=kernels)
    assert graph.spec.fused == (kernels is not NEVER)
    x0 = np.zeros((2, H), np.float32)
    x0[1] = np.random.default_rng(5).standard_normal(H)
    leaves, cache = jax.tree.leaves(model), model.allocate_inference_cache(2)
    ys, _, _, all_finite = graph.compiled(leaves, jnp.asarray(x0), cache, None, np.int32(64))
    chex.assert_type(all_finite, bool)
    np.testing.assert_array_equal(all_finite, [True, False])
    np.testing.assert_array_equal(all_finite, np.all(np.isfinite(np.asarray(ys)), axis=(1, 2)))
    ys, _, _, all_finite = graph.compiled(leaves, jnp.asarray(x0), cache, None, np.int32(3))
    assert np.all(np.isfinite(np.asarray(ys[:, :3])))
    np.testing.assert_array_equal(all_finite, [True, True])


class _NotReadyFlag:
    """A device flag whose computation has not finished (``is_ready`` False) and that reads as one failing row."""

    def is_ready(self):
        return False

    def __array__(self, dtype=None, copy=None):
        return np.array([True, False])


def test_flags_not_ready_are_read_later_or_at_exit(monkeypatch):
    """On an accelerator ``generate`` does not wait for its flags: those not ready stay pending until a later call
    finds them ready, or until the exit check waits for them."""
    monkeypatch.setattr(generation, "_NONFINITE_REPORTED", [])
    monkeypatch.setattr(generation, "_PENDING_FINITE", generation.collections.deque())
    generation._PENDING_FINITE.append(jnp.asarray([True, True]))
    generation._PENDING_FINITE.append(_NotReadyFlag())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generation.report_ready_flags()  # the finite, ready flag is read; the other stays
    assert len(generation._PENDING_FINITE) == 1
    with pytest.warns(RuntimeWarning, match="generate produced non-finite values"):
        generation.report_ready_flags(wait=True)
    assert not generation._PENDING_FINITE
    generation.watch_finite([jnp.asarray([False])])  # already reported: nothing is kept
    assert not generation._PENDING_FINITE
