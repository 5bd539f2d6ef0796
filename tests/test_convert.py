"""Parity with PyTorch lrnnx through its recorded fixtures, and checkpoint loading errors."""

from __future__ import annotations

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from conftest import fixture_names, load_fixture, relative_error
from lrnnx_jax.convert import from_lrnnx, load_lrnnx_state_dict, model_class
from lrnnx_jax.generation import generate

FIXTURES = fixture_names() or ["<../shared/fixtures absent>"]


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_parity(name):
    meta, arrays, state_dict = load_fixture(name)
    B, L, H = meta["B"], meta["L"], meta["H"]
    model = from_lrnnx(meta["model"], meta["kwargs"], state_dict)
    tau = arrays.get("integration_timesteps")
    x = arrays["x"]
    if getattr(model, "transposed", False):  # S4/S4D default layout (B, H, L)
        pytest.fail("fixtures use transposed=False")
    with jax.default_matmul_precision("highest"):
        if "forward" in meta["check"]:
            y = model(x, integration_timesteps=tau)
            chex.assert_shape(y, (B, L, H))
            assert relative_error(y, arrays["y_forward"]) < 1e-4
        if "step" in meta["check"]:
            cache = model.allocate_inference_cache(batch_size=B, max_seqlen=L)
            ys = []
            for t in range(L):
                y_t, cache = model.step(x[:, t], cache, integration_timesteps=None if tau is None else tau[:, t : t + 1])
                chex.assert_shape(y_t, (B, H))
                ys.append(y_t)
            assert relative_error(np.stack(ys, 1), arrays["y_step"]) < 1e-4
        if "generate" in meta["check"]:
            ys = generate(model, arrays["x0"], meta["num_steps"], integration_timesteps=None if tau is None else tau[:, :1])
            chex.assert_shape(ys, (B, meta["num_steps"], H))
            assert relative_error(ys, arrays["y_generate"]) < 1e-3


@pytest.mark.parametrize("name", FIXTURES[:1])
def test_state_dict_errors_name_the_entries(name):
    meta, _, state_dict = load_fixture(name)
    model = model_class(meta["model"])(**meta["kwargs"], rngs=nnx.Rngs(1))
    first = sorted(state_dict)[0]
    broken = dict(state_dict)
    del broken[first]
    broken["not_a_param"] = np.zeros(3)
    with pytest.raises(ValueError, match=rf"missing entries \['{first}'\].*unexpected entries \['not_a_param'\]"):
        load_lrnnx_state_dict(model, broken)
    reshaped = dict(state_dict)
    reshaped[first] = np.zeros(tuple(reshaped[first].shape) + (2,))
    with pytest.raises(ValueError, match=f"wrongly shaped entries.*{first}"):
        load_lrnnx_state_dict(model, reshaped)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown lrnnx model 'lti.Nope'.*lti.LRU"):
        from_lrnnx("lti.Nope", {}, {})
