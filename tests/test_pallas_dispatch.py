"""pallas_kernels.dispatch: the configuration, the switch, and that each op takes the chosen path."""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import re
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType

from pallas_kernels import dispatch
from pallas_kernels import selective
from pallas_kernels import simplified
from pallas_kernels.gpu_selftest import selective_case, simplified_case


@pytest.fixture(autouse=True)
def _restore_default():
    previous = dispatch.get_config()
    dispatch._WARNED.clear()
    yield
    dispatch.set_config(previous)


@pytest.mark.parametrize("field,value", [
    ("use_kernels", "sometimes"),
    ("interpret", "yes"),
    ("num_warps", 3),
    ("num_warps", 0),
    ("block_elems", 0),
    ("block_elems", 48),
    ("block_elems", 64.0),
    ("block_batch", 3),
    ("block_batch", 0),
    ("block_batch", True),
    ("precision", "tf32"),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be .*got {re.escape(repr(value))}$"):
        dispatch.KernelConfig(**{field: value})
    with pytest.raises(ValueError, match=f"^{field} must be"):  # and through set_config, which keeps the default
        dispatch.set_config(**{field: value})
    assert dispatch.get_config() == dispatch.KernelConfig()


def test_config_values_and_resolve():
    config = dispatch.KernelConfig(use_kernels="never", interpret=True, num_warps=8, block_elems=256, block_batch=32,
                                   precision="ieee")
    assert hash(config) == hash(dataclasses.replace(config))  # a static (hashable) argument
    assert dispatch.resolve(config) is config
    assert dispatch.resolve(None) is dispatch.get_config()
    with pytest.raises(TypeError, match="config must be a pallas_kernels.KernelConfig or None, got dict"):
        dispatch.resolve({"use_kernels": "never"})
    with pytest.raises(TypeError):
        dispatch.KernelConfig(backend="triton")  # the field was removed
    assert dispatch.compiler_params(dispatch.KernelConfig()).num_warps == 4  # None: the kernel default
    assert dispatch.compiler_params(dispatch.KernelConfig(), num_warps=16).num_warps == 16
    assert dispatch.compiler_params(config, num_warps=16).num_warps == 8
    assert dispatch.dot_precision(config) == jax.lax.Precision.HIGHEST  # interpret mode
    for precision, algorithm in dispatch.GPU_PRECISION.items():
        assert dispatch.dot_precision(dispatch.KernelConfig(interpret=False, precision=precision)) == algorithm


def test_set_config_and_the_context_manager():
    previous = dispatch.set_config(use_kernels="never", num_warps=2)
    assert previous == dispatch.KernelConfig()
    assert dispatch.get_config() == dispatch.KernelConfig(use_kernels="never", num_warps=2)
    with dispatch.kernel_config(dispatch.KernelConfig(precision="fast"), block_batch=16) as config:
        assert dispatch.get_config() is config
        assert config == dispatch.KernelConfig(precision="fast", block_batch=16)  # a given config replaces the default
    assert dispatch.get_config() == dispatch.KernelConfig(use_kernels="never", num_warps=2)
    with pytest.raises(RuntimeError), dispatch.kernel_config(use_kernels="always"):
        raise RuntimeError  # restored on errors too
    assert dispatch.get_config().use_kernels == "never"


def test_changing_the_default_neither_retraces_nor_clears_caches():
    traces = []
    double = jax.jit(lambda v: (traces.append(1), 2 * v)[1])
    double(jnp.ones(2))
    arrays = selective_case(np.random.default_rng(0), batch=2, dim=4, dstate=3)
    selective.selective_state_update(**arrays)  # the reference, compiled under the default
    compiled = selective._step._cache_size()
    dispatch.set_config(use_kernels="never", num_warps=8)
    double(jnp.ones(2))
    with dispatch.kernel_config(use_kernels="auto", precision="fast"):
        double(jnp.ones(2))
        selective.selective_state_update(**arrays)  # the same reference program: not compiled again
    dispatch.set_config(dispatch.KernelConfig())
    double(jnp.ones(2))
    assert len(traces) == 1  # an unrelated jitted function is traced once
    assert double._cache_size() == 1
    assert selective._step._cache_size() == compiled


def test_importing_pallas_kernels_loads_nothing_of_lrnnx_jax():
    code = "import pallas_kernels, sys; print([m for m in sys.modules if m.startswith('lrnnx_jax')])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=pathlib.Path(__file__).resolve().parents[1], env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_choose_kernel(monkeypatch):
    assert not dispatch.on_nvidia_gpu()  # CI has no GPU
    assert not dispatch.choose_kernel("op", None, dispatch.KernelConfig())
    assert not dispatch.choose_kernel("op", None, dispatch.KernelConfig(use_kernels="never"))
    assert dispatch.choose_kernel("op", None, dispatch.KernelConfig(use_kernels="always"))
    with pytest.warns(RuntimeWarning, match="op: using the pure-JAX reference, the kernel does not support odd shapes"):
        assert not dispatch.choose_kernel("op", "odd shapes", dispatch.KernelConfig(use_kernels="always"))
    monkeypatch.setattr(dispatch, "on_nvidia_gpu", lambda: True)
    assert dispatch.choose_kernel("op", None, dispatch.KernelConfig())
    assert not dispatch.choose_kernel("op", None, dispatch.KernelConfig(use_kernels="never"))
    assert dispatch.interpret_mode(dispatch.KernelConfig()) is False
    assert dispatch.interpret_mode(dispatch.KernelConfig(interpret=True)) is True


SLOTS = dispatch.SLOTS_SPLIT_REASON


@pytest.mark.parametrize("mesh, batch, split_reason, axis, reason", [
    (AbstractMesh((4,), ("data",)), 8, None, "data", None),
    (AbstractMesh((4,), ("data",)), 6, None, "data", "a batch of 6 rows over a mesh of 4 devices"),
    (AbstractMesh((4,), ("data",)), None, SLOTS, "data", "state_batch_indices"),
    (AbstractMesh((4, 1), ("data", "model")), 8, None, "data", None),
    (AbstractMesh((2, 2), ("data", "model")), 8, None, None, "not all on one 'data' axis"),
    (AbstractMesh((4,), ("sequence",)), 8, None, None, "not all on one 'data' axis"),
    (AbstractMesh((4,), ("data",), axis_types=(AxisType.Manual,)), 8, None, None, "inside a shard_map"),
    (AbstractMesh((1,), ("data",)), None, SLOTS, None, None),  # one device: nothing to split
])
def test_kernels_per_shard_by_mesh(mesh, batch, split_reason, axis, reason):
    """Under which meshes a kernel runs per shard (``data_axis``) or is refused with a reason (abstract meshes: the
    rule reads only the mesh of the trace; tests/parallel_checks.py runs the kernels on 8 fake devices)."""
    assert dispatch.sharded_reason(batch, split_reason) is None  # no mesh
    with jax.sharding.use_abstract_mesh(mesh), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dispatch.data_axis() == axis
        got = dispatch.sharded_reason(batch, split_reason)
        chosen = dispatch.choose_kernel(f"op on {mesh}, {batch}", None, dispatch.KernelConfig(use_kernels="always"),
                                        batch=batch, split_reason=split_reason)
    if reason is None:
        assert got is None and chosen and not caught, (got, caught)
    else:
        assert reason in got and not chosen, got
        assert [str(w.message) for w in caught] == [f"op on {mesh}, {batch}: using the pure-JAX reference, the kernel "
                                                    f"does not support {got}"]


def _uses_kernel(op, kwargs, **config) -> bool:
    """Whether tracing the op emits a ``pallas_call``."""
    return "pallas_call" in str(jax.make_jaxpr(lambda kw: op(**kw, **config))(kwargs))


def _split_static(kwargs):
    static = {k: v for k, v in kwargs.items() if isinstance(v, (str, bool)) or v is None}
    return {k: v for k, v in kwargs.items() if k not in static}, static


@pytest.mark.parametrize("module,builder", [(selective, selective_case), (simplified, simplified_case)],
                         ids=["selective", "simplified"])
def test_each_op_takes_the_chosen_path(module, builder):
    arrays, static = _split_static(builder(np.random.default_rng(0), batch=2))
    op = functools.partial(getattr(module, module.OP), **static)
    assert not _uses_kernel(op, arrays)  # "auto" off-GPU: the reference
    assert _uses_kernel(op, arrays, config=dispatch.KernelConfig(use_kernels="always"))
    with dispatch.kernel_config(use_kernels="always"):
        assert _uses_kernel(op, arrays)
    assert not _uses_kernel(op, arrays, config=dispatch.KernelConfig(use_kernels="never"))


def test_unsupported_arguments_fall_back_to_the_reference():
    always = dict(config=dispatch.KernelConfig(use_kernels="always"))
    with jax.enable_x64(True):
        arrays, static = _split_static(selective_case(np.random.default_rng(1), batch=2, dim=8, dstate=4))
        arrays = {k: v.astype(jnp.float64) for k, v in arrays.items()}
        op = functools.partial(selective.selective_state_update, **static)
        with pytest.warns(RuntimeWarning, match="state of dtype float64"):
            assert not _uses_kernel(op, arrays, **always)
    big = simplified.CHUNK * 4
    arrays, static = _split_static(simplified_case(np.random.default_rng(2), batch=2, P=big + 1, H_in=big))
    op = functools.partial(simplified.simplified_state_update, **static)
    with pytest.warns(RuntimeWarning, match="chunk pairs"):
        assert not _uses_kernel(op, arrays, **always)


def test_selective_keeps_its_own_measured_policy_on_a_gpu(monkeypatch):
    """``"auto"`` on an NVIDIA GPU: the selective kernel at batch 1 or with state slots, else the reference
    (``selective.slower_than_reference``); the simplified kernel wherever it supports the arguments."""
    monkeypatch.setattr(dispatch, "on_nvidia_gpu", lambda: True)
    op = selective.selective_state_update
    for batch, extra_slots, kernel in ((1, 0, True), (2, 0, False), (2, 1, True)):
        arrays, static = _split_static(selective_case(np.random.default_rng(3), batch=batch, dim=4, dstate=3,
                                                      extra_slots=extra_slots))
        assert _uses_kernel(functools.partial(op, **static), arrays) == kernel, (batch, extra_slots)
    assert "batch 2 without state_batch_indices" in selective.slower_than_reference(2, None)
    arrays, static = _split_static(simplified_case(np.random.default_rng(4), batch=2, P=4, H_in=3))
    assert _uses_kernel(functools.partial(simplified.simplified_state_update, **static), arrays)
