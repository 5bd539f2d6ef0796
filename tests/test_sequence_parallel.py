"""lrnnx_jax.parallel.sequence: sequence parallelism over 2, 4 and 8 fake CPU devices, in two subprocesses that share
the zoo (tests/sequence_parallel_checks.py; the device count is fixed when JAX starts, and the rest of the suite runs
on one device; two processes use both cores of a small machine: about 50 s of CPU each, most of it compiling
the 50 programs and building the zoo).

The subprocesses assert inside (every zoo entry: outputs, final caches and gradients equal one device's, and the
compiled programs move no array with a length axis; see its docstring); here their JSON reports are read back. The
argument checks, which need no second device, run in this process."""

from __future__ import annotations

import pathlib
import re

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import multi_device_reports
from lrnnx_jax import parallel
from lrnnx_jax.models.lti.lru import LRU
from lrnnx_jax.models.lti.s4d import S4D
from lrnnx_jax.models.ltv.mamba import Mamba
from zoo import ZOO

CHECKS = pathlib.Path(__file__).with_name("sequence_parallel_checks.py")
PARTS = 2
#: as in the checks: 7 positions per device, L = 7 n
SHARD_LENGTH = 7
#: float32 (the checks' tolerance): the composed state differs from one sequential scan by a few ulps
RTOL = 1e-5


@pytest.fixture(scope="module")
def report():
    reports = multi_device_reports(CHECKS, *(["--part", f"{k}/{PARTS}"] for k in range(PARTS)))
    return {r["entry"]: r for report in reports for r in report["results"]}


def test_every_zoo_entry_matches_one_device(report):
    assert set(report) >= {e.name for e in ZOO}
    assert {report[e.name]["devices"] for e in ZOO} == {2, 4, 8}
    for e in ZOO:
        row = report[e.name]
        assert row["event"] == e.event, row
        for key in ("y_rel", "cache_rel", "grad_params_rel", "grad_x_rel"):
            assert row[key] < RTOL, (key, row)
    assert sum("no_lengths_rel" in report[e.name] for e in ZOO) == 1
    assert all(report[e.name]["no_lengths_rel"] < RTOL for e in ZOO if "no_lengths_rel" in report[e.name])


def test_only_summaries_and_the_halo_cross_devices(report):
    """No collective of a compiled forward-and-gradient program has a length axis (``7 n`` or 7, a dimension of
    nothing else); the entering states travel along the chain of devices as ``(B, ...)`` cache entries, no
    transition and nothing else is gathered, and a model with a conv window sends its ``(B, K, H)`` halo."""
    for e in ZOO:
        row = report[e.name]
        n = row["devices"]
        shapes = {op: [] for op in parallel.COLLECTIVES}
        for text in row["collectives"]:
            op, dims = re.fullmatch(r"(\S+) \[(.*)\]", text).groups()
            shapes[op].append(tuple(int(d) for d in dims.split(",") if d.strip()))
        assert not any(SHARD_LENGTH in s or n * SHARD_LENGTH in s for found in shapes.values() for s in found), row
        permutes = shapes["collective-permute"]
        assert not shapes["all-gather"] and not shapes["all-to-all"], row
        halo = None if row["halo"] is None else tuple(row["halo"])
        assert (halo in permutes) == (halo is not None), row
        batch = permutes[0][0]  # every permuted array is a batch of cache entries (or the halo)
        assert all(s[0] == batch for s in permutes), row
    assert {report[e.name]["halo"][1] for e in ZOO if report[e.name]["halo"]} == {2, 3, 4}  # Mamba, Mamba2, RG-LRU


def test_errors_that_need_several_devices(report):
    messages = report["errors"]["messages"]
    expected = "cannot be split along its length (axis 1) over the 8 devices of mesh axis 'seq': the length must be a multiple of 8"
    assert messages["indivisible"] == messages["indivisible placement"] == f"an array of shape (3, 57, 6) {expected} " \
        "(pad the sequence; lengths= masks the padding)"
    assert messages["short shards"] == ("Mamba's cache keeps the last 4 tokens (a causal conv's history), which must come "
                                        "from one neighbouring device: each device needs at least 4 positions, got L=24 "
                                        "over 8 devices (3 each)")


# ---------------------------------------------------------------------------------------------- argument checks

