"""``from_mamba_ssm(config, state_dict)``: mamba_ssm's ``MambaLMHeadModel`` checkpoints (Mamba-1, Mamba-2 and
attention layers, gated MLPs, tied and untied heads) against an independent float64 NumPy forward.

The state_dicts are built here by hand from the config, with mamba_ssm's names and torch shapes (read from
mamba_ssm's ``mixer_seq_simple.py``, ``mamba_simple.py``, ``mamba2.py``, ``mha.py``, ``mlp.py`` and ``block.py``),
and the reference takes its hyperparameters from the config with mamba_ssm's defaults: neither reads the
model under test. The mixers' float64 references are those of tests/test_mamba.py (Mamba-1 with the "mamba"
discretization), tests/test_mamba2.py and tests/test_language_model.py (MHA).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import relative_error
from lrnnx_jax.architectures import LRNNLMHeadModel
from lrnnx_jax.convert import from_mamba_ssm, mamba_ssm_lm_kwargs
from test_language_model import numpy_mha
from test_mamba import reference_mamba
from test_mamba2 import numpy_mamba2

#: mamba_ssm's constructor defaults (Mamba-1: mamba_simple.Mamba; Mamba-2: mamba2.Mamba2; MHA; MambaConfig)
MAMBA1_DEFAULTS = dict(d_state=16, d_conv=4, expand=2, dt_rank="auto", conv_bias=True, bias=False)
MAMBA2_DEFAULTS = dict(d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, D_has_hdim=False, rmsnorm=True,
                       norm_before_gate=False, dt_limit=(0.0, math.inf), bias=False, conv_bias=True)
MHA_DEFAULTS = dict(num_heads_kv=None, head_dim=None, mlp_dim=0, qkv_proj_bias=True, out_proj_bias=True, causal=False,
                    rotary_emb_dim=0, rotary_emb_interleaved=False, d_conv=0)
CONFIG_DEFAULTS = dict(d_intermediate=0, ssm_cfg={}, attn_layer_idx=[], attn_cfg={}, rms_norm=True,
                       pad_vocab_size_multiple=8, tie_embeddings=True)

D_MODEL, VOCAB = 8, 37
CONFIGS = {
    # Mamba-1 at mamba_ssm's defaults (d_state 16, d_conv 4, dt_rank ceil(8 / 16) = 1), the config.json of the
    # published Mamba-1 checkpoints (no d_intermediate, attention or tie_embeddings fields)
    "mamba1-tied": dict(d_model=D_MODEL, n_layer=3, vocab_size=VOCAB, ssm_cfg={}, rms_norm=True, residual_in_fp32=True,
                        fused_add_norm=True, pad_vocab_size_multiple=8),
    "mamba2-untied-layernorm": dict(
        d_model=D_MODEL, n_layer=2, vocab_size=VOCAB, tie_embeddings=False, rms_norm=False, pad_vocab_size_multiple=16,
        ssm_cfg=dict(layer="Mamba2", d_state=6, headdim=4, ngroups=2, d_conv=3, chunk_size=4, bias=True)),
    "hybrid-mamba1-attn-mlp-untied": dict(
        d_model=D_MODEL, n_layer=4, vocab_size=VOCAB, d_intermediate=20, tie_embeddings=False,
        ssm_cfg=dict(d_state=4, expand=1.5, dt_rank=3, bias=True, conv_bias=False), attn_layer_idx=[1, 3],
        attn_cfg=dict(num_heads=4, num_heads_kv=2, rotary_emb_dim=2, causal=True, out_proj_bias=False, d_conv=4)),
    "hybrid-mamba2-attn-mlp-tied": dict(
        d_model=D_MODEL, n_layer=3, vocab_size=VOCAB, d_intermediate=16,
        ssm_cfg=dict(layer="Mamba2", d_state=4, headdim=4, norm_before_gate=True, D_has_hdim=True),
        attn_layer_idx=[0], attn_cfg=dict(num_heads=2, head_dim=4, rotary_emb_dim=4, rotary_emb_interleaved=True,
                                          mlp_dim=40, qkv_proj_bias=False)),  # non-causal: MHA's default
}


def resolved(config):
    """The config with mamba_ssm's defaults filled in, and each mixer's hyperparameters."""
    config = {**CONFIG_DEFAULTS, **config}
    ssm = dict(config["ssm_cfg"])
    layer = ssm.pop("layer", "Mamba1")
    ssm = {**(MAMBA1_DEFAULTS if layer == "Mamba1" else MAMBA2_DEFAULTS), **ssm}
    ssm["d_inner"] = int(ssm["expand"] * config["d_model"])
    if layer == "Mamba1":
        ssm["dt_rank"] = math.ceil(config["d_model"] / 16) if ssm["dt_rank"] == "auto" else ssm["dt_rank"]
    else:
        ssm["nheads"] = ssm["d_inner"] // ssm["headdim"]
    attn = {**MHA_DEFAULTS, **config["attn_cfg"]}
    if attn_layers := config["attn_layer_idx"]:
        attn["num_heads_kv"] = attn["num_heads_kv"] or attn["num_heads"]
        attn["head_dim"] = attn["head_dim"] or config["d_model"] // attn["num_heads"]
        attn["mlp_dim"] = math.ceil(attn["mlp_dim"] / 256) * 256
    pad = config["pad_vocab_size_multiple"]
    return config, layer, types.SimpleNamespace(**ssm), types.SimpleNamespace(**attn), set(attn_layers), \
        math.ceil(config["vocab_size"] / pad) * pad


def mamba_ssm_state_dict(config, seed):
    """A random ``MambaLMHeadModel`` state_dict (names and torch shapes) for ``config``, with realistic steps
    (softplus(dt bias) in [0.05, 1]) and decays (-A in [0.5, 4]), so that the recurrences matter within a few tokens."""
    config, layer, ssm, attn, attn_layers, vocab = resolved(config)
    rng = np.random.default_rng(seed)
    H = config["d_model"]

    def weight(*shape):
        return rng.standard_normal(shape) / math.sqrt(shape[-1])

    def vector(n, scale=0.3, offset=0.0):
        return offset + scale * rng.standard_normal(n)

    def inv_softplus(n, lo, hi):
        return np.log(np.expm1(rng.uniform(lo, hi, n)))

    def norm(name):
        entries = {f"{name}.weight": vector(H, 0.2, 1.0)}
        if not config["rms_norm"]:
            entries[f"{name}.bias"] = vector(H, 0.1)
        return entries

    sd = {"backbone.embedding.weight": 0.05 * rng.standard_normal((vocab, H))}  # small: the norms' eps matters
    for i in range(config["n_layer"]):
        p = f"backbone.layers.{i}."
        sd.update(norm(p + "norm"))
        if i in attn_layers:
            qkv = attn.head_dim * (attn.num_heads + 2 * attn.num_heads_kv)
            m = {"in_proj.weight": weight(qkv + attn.mlp_dim, H),
                 "out_proj.weight": weight(H, attn.num_heads * attn.head_dim + attn.mlp_dim // 2)}
            if attn.qkv_proj_bias:
                m["in_proj.bias"] = vector(qkv + attn.mlp_dim)
            if attn.out_proj_bias:
                m["out_proj.bias"] = vector(H)
            if attn.d_conv:
                m["conv1d.weight"], m["conv1d.bias"] = weight(qkv, 1, attn.d_conv), vector(qkv)
        elif layer == "Mamba1":
            D, N, R, K = ssm.d_inner, ssm.d_state, ssm.dt_rank, ssm.d_conv
            m = {"in_proj.weight": weight(2 * D, H), "conv1d.weight": weight(D, 1, K), "x_proj.weight": weight(R + 2 * N, D),
                 "dt_proj.weight": weight(D, R), "dt_proj.bias": inv_softplus(D, 0.05, 1.0),
                 "A_log": np.log(rng.uniform(0.5, 4.0, (D, N))), "D": vector(D, 1.0), "out_proj.weight": weight(H, D)}
            if ssm.conv_bias:
                m["conv1d.bias"] = vector(D)
            if ssm.bias:
                m["in_proj.bias"], m["out_proj.bias"] = vector(2 * D), vector(H)
        else:
            D, G, N, nh, K = ssm.d_inner, ssm.ngroups, ssm.d_state, ssm.nheads, ssm.d_conv
            conv_dim = D + 2 * G * N
            m = {"in_proj.weight": weight(2 * D + 2 * G * N + nh, H), "conv1d.weight": weight(conv_dim, 1, K),
                 "dt_bias": inv_softplus(nh, 0.05, 1.0), "A_log": np.log(rng.uniform(0.5, 4.0, nh)),
                 "D": vector(D if ssm.D_has_hdim else nh, 1.0), "out_proj.weight": weight(H, D)}
            if ssm.conv_bias:
                m["conv1d.bias"] = vector(conv_dim)
            if ssm.rmsnorm:
                m["norm.weight"] = vector(D, 0.2, 1.0)
            if ssm.bias:
                m["in_proj.bias"], m["out_proj.bias"] = vector(2 * D + 2 * G * N + nh), vector(H)
        sd.update({p + "mixer." + k: v for k, v in m.items()})
        if config["d_intermediate"] > 0:
            hidden = (config["d_intermediate"] + 127) // 128 * 128
            sd.update(norm(p + "norm2"))
            sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc2.weight"] = weight(2 * hidden, H), weight(H, hidden)
    sd.update(norm("backbone.norm_f"))
    sd["lm_head.weight"] = sd["backbone.embedding.weight"] if config["tie_embeddings"] else weight(vocab, H)
    return {k: np.asarray(v, np.float32) for k, v in sd.items()}


def numpy_lm(config, sd, ids):
    """MambaLMHeadModel's forward in float64: embedding; per block add -> norm -> mixer (-> add -> norm2 -> gated
    MLP); add -> norm_f -> lm_head. ``ids (B, L)`` -> ``logits (B, L, padded vocab)``."""
    config, layer, ssm, attn, attn_layers, _ = resolved(config)
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    eps = 1e-5

    def norm(x, name):
        if config["rms_norm"]:
            return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * sd[f"{name}.weight"]
        centred = x - x.mean(-1, keepdims=True)
        return centred / np.sqrt(np.mean(centred**2, -1, keepdims=True) + eps) * sd[f"{name}.weight"] + sd[f"{name}.bias"]

    hidden, residual = sd["backbone.embedding.weight"][ids], None
    for i in range(config["n_layer"]):
        p = f"backbone.layers.{i}."
        residual = hidden if residual is None else hidden + residual
        x = norm(residual, p + "norm")
        m = {k[len(p + "mixer."):]: v for k, v in sd.items() if k.startswith(p + "mixer.")}
        if i in attn_layers:
            zeros = np.zeros
            hidden = numpy_mha(x, m["in_proj.weight"], m.get("in_proj.bias", zeros(m["in_proj.weight"].shape[0])),
                               m["out_proj.weight"], m.get("out_proj.bias", zeros(m["out_proj.weight"].shape[0])),
                               attn.num_heads, attn.num_heads_kv, attn.head_dim, attn.rotary_emb_dim,
                               attn.rotary_emb_interleaved, attn.mlp_dim, attn.causal, m.get("conv1d.weight"),
                               m.get("conv1d.bias"))
        elif layer == "Mamba1":
            hidden = reference_mamba(m, x, None, "mamba")[0]  # exp(delta A), delta B u, D skip, SiLU(z) gate
        else:
            hidden = numpy_mamba2(m, ssm, x)[0]
        if config["d_intermediate"] > 0:
            residual = hidden + residual
            a, gate = np.split(norm(residual, p + "norm2") @ sd[p + "mlp.fc1.weight"].T, 2, axis=-1)
            hidden = (a * gate / (1 + np.exp(-gate))) @ sd[p + "mlp.fc2.weight"].T
    head = sd["backbone.embedding.weight" if config["tie_embeddings"] else "lm_head.weight"]
    return norm(hidden + residual, "backbone.norm_f") @ head.T


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_float64_numpy(name):
    config = CONFIGS[name]
    sd = mamba_ssm_state_dict(config, seed=len(name))
    if name == "mamba1-tied":
        del sd["lm_head.weight"]  # a tied checkpoint may hold it (as torch's state_dict does) or not
    model = from_mamba_ssm(config, sd)
    assert isinstance(model, LRNNLMHeadModel)
    ids = np.random.default_rng(1).integers(0, VOCAB, (2, 11))
    with jax.default_matmul_precision("highest"):  # float32 products on every backend (not TF32)
        logits = model(jnp.asarray(ids, jnp.int32))
    expected = numpy_lm(config, sd, ids)
    chex.assert_shape(logits, expected.shape)
    # float32 against float64: rounding of ~6e-8 per operation, grown over up to 4 layers, 11 recurrence steps and
    # the norms, measured at 4e-7..6e-7 here; 1e-5 leaves a 15x margin (the fixture contract is 1e-4), and any
    # wrong name, layout or default gives an O(1) error.
    assert relative_error(logits, expected) < 1e-5


def test_layers_mixer_kwargs_and_sources():
    """The layer types and mixer arguments follow create_block, with mamba_ssm's d_state defaults (16 for Mamba-1,
    128 for Mamba-2) and its other Mamba-1 defaults."""
    kwargs = mamba_ssm_lm_kwargs(CONFIGS["hybrid-mamba1-attn-mlp-untied"])
    assert kwargs["mixer_types"] == ["Mamba", "attn", "Mamba", "attn"]
    assert kwargs["mixer_kwargs"]["Mamba"]["d_state"] == 4 and "layer" not in kwargs["mixer_kwargs"]["Mamba"]
    assert mamba_ssm_lm_kwargs({"n_layer": 1, "ssm_cfg": {}})["mixer_kwargs"] == {"Mamba": {"d_state": 16}}
    assert mamba_ssm_lm_kwargs({"n_layer": 1, "ssm_cfg": {"layer": "Mamba2"}})["mixer_kwargs"] == {"Mamba2": {"d_state": 128}}
    model = from_mamba_ssm(CONFIGS["mamba1-tied"], mamba_ssm_state_dict(CONFIGS["mamba1-tied"], 0))
    mixer = model.layers[0].mixer
    assert (mixer.d_state, mixer.d_conv, mixer.dt_rank, mixer.d_inner, mixer.discretization) == (16, 4, 1, 16, "mamba")
    assert model.padded_vocab_size == 40 and model.tie_embeddings and model.config["residual_in_fp32"]


def test_config_from_json_path_and_dataclass(tmp_path):
    """The config read from a config.json (its path or its directory) or a MambaConfig-like dataclass."""
    config = CONFIGS["mamba2-untied-layernorm"]
    sd = mamba_ssm_state_dict(config, 3)
    (tmp_path / "config.json").write_text(json.dumps({**config, "fused_add_norm": True}))
    fields = {k: dataclasses.field(default_factory=lambda v=v: v) for k, v in config.items()}
    MambaConfig = dataclasses.make_dataclass("MambaConfig", [(k, object, f) for k, f in fields.items()])
    ids = jnp.asarray(np.random.default_rng(2).integers(0, VOCAB, (1, 5)), jnp.int32)
    expected = np.asarray(from_mamba_ssm(config, sd)(ids))
    for source in (tmp_path, tmp_path / "config.json", str(tmp_path / "config.json"), MambaConfig()):
        np.testing.assert_array_equal(np.asarray(from_mamba_ssm(source, sd)(ids)), expected)


def test_single_mamba1_layer():
    """``from_mamba_ssm("Mamba", kwargs, state_dict)``: one mamba_ssm Mamba-1 layer (no dtA_proj)."""
    config = {"d_model": D_MODEL, "n_layer": 1, "vocab_size": VOCAB, "ssm_cfg": {"d_state": 4, "bias": True}}
    sd = mamba_ssm_state_dict(config, 4)
    layer = {k[len("backbone.layers.0.mixer."):]: v for k, v in sd.items() if k.startswith("backbone.layers.0.mixer.")}
    assert not any(k.startswith("dtA_proj") for k in layer)
    model = from_mamba_ssm("Mamba", dict(d_model=D_MODEL, d_state=4, bias=True), layer)
    x = np.random.default_rng(5).standard_normal((2, 9, D_MODEL)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        y = model(jnp.asarray(x))
    assert relative_error(y, reference_mamba(layer, x, None, "mamba")[0]) < 1e-5  # float32 rounding: measured 3e-7


# ---------------------------------------------------------------------------------- errors


def test_errors_name_every_problem():
    config = CONFIGS["hybrid-mamba1-attn-mlp-untied"]
    sd = mamba_ssm_state_dict(config, 6)
    broken = {k: v for k, v in sd.items() if k not in ("backbone.layers.2.mixer.A_log", "lm_head.weight")}
    broken["backbone.layers.0.mixer.dtA_proj.bias"] = np.zeros(12, np.float32)  # lrnnx's name, not mamba_ssm's
    broken["backbone.layers.1.mixer.in_proj.weight"] = sd["backbone.layers.1.mixer.in_proj.weight"][:, :4]
    with pytest.raises(ValueError) as info:
        from_mamba_ssm(config, broken)
    message = str(info.value)
    assert "missing entries ['backbone.layers.2.mixer.A_log', 'lm_head.weight']" in message
    assert "unexpected entries ['backbone.layers.0.mixer.dtA_proj.bias']" in message
    assert "backbone.layers.1.mixer.in_proj.weight: expected (16, 8), got (16, 4)" in message


@pytest.mark.parametrize("change,message", [
    (dict(ssm_cfg={"layer": "Mamba3"}), r"ssm_cfg layer 'Mamba3' is not supported; expected one of \['Mamba1', 'Mamba2'\]"),
    (dict(attn_layer_idx=[1], attn_cfg={"causal": True}), r"attn_cfg must give num_heads for the attention layers \[1\]"),
    (dict(attn_layer_idx=[3], attn_cfg={"num_heads": 2}), r"attn_layer_idx \[3\] are not layer indices in \[0, n_layer=3\)"),
    (dict(norm_epsilon=1e-6), r"unknown MambaConfig fields \['norm_epsilon'\]"),
])
def test_bad_configs_are_refused(change, message):
    config = {**CONFIGS["mamba1-tied"], **change}
    with pytest.raises(ValueError, match=message):
        from_mamba_ssm(config, {})


def test_tied_config_with_an_untied_head_is_refused():
    config = CONFIGS["mamba1-tied"]
    sd = mamba_ssm_state_dict(config, 7)
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    with pytest.raises(ValueError, match="lm_head.weight differs from backbone.embedding.weight"):
        from_mamba_ssm(config, sd)
    with pytest.raises(TypeError, match=r"takes \(config, state_dict\) or \(model_name, kwargs, state_dict\)"):
        from_mamba_ssm(config)
