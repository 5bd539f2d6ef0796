"""Model-parallel checks on fake CPU devices, run in a subprocess by tests/test_model_parallel.py.

The device count is fixed when JAX starts, so this script sets ``--xla_force_host_platform_device_count`` (with
the CPU flags of conftest.py) before importing JAX. It builds a small hybrid language model (Mamba, Mamba-2,
grouped-query attention, gated MLPs) and one with a replicated mixer (S5), splits them over meshes of 2, 4 and 8
devices (``parallel.shard_model``) and checks, against the same model on one device:

* every parameter's ``PartitionSpec`` and per-device shard shape (against a table written here, not the rules);
* ``generate_tokens``: the same greedy tokens, the logits within float32 reassociation; the forward's caches split;
* the compiled generation program (``parallel.collectives``): the row-parallel all-reduces of each layer inside the
  decode loop, no collective that carries a split parameter or a split state (KV cache, SSM states), whole or in
  its per-device part, and every all-gather an activation (batch first);
* a Pallas kernel forced under the model mesh refuses (``pallas_kernels.dispatch.sharded_reason``);
* a data x model mesh (the batch over one axis, the parameters over the other);
* the errors: sizes that do not split evenly.

Prints one JSON line of results; any failed check raises.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

# parallel_checks sets XLA_FLAGS (8 fake CPU devices, fast CPU compilation) before it imports JAX
from parallel_checks import NUM_DEVICES  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from lrnnx_jax import parallel  # noqa: E402
from lrnnx_jax.architectures import LRNNLMHeadModel  # noqa: E402
from lrnnx_jax.decoding import CapturedModel, Sampler, bucket, decode_program, generate_tokens  # noqa: E402
from pallas_kernels import KernelConfig, dispatch  # noqa: E402

#: the batch, and sizes no parameter's leading dimension equals (a collective of a batch-first array is an
#: activation); d_state 5 and the KV cache's 8 + 8 + 1 = 17 positions make the states' shapes recognisable
BATCH, PROMPT, NEW = 3, 6, 7
D_MODEL, VOCAB = 16, 37  # padded to 40: splits over 2, 4 and 8
MIXER_KWARGS = {
    "Mamba": dict(d_conv=4, dt_min=0.05, dt_max=0.5),  # d_inner 32
    "Mamba2": dict(d_state=4, headdim=4, d_conv=3, chunk_size=4, dt_min=0.05, dt_max=0.5),  # 8 heads, conv 40
    "attn": dict(num_heads=8, num_heads_kv=4, causal=True, rotary_emb_dim=2),  # kv heads split over 2 and 4, not 8
    "S5": dict(discretization="zoh"),
}
HYBRID = ["Mamba", "Mamba2", "attn"]
#: float32: the split programs sum the same products in another order (a few ulps of the logits)
LOGITS_RTOL = 1e-5


def build(mixer_types, seed=0) -> LRNNLMHeadModel:
    lm = LRNNLMHeadModel(d_model=D_MODEL, d_state=5, n_layer=len(mixer_types), vocab_size=VOCAB,
                         mixer_types=list(mixer_types), d_intermediate=16,
                         mixer_kwargs={k: MIXER_KWARGS[k] for k in set(mixer_types)}, rngs=nnx.Rngs(seed))
    lm.eval()
    return lm


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def expected_splits(lm) -> dict[str, int]:
    """``{parameter path: the dimension split over the model axis}``, written out by hand (the rest replicated)."""
    out = {"embedding.embedding": 0}
    for i, name in enumerate(lm.mixer_types):
        prefix = f"layers.{i}.mixer."
        if name == "Mamba":
            out.update({prefix + k: d for k, d in [("in_proj.kernel", 0), ("conv_weight", 0), ("conv_bias", 0),
                        ("x_proj.kernel", 0), ("dt_proj.kernel", 1), ("dt_proj.bias", 0), ("dtA_proj.kernel", 1),
                        ("dtA_proj.bias", 0), ("A_log", 0), ("D", 0), ("out_proj.kernel", 0)]})
        elif name == "Mamba2":
            out.update({prefix + k: 0 for k in ["in_proj.kernel", "dt_bias", "A_log", "D", "norm_weight",
                                                "out_proj.kernel"]})
        elif name == "attn":
            out.update({prefix + "in_proj.kernel": 0, prefix + "out_proj.kernel": 0})
        out.update({f"layers.{i}.mlp.fc1.kernel": 0, f"layers.{i}.mlp.fc2.kernel": 0})
    return out


def check_parameters(lm, reference, mesh) -> dict:
    """Each parameter: its spec and per-device shard shape as the table says, its value unchanged."""
    n, splits = mesh.size, expected_splits(lm)
    flat = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(lm, nnx.Param))}
    ref = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(reference, nnx.Param))}
    assert set(splits) <= set(flat), sorted(set(splits) - set(flat))
    per_device = total = 0
    for path, value in flat.items():
        dim = splits.get(path)
        spec = P() if dim is None else P(*([None] * dim), "model", *([None] * (value.ndim - dim - 1)))
        assert is_split(value, spec), (path, value.sharding.spec, spec)
        shard = list(value.shape)
        if dim is not None:
            shard[dim] //= n
        assert {tuple(s.data.shape) for s in value.addressable_shards} == {tuple(shard)}, (path, shard)
        assert len(value.addressable_shards) == n
        assert np.array_equal(np.asarray(value), np.asarray(ref[path])), path
        per_device += int(np.prod(shard)) * value.dtype.itemsize
        total += value.nbytes
    return {"param_bytes_per_device_fraction": round(per_device / total, 3), "split_params": len(splits)}


def split_state_shapes(lm, cache, n) -> tuple[set, set]:
    """The global and per-device shapes of the cache arrays the model keeps split."""
    whole, parts = set(), set()
    for i, name in enumerate(lm.mixer_types):
        keys = {"Mamba": ("conv_state", "lrnn_state"), "Mamba2": ("lrnn_state",), "attn": ("k", "v")}.get(name, ())
        for key in keys:
            leaf = cache[i][key]
            spec = leaf.sharding.spec
            if "model" not in spec:
                continue
            whole.add(tuple(leaf.shape))
            parts.add(tuple(s // n if a == "model" else s for s, a in zip(leaf.shape, tuple(spec) + (None,) * leaf.ndim)))
    return whole, parts


def check_cache_split(lm, cache, n):
    """The forward's caches (prefill) come out split: SSM states over channels/heads, the KV cache over kv heads."""
    for i, name in enumerate(lm.mixer_types):
        c = cache[i]
        if name == "Mamba":
            assert is_split(c["lrnn_state"], P(None, "model", None)), c["lrnn_state"].sharding
            assert is_split(c["conv_state"], P(None, "model", None)), c["conv_state"].sharding
        elif name == "Mamba2":
            assert is_split(c["lrnn_state"], P(None, "model", None, None)), c["lrnn_state"].sharding
        elif name == "attn":
            kv = P(None, None, "model", None) if lm.layers[i].mixer.num_heads_kv % n == 0 else P()
            assert is_split(c["k"], kv) and is_split(c["v"], kv), (n, c["k"].sharding)


