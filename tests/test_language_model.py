"""LRNNLMHeadModel: parity with lrnnx's recorded logits, attention against float64 NumPy, and the
self-consistency of every path (forward, step, prefill, chunked prefill, ragged prompts, verify_step) for every
mixer type; checkpoints (lrnnx's state_dict, save/load) and clear errors."""

from __future__ import annotations

import json
import math
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import LM_FIXTURE_DIR, relative_error
from lrnnx_jax.architectures import MHA, LRNNLMHeadModel
from lrnnx_jax.convert import from_lrnnx

D = 8
VOCAB = 37

#: a small configuration of every mixer type (d_model = D)
MIXER_KWARGS = {
    "LRU": dict(r_min=0.4, r_max=0.95),
    "S4": dict(transposed=False, dt_min=0.01, dt_max=0.5),
    "S4D": dict(transposed=False, dt_min=0.01, dt_max=0.5),
    "S5": dict(discretization="zoh"),
    "Centaurus": dict(sub_state_dim=2, mode="neck"),
    "Mamba": dict(dt_min=0.05, dt_max=0.5, d_conv=3),
    "Mamba2": dict(headdim=4, d_conv=3, chunk_size=4, dt_min=0.05, dt_max=0.5),
    "RGLRU": dict(d_conv=2),
    "S7": dict(J=2),
    "attn": dict(num_heads=4, num_heads_kv=2, causal=True, rotary_emb_dim=2, d_conv=3),
}
STACKS = {name: [name, "attn"] if name != "attn" else ["attn", "LRU"] for name in MIXER_KWARGS}
STACK_IDS = pytest.mark.parametrize("mixer", list(STACKS))


def build(mixer_types, seed=0, d_intermediate=16, **overrides):
    kwargs = dict(d_model=D, d_state=4, n_layer=len(mixer_types), vocab_size=VOCAB, mixer_types=list(mixer_types),
                  d_intermediate=d_intermediate, mixer_kwargs={k: MIXER_KWARGS[k] for k in set(mixer_types) if k in MIXER_KWARGS})
    return LRNNLMHeadModel(**{**kwargs, **overrides}, rngs=nnx.Rngs(seed))


def random_ids(rng, *shape):
    return jnp.asarray(rng.integers(0, VOCAB, shape), jnp.int32)


def step_logits(model, ids, cache):
    """``model.step`` token by token: ``(logits (B, L, V), caches after each token)``."""
    logits, caches = [], []
    for t in range(ids.shape[1]):
        out, cache = model.step(ids[:, t], cache)
        logits.append(out)
        caches.append(cache)
    return jnp.stack(logits, 1), caches


# ---------------------------------------------------------------------------------- parity with lrnnx


@pytest.mark.parametrize("name", sorted(p.stem for p in LM_FIXTURE_DIR.glob("*.npz")) or ["<absent>"])
def test_forward_matches_lrnnx_logits(name):
    path = LM_FIXTURE_DIR / f"{name}.npz"
    if not path.exists():
        pytest.skip(f"lrnnx LM fixtures not found at {LM_FIXTURE_DIR} (../shared/fixtures is absent)")
    z = np.load(path)
    meta = json.loads(bytes(z["meta_json"]))
    state_dict = {k[len("param/"):]: z[k] for k in z.files if k.startswith("param/")}
    model = from_lrnnx(meta["model"], meta["kwargs"], state_dict)
    logits = model(z["input_ids"])
    chex.assert_shape(logits, z["logits_forward"].shape)
    chex.assert_type(logits, jnp.float32)
    assert relative_error(logits, z["logits_forward"]) < 1e-4  # the fixture contract (float32)


# ---------------------------------------------------------------------------------- attention vs float64 NumPy


