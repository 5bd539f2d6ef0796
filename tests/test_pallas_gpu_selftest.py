"""pallas_kernels.gpu_selftest: the script's comparison table runs (here in interpret mode)."""

from __future__ import annotations

import inspect
import io

import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels import gpu_selftest as selftest
from pallas_kernels import selective, simplified


def test_run_prints_a_passing_table():
    # same shapes and configuration as the first kernel cases of the op tests (compiled once)
    tiny = [("mamba batch 1", "selective", dict(batch=1, dim=37, dstate=5)),
            ("zoh batch 1", "simplified", dict(batch=1, P=5, H_in=6, conj_sym=True))]
    buffer = io.StringIO()
    config = dispatch.KernelConfig(use_kernels="always", block_elems=64)
    assert selftest.run(tiny, kernel_config=config, out=buffer, in_place_cases=())
    lines = buffer.getvalue().splitlines()
    assert "interpret=True" in lines[0]
    assert [line.split()[0] for line in lines[2:]] == ["selective", "simplified"]
    assert all(" PASS " in line for line in lines[2:])


def test_relative_error_and_tolerance():
    assert selftest.relative_error([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert abs(selftest.relative_error([1.0, 2.5], [1.0, 2.0]) - 0.25) < 1e-12
    kwargs = dict(state=jnp.zeros((1, 2), jnp.complex64), x=jnp.zeros((1, 2), jnp.bfloat16))
    assert selftest.tolerance(kwargs) == 1e-2


def test_cases_are_valid_calls_of_the_ops():
    """Every GPU case names an op, builder arguments it accepts and a discretization the op has (the
    RG-LRU and S7 modes of selective_state_update were removed: those models run their own cells)."""
    modules = {"selective": selective, "simplified": simplified}
    assert set(selftest.OPS) == set(selftest.BUILDERS) == set(modules)
    names = [name for name, _, _ in selftest.CASES]
    assert len(set(zip(names, [op for _, op, _ in selftest.CASES]))) == len(names)
    for name, op, spec in selftest.CASES + [(None, op, spec) for op, spec in selftest.IN_PLACE_CASES]:
        parameters = inspect.signature(selftest.BUILDERS[op]).parameters
        assert set(spec) <= set(parameters), name
        discretization = spec.get("discretization", parameters["discretization"].default)
        assert discretization in modules[op].DISCRETIZATIONS, name
    for op, module in modules.items():  # every discretization runs on the GPU
        default = inspect.signature(selftest.BUILDERS[op]).parameters["discretization"].default
        assert {spec.get("discretization", default) for _, o, spec in selftest.CASES if o == op} == set(module.DISCRETIZATIONS)