def is_split(array, spec) -> bool:
    return array.sharding.is_equivalent_to(NamedSharding(array.sharding.mesh, spec), array.ndim)


def check_program(lm, mesh, prompt, lengths) -> dict:
    """The compiled generation program: what crosses devices (see the module docstring)."""
    n = mesh.size
    prompt_size, out_size = bucket(PROMPT), bucket(NEW)
    padded = np.zeros((BATCH, prompt_size), np.int32)
    padded[:, :PROMPT] = prompt
    text = decode_program.lower(
        lm, None, padded, lengths, np.int32(NEW), np.float32(1), np.int32(1), np.float32(1),
        np.int32(-1), jax.random.key(0), out_size=out_size, sampler=Sampler(True, False, False), num_drafts=0,
        ngram_size=1, return_logits=False, config=dispatch.resolve(None)).compile().as_text()
    found = parallel.collectives(text)
    in_loop = [c for c in found if "/while/body/" in c.line]
    _, cache = lm(jnp.asarray(prompt), return_cache=True, max_seqlen=prompt_size + out_size + 1)
    check_cache_split(lm, cache, n)
    state_whole, state_parts = split_state_shapes(lm, cache, n)
    params = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(lm, nnx.Param))]
    assert BATCH not in {p.shape[0] for p in params if p.ndim}, "a parameter's leading dimension equals the batch"
    split = [p for p in params if not p.sharding.is_fully_replicated]
    param_shapes = {tuple(p.shape) for p in split} | {tuple(s.data.shape) for p in split for s in p.addressable_shards}
    for c in found:
        for shape in c.shapes:
            assert shape not in param_shapes, f"a split parameter crosses devices:\n{c.line[:300]}"
            assert shape not in state_whole, f"a split state is gathered whole:\n{c.line[:300]}"
        if c.op == "all-gather":
            assert all(s and s[0] == BATCH for s in c.shapes), f"an all-gather of a non-activation:\n{c.line[:300]}"
    for c in in_loop:
        assert not set(c.shapes) & state_parts, f"a split state crosses devices in the decode loop:\n{c.line[:300]}"
    # the row-parallel reductions of each token: the embedding lookup, each mixer's out_proj and each MLP's fc2
    row_reductions = sum(shape[:1] == (BATCH,) and shape[-1:] == (D_MODEL,) and np.prod(shape) == BATCH * D_MODEL
                         for c in in_loop if c.op == "all-reduce" for shape in c.shapes)  # (B, d_model) or (B, 1, d_model)
    expected = 1 + lm.n_layer + sum(b.mlp is not None for b in lm.layers)
    assert row_reductions >= expected, (row_reductions, expected, parallel.describe(in_loop))
    ops = {}
    for c in found:
        ops[c.op] = ops.get(c.op, 0) + 1
    return {"loop_row_all_reduces": int(row_reductions), "collectives": ops,
            "loop_collectives": len(in_loop)}


