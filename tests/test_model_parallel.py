"""lrnnx_jax.parallel.model: the language model split over 2, 4 and 8 fake CPU devices, in one subprocess
(tests/model_parallel_checks.py; the device count is fixed when JAX starts, and the rest of the suite runs on one
device).

The subprocess asserts inside (the same greedy tokens as one device, every parameter's split and shard shape, the
compiled program's collectives, the kernels' refusal, a data x model mesh, the errors; see its docstring); here its
JSON report is read back. What needs no second device is tested in this process."""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import multi_device_reports
from lrnnx_jax import parallel
from lrnnx_jax.architectures import LRNNLMHeadModel
from lrnnx_jax.decoding import generate_tokens

CHECKS = pathlib.Path(__file__).with_name("model_parallel_checks.py")


@pytest.fixture(scope="module")
def report():
    return {r["entry"] + (f"@{r['devices']}" if "devices" in r else ""): r
            for r in multi_device_reports(CHECKS)[0]["results"]}


def test_hybrid_generates_the_same_tokens_split_over_2_4_8_devices(report):
    for n in (2, 4, 8):
        row = report[f"Mamba+Mamba2+attn@{n}"]
        assert row["logits_rel"] < 1e-5, row  # float32: the split programs sum in another order
        # a device holds its share of the split parameters and whole copies of the small rest (norms, convs, biases)
        assert 1 / n < row["param_bytes_per_device_fraction"] < 1 / n + 0.02, row
    assert report["S5+attn@8"]["logits_rel"] < 1e-5  # S5 replicated, attention and the MLPs split


def test_compiled_program_reduces_rows_and_moves_no_parameter_or_state(report):
    row = report["Mamba+Mamba2+attn@4"]
    assert row["loop_row_all_reduces"] >= 7, row  # embedding + 3 mixers' out_proj + 3 MLPs' fc2, per token
    assert row["collectives"]["all-reduce"] >= row["loop_row_all_reduces"], row


def test_kernels_refuse_and_data_x_model_mesh(report):
    assert report["kernel refusal@2"] and report["data x model@8"]


def test_errors_name_the_size_and_the_axis(report):
    messages = report["errors"]["messages"]
    assert [m.split(":")[0] for m in messages] == ["embedding", "layers[0].mixer (attn)", "layers[0].mixer (Mamba2)"]


# ---------------------------------------------------------------------------------- in this process (one device)


def small_lm(**overrides) -> LRNNLMHeadModel:
    kwargs = dict(d_model=16, d_state=4, n_layer=3, vocab_size=37, mixer_types=["Mamba", "Mamba2", "attn"],
                  d_intermediate=16, mixer_kwargs={"Mamba2": dict(headdim=4, chunk_size=4),
                                                   "attn": dict(num_heads=8, num_heads_kv=2, causal=True)})
    return LRNNLMHeadModel(**{**kwargs, **overrides}, rngs=nnx.Rngs(0))


def test_partition_spec_reads_the_rules_table():
    lm = small_lm()
    spec = lambda *path: parallel.partition_spec(lm, path, (1,) * 2)  # noqa: E731
    assert spec("embedding", "embedding") == P("model", None)
    assert spec("layers", 0, "mixer", "in_proj", "kernel") == P("model", None)  # the fused input rows
    assert spec("layers", 0, "mixer", "dt_proj", "kernel") == P(None, "model")  # d_inner columns
    assert spec("layers", 2, "mixer", "out_proj", "kernel") == P("model", None)  # the heads' rows
    assert spec("layers", 1, "mixer", "conv_weight") == P()  # Mamba-2's conv over [x | B | C]: replicated
    assert spec("layers", 1, "norm", "scale") == P() and spec("norm_f", "scale") == P()
    assert parallel.partition_spec(lm, ("layers", 0, "mixer", "A_log"), (32, 4), axis="tp") == P("tp", None)
    s5 = small_lm(n_layer=1, mixer_types=["S5"], mixer_kwargs={"S5": dict(discretization="zoh")})
    assert parallel.partition_spec(s5, ("layers", 0, "mixer", "B"), (4, 16)) == P()  # not in RULES: replicated


def test_check_divisible_names_what_does_not_split():
    lm = small_lm()
    parallel.model.check_divisible(lm, 8)  # d_model 16, vocabulary 40, d_inner 32, 8 heads, MLP width 128
    with pytest.raises(ValueError, match=r"padded_vocab_size=40 is not a multiple of the 16 devices of mesh axis 'model'"):
        parallel.model.check_divisible(lm, 16)
    with pytest.raises(ValueError, match=r"layers\[0\].mixer \(attn\): num_heads=6 .* 4 devices"):
        parallel.model.check_divisible(small_lm(n_layer=1, mixer_types=["attn"],
                                                mixer_kwargs={"attn": dict(num_heads=6, head_dim=4, causal=True)}), 4)


def test_shard_model_on_one_device_changes_nothing():
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 37, (2, 5)).astype(np.int32)
    reference = generate_tokens(small_lm(), prompt, 4)
    lm = parallel.shard_model(small_lm(), parallel.model_mesh(1))
    assert lm.model_parallel == parallel.ModelParallel(parallel.model_mesh(1), "model")
    np.testing.assert_array_equal(np.asarray(generate_tokens(lm, prompt, 4)), np.asarray(reference))
    with pytest.raises(ValueError, match="not 'tp'"):
        parallel.shard_model(small_lm(), parallel.model_mesh(1), axis="tp")
    with pytest.raises(TypeError, match="LRNNLMHeadModel"):
        parallel.shard_model(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), parallel.model_mesh(1))
    with pytest.raises(TypeError, match="Mesh"):
        parallel.shard_model(small_lm(), jax.devices())