def numpy_mha(x, w_in, b_in, w_out, b_out, heads, heads_kv, head_dim, rotary_dim, interleaved, mlp_dim, causal,
              conv_w=None, conv_b=None):
    """Independent float64 reference: torch-layout weights, the optional causal depthwise conv over q, k, v
    (``conv_w (qkv_dim, 1, K)``, ``conv_b``), rotary by explicit rotation matrices, GQA by repeating key/value
    heads, softmax attention."""
    x = x.astype(np.float64)
    B, L, _ = x.shape
    proj = x @ w_in.T + b_in
    qkv_dim = head_dim * (heads + 2 * heads_kv)
    if conv_w is not None:
        K = conv_w.shape[-1]
        padded = np.concatenate([np.zeros((B, K - 1, qkv_dim)), proj[..., :qkv_dim]], 1)
        conved = sum(padded[:, k : k + L] * conv_w[:, 0, k] for k in range(K)) + conv_b
        proj = np.concatenate([conved, proj[..., qkv_dim:]], -1)
    q = proj[..., : heads * head_dim].reshape(B, L, heads, head_dim)
    k = proj[..., heads * head_dim : (heads + heads_kv) * head_dim].reshape(B, L, heads_kv, head_dim)
    v = proj[..., (heads + heads_kv) * head_dim : qkv_dim].reshape(B, L, heads_kv, head_dim)

    def rotate(a):
        out = a.copy()
        for pos in range(L):
            for i in range(rotary_dim // 2):
                angle = pos * 10000.0 ** (-2 * i / rotary_dim)
                c, s = math.cos(angle), math.sin(angle)
                j, m = (2 * i, 2 * i + 1) if interleaved else (i, i + rotary_dim // 2)
                out[:, pos, :, j] = a[:, pos, :, j] * c - a[:, pos, :, m] * s
                out[:, pos, :, m] = a[:, pos, :, m] * c + a[:, pos, :, j] * s
        return out

    q, k = rotate(q), rotate(k)
    k = np.repeat(k, heads // heads_kv, axis=2)
    v = np.repeat(v, heads // heads_kv, axis=2)
    scores = np.einsum("bqhd,bshd->bhqs", q, k) / math.sqrt(head_dim)
    if causal:
        scores = np.where(np.tril(np.ones((L, L), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    context = np.einsum("bhqs,bshd->bqhd", weights, v).reshape(B, L, heads * head_dim)
    if mlp_dim:
        up, gate = proj[..., qkv_dim : qkv_dim + mlp_dim // 2], proj[..., qkv_dim + mlp_dim // 2 :]
        context = np.concatenate([context, up * gate / (1 + np.exp(-gate))], -1)
    return context @ w_out.T + b_out


@pytest.mark.parametrize("heads_kv,rotary,interleaved,mlp_dim,causal,d_conv", [
    (4, 0, False, 0, True, 0), (2, 4, False, 0, True, 3), (1, 6, True, 200, True, 0), (2, 4, False, 0, False, 0)])
def test_attention_matches_numpy_float64(heads_kv, rotary, interleaved, mlp_dim, causal, d_conv):
    rng = np.random.default_rng(3)
    mha = MHA(16, 4, heads_kv, head_dim=6, mlp_dim=mlp_dim, causal=causal, rotary_emb_dim=rotary,
              rotary_emb_interleaved=interleaved, d_conv=d_conv, rngs=nnx.Rngs(3))
    for linear in (mha.in_proj, mha.out_proj):  # nonzero biases
        linear.bias.set_value(jnp.asarray(rng.standard_normal(linear.bias.get_value().shape), jnp.float32))
    x = rng.standard_normal((2, 7, 16)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        y, _ = mha(jnp.asarray(x))
    params = [np.asarray(a, np.float64) for a in (mha.in_proj.kernel.get_value().T, mha.in_proj.bias.get_value(),
                                                   mha.out_proj.kernel.get_value().T, mha.out_proj.bias.get_value())]
    conv = {} if not d_conv else dict(conv_w=np.asarray(mha.conv_weight.get_value(), np.float64)[:, None, :],
                                      conv_b=np.asarray(mha.conv_bias.get_value(), np.float64))
    expected = numpy_mha(x, *params, 4, heads_kv, 6, rotary, interleaved, mha.mlp_dim, causal, **conv)
    assert mha.mlp_dim == (256 if mlp_dim else 0)
    assert relative_error(y, expected) < 2e-6  # float32 arithmetic over sums of ~20 terms


# ---------------------------------------------------------------------------------- self-consistency


@STACK_IDS
def test_step_prefill_and_chunked_prefill_equal_the_forward(mixer):
    """Token-by-token step, prefill then step, and the forward continued from a cache (chunked prefill, then
    again after decoding) all give the forward's logits."""
    model = build(STACKS[mixer], seed=1)
    rng = np.random.default_rng(1)
    ids = random_ids(rng, 2, 9)
    logits = model(ids)
    chex.assert_shape(logits, (2, 9, model.padded_vocab_size))
    stepped, _ = step_logits(model, ids, model.allocate_inference_cache(2, 9))
    assert relative_error(stepped, logits) < 1e-4
    prefill, cache = model(ids[:, :5], return_cache=True, max_seqlen=9)
    assert relative_error(prefill, logits[:, :5]) < 1e-5
    decoded, caches = step_logits(model, ids[:, 5:7], cache)
    assert relative_error(decoded, logits[:, 5:7]) < 1e-4
    resumed = model(ids[:, 7:], cache=caches[-1])  # the forward continues after decoding
    assert relative_error(resumed, logits[:, 7:]) < 1e-4
    first, cache = model(ids[:, :3], cache=model.allocate_inference_cache(2, 9), return_cache=True)
    second = model(ids[:, 3:], cache=cache)
    assert relative_error(jnp.concatenate([first, second], 1), logits) < 1e-4


@STACK_IDS
def test_verify_step_equals_step_over_the_accepted_tokens(mixer):
    """Four verify_step calls of 3 drafted tokens with random acceptance: each call's logits equal plain step
    from the state after exactly the accepted tokens of the earlier calls."""
    model = build(STACKS[mixer], seed=2)
    rng = np.random.default_rng(2)
    batch, T, calls = 2, 3, 4
    prompt = random_ids(rng, batch, 4)
    _, committed = model(prompt, return_cache=True, max_seqlen=4 + T * (calls + 1))
    cache, accepted = committed, None
    for call in range(calls):
        drafts = random_ids(rng, batch, T)
        logits, cache = model.verify_step(drafts, cache, accepted)
        chex.assert_shape(logits, (batch, T, model.padded_vocab_size))
        expected, caches = step_logits(model, drafts, committed)
        assert relative_error(logits, expected) < 1e-4, call
        accepted = jnp.asarray(rng.integers(0, T + 1, batch), jnp.int32)
        rows = [jax.tree.map(lambda a, b=b: a[b : b + 1], ([committed] + caches)[int(accepted[b])]) for b in range(batch)]
        committed = jax.tree.map(lambda *r: jnp.concatenate(r), *rows)


def test_ragged_prompts_prefill_each_row_as_if_alone():
    model = build(["Mamba", "attn", "S5"], seed=4)
    rng = np.random.default_rng(4)
    ids = random_ids(rng, 2, 6)
    lengths = jnp.asarray([6, 3], jnp.int32)
    _, cache = model(ids, lengths, return_cache=True, max_seqlen=8)
    nxt = random_ids(rng, 2)
    logits, _ = model.step(nxt, cache)
    for b in range(2):
        alone = jnp.concatenate([ids[b : b + 1, : int(lengths[b])], nxt[b : b + 1, None]], 1)
        assert relative_error(logits[b], model(alone)[0, -1]) < 1e-4, b


def test_residual_in_fp32_untied_head_layernorm_and_bfloat16_free_paths_agree():
    model = build(["RGLRU", "attn"], seed=5, tie_embeddings=False, rms_norm=False, residual_in_fp32=True)
    assert model.lm_head is not None
    ids = random_ids(np.random.default_rng(5), 2, 5)
    stepped, _ = step_logits(model, ids, model.allocate_inference_cache(2, 5))
    assert relative_error(stepped, model(ids)) < 1e-4


# ---------------------------------------------------------------------------------- structure, checkpoints


def test_structure_and_initialisation():
    model = build(["Mamba", "attn", "LRU"], seed=6, d_intermediate=20)
    assert model.padded_vocab_size == 40 and model.embedding.embedding.get_value().shape == (40, D)
    assert model.layers[0].mlp.hidden_features == 128  # rounded up to a multiple of 128
    assert abs(float(jnp.std(model.embedding.embedding.get_value())) - 0.02) < 0.004
    mixer = model.layers[0].mixer
    assert float(jnp.max(jnp.abs(mixer.in_proj.kernel.get_value()))) > 0
    out = model.layers[1].mixer.out_proj.kernel.get_value()  # U(+-1/sqrt(fan_in)) / sqrt(n_layer)
    bound = 1 / math.sqrt(out.shape[0]) / math.sqrt(3)
    assert float(jnp.max(jnp.abs(out))) <= bound and float(jnp.max(jnp.abs(out))) > 0.8 * bound
    assert not np.any(np.asarray(model.layers[1].mixer.in_proj.bias.get_value()))  # Linear biases zeroed
    assert np.any(np.asarray(mixer.dt_proj.bias.get_value()))  # ... except Mamba's dt bias (_no_reinit)


def test_lrnnx_state_dict_round_trip_and_save_pretrained(tmp_path):
    model = build(["S4D", "attn", "Mamba2"], seed=7, tie_embeddings=False)
    ids = random_ids(np.random.default_rng(7), 2, 6)
    expected = model(ids)
    model.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["mixer_types"] == ["S4D", "attn", "Mamba2"]
    loaded = LRNNLMHeadModel.from_pretrained(str(tmp_path))
    np.testing.assert_array_equal(np.asarray(loaded(ids)), np.asarray(expected))


def test_bad_input_is_refused_clearly():
    model = build(["LRU", "attn"])
    with pytest.raises(ValueError, match=r"mixer_types must be a list of n_layer=3 names"):
        build(["LRU", "attn"], n_layer=3)
    with pytest.raises(ValueError, match=r"unknown mixer type 'GRU'"):
        build(["GRU"])
    with pytest.raises(TypeError, match="input_ids must be integer token ids, got dtype float32"):
        model(jnp.zeros((2, 3), jnp.float32))
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 40\), got min 0 and max 40"):
        model(jnp.asarray([[0, 40]]))
    with pytest.raises(ValueError, match=r"ids must have shape \(B,\), got \(2, 1\)"):
        model.step(jnp.zeros((2, 1), jnp.int32), model.allocate_inference_cache(2, 4))
    cache = model.allocate_inference_cache(2, 2)
    _, cache = model(jnp.zeros((2, 2), jnp.int32), cache=cache, return_cache=True)
    with pytest.raises(ValueError, match=r"cache\[1\] \(attention\) has 0 free positions of 2, 1 are needed"):
        model.step(jnp.zeros((2,), jnp.int32), cache)
    noncausal = build(["LRU", "attn"], mixer_kwargs={"attn": dict(num_heads=2)})
    noncausal(jnp.zeros((1, 3), jnp.int32))  # the forward works; decoding is refused
    with pytest.raises(ValueError, match="causal=False"):
        noncausal.allocate_inference_cache(1, 4)
    with pytest.raises(ValueError, match=r"d_conv must be an integer >= 0, got -1"):
        MHA(8, 2, d_conv=-1, rngs=nnx.Rngs(0))


def test_decoding_refuses_active_dropout_and_checks_each_structure_once(monkeypatch):
    """A layer in training mode with active dropout cannot decode. The check walks the layers once per model
    structure (the mode is part of the treedef), so a decodable model's later calls walk nothing."""
    from lrnnx_jax.models.lti import S4

    model = build(["S4", "attn"], mixer_kwargs={"S4": {**MIXER_KWARGS["S4"], "dropout": 0.5},
                                                "attn": MIXER_KWARGS["attn"]})
    rng = np.random.default_rng(41)
    ids = random_ids(rng, 2)
    cache = model.allocate_inference_cache(2, 4)
    model.train()
    with pytest.raises(ValueError, match=r"step: layer S4 is in training mode with active dropout; call model\.eval\(\)"):
        model.step(ids, cache)
    model.eval()
    walks = []
    walk = S4.dropout_active
    monkeypatch.setattr(S4, "dropout_active", lambda self: walks.append(1) or walk(self))
    first, _ = model.step(ids, cache)  # the check walks, and so does the first trace of the step
    walked = len(walks)
    assert walked >= 1
    again, _ = model.step(ids, cache)
    assert len(walks) == walked  # the same structure again: no walk
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    model.train()
    with pytest.raises(ValueError, match="training mode with active dropout"):
        model.step(ids, cache)
    assert len(walks) == walked + 1  # a new structure: checked again, and refused