@pytest.fixture(scope="module")
def mesh():
    return parallel.data_mesh(1, axis="seq")


def x_of(length, d_model=6):
    return np.random.default_rng(0).normal(size=(2, length, d_model)).astype(np.float32)


def sequence_parallel(model, x, mesh, **kwargs):
    return parallel.sequence_parallel(model, x, mesh=mesh, axis=kwargs.pop("axis", "seq"), **kwargs)


def test_bad_arguments_raise_clear_errors(mesh):
    lru = LRU(d_model=6, d_state=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"axis must name an axis of the mesh, one of \('seq',\), got 'data'"):
        sequence_parallel(lru, x_of(8), mesh, axis="data")
    with pytest.raises(ValueError, match=r"x must have shape \(B, L, H\) with H=6, got rank 2"):
        sequence_parallel(lru, x_of(8)[0], mesh)
    with pytest.raises(ValueError, match=r"x must have shape \(B, L, H\) with H=6, got shape \(2, 8, 5\)"):
        sequence_parallel(lru, x_of(8, 5), mesh)
    with pytest.raises(TypeError, match="model must be an lrnnx_jax model .* got Linear"):
        sequence_parallel(nnx.Linear(6, 6, rngs=nnx.Rngs(0)), x_of(8), mesh)
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh, got str"):
        parallel.sequence_parallel(lru, x_of(8), mesh="seq", axis="seq")
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, L=8\], got min 0 and max 9"):
        sequence_parallel(lru, x_of(8), mesh, lengths=np.array([0, 9]))
    with pytest.raises(ValueError, match="LRU has no event mode"):
        sequence_parallel(lru, x_of(8), mesh, integration_timesteps=np.ones((2, 8), np.float32))
    with pytest.raises(ValueError, match=r"integration_timesteps must have shape \(2, 8\), got \(2, 7\)"):
        sequence_parallel(Mamba(d_model=6, rngs=nnx.Rngs(0)), x_of(8), mesh,
                          integration_timesteps=np.ones((2, 7), np.float32))
    with pytest.raises(ValueError, match=r"an array of shape \(4,\) cannot be split along its length"):
        parallel.shard_sequence(np.ones(4), mesh, "seq")


def test_models_that_cannot_be_split_say_why(mesh):
    s4d = S4D(d_model=6, d_state=4, dropout=0.5, transposed=False, rngs=nnx.Rngs(0))
    s4d.train()
    with pytest.raises(ValueError, match="S4D has active dropout.*model.eval()"):
        sequence_parallel(s4d, x_of(8), mesh)
    s4d.eval()  # the check runs when the program is traced, once per structure: the mode is part of it
    x = x_of(8)
    np.testing.assert_allclose(sequence_parallel(s4d, x, mesh), s4d(x), rtol=1e-5, atol=1e-6)
    s4d.train()
    with pytest.raises(ValueError, match="S4D has active dropout.*model.eval()"):
        sequence_parallel(s4d, x_of(8), mesh)

    class Undeclared(LRU):
        cache_carry = {}

    with pytest.raises(ValueError, match=r"Undeclared.cache_carry must give every cache entry one of \('diagonal', "
                                         r"'dense', 'window'\); entry 'lrnn_state' has None"):
        sequence_parallel(Undeclared(d_model=6, d_state=4, rngs=nnx.Rngs(0)), x_of(8), mesh)


def test_one_device_is_the_models_own_forward(mesh):
    """A mesh axis of one device runs the model's forward from the zero cache (no summaries), under a user's jit."""
    model = LRU(d_model=6, d_state=4, rngs=nnx.Rngs(0))
    x, lengths = x_of(8), np.array([8, 5], np.int32)
    y, cache = jax.jit(lambda x: sequence_parallel(model, x, mesh, lengths=lengths, return_cache=True))(x)
    y_one, cache_one = model(x, lengths=lengths, return_cache=True)
    np.testing.assert_allclose(y, y_one, rtol=1e-6, atol=1e-7)  # the same float32 program, scheduled apart
    np.testing.assert_allclose(cache["lrnn_state"], cache_one["lrnn_state"], rtol=1e-6, atol=1e-7)
    assert np.all(np.asarray(y)[1, 5:] == 0)