def check_generation(mixer_types, n, program: bool) -> dict:
    rng = np.random.default_rng(n)
    prompt = rng.integers(0, VOCAB, (BATCH, PROMPT)).astype(np.int32)
    lengths = rng.integers(2, PROMPT + 1, BATCH).astype(np.int32)
    reference = build(mixer_types)
    one, one_logits = generate_tokens(reference, prompt, NEW, prompt_lengths=lengths, return_logits=True)
    mesh = parallel.model_mesh(n)
    lm = parallel.shard_model(build(mixer_types), mesh)
    result = {"entry": "+".join(mixer_types), "devices": n, **check_parameters(lm, reference, mesh)}
    many, many_logits = generate_tokens(lm, prompt, NEW, prompt_lengths=lengths, return_logits=True)
    assert np.array_equal(np.asarray(many), np.asarray(one)), (np.asarray(many), np.asarray(one))
    captured = generate_tokens(CapturedModel(lm), prompt, NEW, prompt_lengths=lengths)  # the split parameters, read
    assert np.array_equal(np.asarray(captured), np.asarray(one)), (np.asarray(captured), np.asarray(one))
    result["logits_rel"] = rel(many_logits, one_logits)
    assert result["logits_rel"] < LOGITS_RTOL, result
    if program:
        result.update(check_program(lm, mesh, prompt, lengths))
    return result


def check_kernel_refusal() -> dict:
    """A kernel forced with ``use_kernels="always"`` on a split model: refused under its mesh, the XLA step runs."""
    lm = parallel.shard_model(build(HYBRID), parallel.model_mesh(2))
    ids = np.random.default_rng(5).integers(0, VOCAB, BATCH).astype(np.int32)
    cache = lm.allocate_inference_cache(BATCH, 4)
    reference, _ = lm.step(ids, cache, kernel_config=KernelConfig(use_kernels="never"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits, _ = lm.step(ids, cache, kernel_config=KernelConfig(use_kernels="always"))
    assert any("mesh of 2 devices" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert np.array_equal(np.asarray(logits), np.asarray(reference))
    return {"entry": "kernel refusal", "devices": 2}


def check_data_and_model() -> dict:
    """A 2 x 4 mesh: the prompt's rows over ``data``, the parameters over ``model``; the same tokens."""
    batch = 4
    prompt = np.random.default_rng(6).integers(0, VOCAB, (batch, PROMPT)).astype(np.int32)
    one = generate_tokens(build(HYBRID), prompt, NEW)
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("data", "model"))
    lm = parallel.shard_model(build(HYBRID), mesh)
    many = generate_tokens(lm, parallel.shard_batch(prompt, mesh, "data"), NEW)
    assert many.sharding.is_equivalent_to(parallel.batch_sharding(mesh, "data"), 2), many.sharding
    assert np.array_equal(np.asarray(many), np.asarray(one))
    other = parallel.data_mesh(2)
    try:
        generate_tokens(lm, parallel.shard_batch(prompt, other), NEW)
    except ValueError as error:
        assert "one mesh" in str(error), error
    else:
        raise AssertionError("a prompt split over another mesh than the model's was accepted")
    return {"entry": "data x model", "devices": mesh.size}


def check_errors() -> dict:
    """Sizes that do not split evenly: a ValueError naming the size, the device count and the axis; nothing moved."""
    def lm_with(mixer, **kwargs):
        return LRNNLMHeadModel(d_model=D_MODEL, d_state=5, n_layer=1, vocab_size=VOCAB, mixer_types=[mixer],
                               mixer_kwargs={mixer: {**MIXER_KWARGS[mixer], **kwargs}}, rngs=nnx.Rngs(0))

    cases = [(build(HYBRID), 3, "padded_vocab_size=40"),
             (lm_with("attn", num_heads=6, num_heads_kv=6, head_dim=4), 4, "num_heads=6"),
             (lm_with("Mamba2", headdim=8), 8, "nheads=4")]
    messages = []
    for lm, n, expected in cases:
        try:
            parallel.shard_model(lm, parallel.model_mesh(n))
        except ValueError as error:
            messages.append(str(error))
            assert expected in str(error) and f"{n} devices" in str(error) and "'model'" in str(error), error
        else:
            raise AssertionError(f"{expected} over {n} devices: no error")
        assert lm.model_parallel is None
        assert all(len(v.get_value().sharding.device_set) == 1 for _, v in nnx.to_flat_state(nnx.state(lm))), \
            "parameters were moved before the error"
    return {"entry": "errors", "messages": messages}


def main():
    assert len(jax.devices()) == NUM_DEVICES, jax.devices()
    start, results = time.perf_counter(), []
    for n in (2, 4, 8):
        results.append(check_generation(HYBRID, n, program=n == 4))
        results[-1]["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    results.append(check_generation(["S5", "attn"], 8, program=False))
    results.append(check_kernel_refusal())
    results.append(check_data_and_model())
    results.append(check_errors())
    print(json.dumps({"results": results, "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
