"""pallas_kernels.dispatch: the configuration, the switch, and that each op takes the chosen path."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


@pytest.mark.parametrize("changes,message", [
    (dict(use_kernels="sometimes"), "use_kernels must be one of"),
    (dict(backend="mosaic"), "backend must be one of"),
    (dict(num_warps=3), "num_warps must be a power of two"),
    (dict(block_elems=0), "block_elems must be a power of two"),
    (dict(block_batch=8), "block_batch must be 1 or a power of two >= 16"),
    (dict(interpret="yes"), "interpret must be None, True or False"),
])
def test_config_rejects_bad_values(changes, message):
    with pytest.raises(ValueError, match=message):
        dispatch.KernelConfig(**changes)


def test_kernel_config_context_restores_and_retraces():
    traces = []
    double = jax.jit(lambda v: (traces.append(dispatch.get_config().use_kernels), 2 * v)[1])
    double(jnp.ones(2))
    with dispatch.kernel_config(use_kernels="never") as config:
        assert config.use_kernels == "never" and dispatch.get_config() is config
        double(jnp.ones(2))
    assert dispatch.get_config().use_kernels == "auto"
    double(jnp.ones(2))
    assert traces == ["auto", "never", "auto"]  # the switch reaches functions compiled before it changed


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
