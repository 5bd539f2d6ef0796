"""pallas_kernels.dispatch: the configuration, the switch, and that each op takes the chosen path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch
from pallas_kernels import selective_state_update as selective
from pallas_kernels import simplified_state_update as simplified
from pallas_kernels.gpu_selftest import selective_case, simplified_case


@pytest.fixture(autouse=True)
def _restore_default():
    previous = dispatch.get_config()
    yield
    dispatch.set_config(previous)


@pytest.mark.parametrize("changes,message", [
    (dict(use_kernels="sometimes"), "use_kernels must be one of"),
    (dict(backend="mosaic"), "backend must be one of"),
    (dict(num_warps=3), "num_warps must be a power of two"),
    (dict(block_elems=0), "block_elems must be a power of two"),
    (dict(block_batch=8), "block_batch must be a power of two >= 16"),
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


@pytest.mark.parametrize("module,builder", [(selective, selective_case), (simplified, simplified_case)],
                         ids=["selective", "simplified"])
def test_each_op_takes_the_chosen_path(monkeypatch, module, builder):
    calls = []

    def fake_kernel(*args, **kwargs):
        calls.append(kwargs["config"])
        return module.reference(*args, **{k: v for k, v in kwargs.items() if k != "config"})

    monkeypatch.setattr(module, "kernel", fake_kernel)
    op = getattr(module, module.OP)
    kwargs = builder(np.random.default_rng(0), batch=2)
    op(**kwargs)  # "auto" off-GPU: the reference
    assert calls == []
    always = dispatch.KernelConfig(use_kernels="always")
    op(**kwargs, config=always)
    assert calls == [always]
    with dispatch.kernel_config(use_kernels="always"):
        op(**kwargs)
    assert len(calls) == 2
    op(**kwargs, config=dispatch.KernelConfig(use_kernels="never"))
    assert len(calls) == 2


def test_unsupported_arguments_fall_back_to_the_reference(monkeypatch):
    monkeypatch.setattr(selective, "kernel", lambda *a, **k: pytest.fail("the kernel must not run"))
    monkeypatch.setattr(simplified, "kernel", lambda *a, **k: pytest.fail("the kernel must not run"))
    always = dispatch.KernelConfig(use_kernels="always")
    with jax.enable_x64(True):
        kwargs = selective_case(np.random.default_rng(1), batch=2, dim=8, dstate=4)
        kwargs = {k: v.astype(jnp.float64) if hasattr(v, "dtype") else v for k, v in kwargs.items()}
        with pytest.warns(RuntimeWarning, match="state of dtype float64"):
            out, _ = selective.selective_state_update(**kwargs, config=always)
        assert out.dtype == jnp.float64
    kwargs = simplified_case(np.random.default_rng(2), batch=2, P=4 * simplified.CHUNK + 1, H_in=4 * simplified.CHUNK)
    with pytest.warns(RuntimeWarning, match="chunk pairs"):
        simplified.simplified_state_update(**kwargs, config=always)
