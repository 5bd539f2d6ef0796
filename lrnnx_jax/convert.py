"""Load PyTorch checkpoints: lrnnx's (``from_lrnnx(model_name, kwargs, state_dict)``) and ``mamba_ssm``'s
(``from_mamba_ssm(config, state_dict)`` for a ``MambaLMHeadModel``, ``from_mamba_ssm("Mamba2", kwargs,
state_dict)`` for one layer).

torch is not needed: ``state_dict`` maps lrnnx's entry names to NumPy arrays
(``{k: v.numpy() for k, v in module.state_dict().items()}`` on the PyTorch side).
Each model declares its lrnnx layout in ``lrnnx_entries()`` (and its ``mamba_ssm`` layout in
``mamba_ssm_entries()``); this module checks the whole dict against it (missing, unexpected and wrongly
shaped entries are all reported at once) and then loads it.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import os
from typing import Any, Mapping

import numpy as np
from flax import nnx

#: lrnnx model names -> (module, class) of the lrnnx_jax implementation.
MODELS: dict[str, tuple[str, str]] = {
    "lti.LRU": ("lrnnx_jax.models.lti.lru", "LRU"),
    "lti.S5": ("lrnnx_jax.models.lti.s5", "S5"),
    "lti.S4": ("lrnnx_jax.models.lti.s4", "S4"),
    "lti.S4D": ("lrnnx_jax.models.lti.s4d", "S4D"),
    "lti.Centaurus": ("lrnnx_jax.models.lti.centaurus", "Centaurus"),
    "ltv.S5": ("lrnnx_jax.models.ltv.s5", "S5"),
    "ltv.Mamba": ("lrnnx_jax.models.ltv.mamba", "Mamba"),
    "ltv.RGLRU": ("lrnnx_jax.models.ltv.rglru", "RGLRU"),
    "ltv.S7": ("lrnnx_jax.models.ltv.s7", "S7"),
    "LRNNLMHeadModel": ("lrnnx_jax.architectures.language_model", "LRNNLMHeadModel"),
}


def model_class(model_name: str):
    """The lrnnx_jax class for an lrnnx name such as ``"lti.LRU"``."""
    if model_name not in MODELS:
        raise ValueError(f"unknown lrnnx model {model_name!r}; expected one of {sorted(MODELS)}")
    module, name = MODELS[model_name]
    return getattr(importlib.import_module(module), name)


def load_lrnnx_state_dict(model, state_dict: Mapping[str, Any]):
    """Load an lrnnx ``state_dict`` into an already built ``model`` (in place).

    Raises:
      ValueError: naming every missing, unexpected or wrongly shaped entry.
    """
    return load_entries(model, model.lrnnx_entries(), model.lrnnx_ignored_entries, state_dict)


def load_entries(model, entries, ignored, state_dict: Mapping[str, Any]):
    """Check ``state_dict`` against a layout (``name -> LrnnxEntry``; ``ignored`` names are accepted and
    skipped), reporting every missing, unexpected or wrongly shaped entry at once, then load it into ``model``."""
    ignored = set(ignored)
    arrays = {name: np.asarray(value) for name, value in state_dict.items()}
    missing = sorted(set(entries) - set(arrays))
    unexpected = sorted(set(arrays) - set(entries) - ignored)
    wrong = sorted(
        f"{name}: expected {entries[name].shape}, got {arrays[name].shape}"
        for name in set(entries) & set(arrays)
        if tuple(arrays[name].shape) != entries[name].shape
    )
    problems = []
    if missing:
        problems.append(f"missing entries {missing}")
    if unexpected:
        problems.append(f"unexpected entries {unexpected}")
    if wrong:
        problems.append("wrongly shaped entries [" + "; ".join(wrong) + "]")
    if problems:
        raise ValueError(f"state_dict does not fit {type(model).__name__}: " + ", ".join(problems))
    for name, entry in entries.items():
        entry.load(arrays[name])
    return model


def from_lrnnx(model_name: str, kwargs: Mapping[str, Any], state_dict: Mapping[str, Any], *, rngs: nnx.Rngs | None = None):
    """Build the lrnnx_jax twin of an lrnnx model and load its ``state_dict``.

    A model whose constructor reads an lrnnx argument differently (Centaurus honours
    ``discretization``, which lrnnx ignores) maps lrnnx's keyword arguments to its own
    with a ``translate_lrnnx_kwargs(kwargs) -> kwargs`` attribute, so the loaded model
    computes what the lrnnx model computed.

    Args:
      model_name: ``"lti.LRU"``, ``"lti.S5"``, ``"lti.S4"``, ``"lti.S4D"``,
        ``"lti.Centaurus"``, ``"ltv.S5"``, ``"ltv.Mamba"``, ``"ltv.RGLRU"`` or ``"ltv.S7"``.
      kwargs: the lrnnx constructor keyword arguments.
      state_dict: lrnnx entry names -> arrays.
      rngs: used only for construction (every parameter is then overwritten).

    Returns:
      The ready model.
    """
    cls = model_class(model_name)
    kwargs = dict(kwargs)
    translate = getattr(cls, "translate_lrnnx_kwargs", None)
    if translate is not None:
        kwargs = translate(kwargs)
    model = cls(**kwargs, rngs=rngs if rngs is not None else nnx.Rngs(0))
    return load_lrnnx_state_dict(model, state_dict)


#: ``mamba_ssm`` module names -> (module, class) of the lrnnx_jax implementation.
MAMBA_SSM_MODELS: dict[str, tuple[str, str]] = {
    "Mamba": ("lrnnx_jax.models.ltv.mamba", "Mamba"),  # mamba_ssm.modules.mamba_simple.Mamba (Mamba-1)
    "Mamba2": ("lrnnx_jax.models.ltv.mamba2", "Mamba2"),
}

#: ``mamba_ssm``'s ``MambaConfig`` (``mamba_ssm/models/config_mamba.py``): its fields and their defaults.
MAMBA_CONFIG_DEFAULTS: dict[str, Any] = dict(
    d_model=2560, d_intermediate=0, n_layer=64, vocab_size=50277, ssm_cfg={}, attn_layer_idx=[], attn_cfg={},
    rms_norm=True, residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8, tie_embeddings=True,
)

#: ``ssm_cfg["layer"]`` -> (our mixer type, that ``mamba_ssm`` layer's default ``d_state``); ``"Mamba1"`` when absent.
MAMBA_SSM_LAYERS: dict[str, tuple[str, int]] = {"Mamba1": ("Mamba", 16), "Mamba2": ("Mamba2", 128)}

#: ``MixerModel``'s norm epsilon (``MambaLMHeadModel`` leaves it at its default).
MAMBA_SSM_NORM_EPSILON = 1e-5


def from_mamba_ssm(*args, rngs: nnx.Rngs | None = None):
    """Build the lrnnx_jax twin of a ``mamba_ssm`` model and load its ``state_dict``.

    Two forms:

    * ``from_mamba_ssm(config, state_dict)``: a ``MambaLMHeadModel`` (Mamba-1 or Mamba-2 layers, attention at
      ``attn_layer_idx``, optional gated MLPs) as an :class:`~lrnnx_jax.architectures.LRNNLMHeadModel`.
      ``config``: the ``config.json`` fields (a mapping, a ``MambaConfig``, or the path of a ``config.json`` or of
      its directory; see :func:`mamba_ssm_lm_kwargs`); ``state_dict``: ``MambaLMHeadModel``'s names
      (``backbone.embedding.weight``, ``backbone.layers.<i>.{norm,mixer.*,norm2,mlp.fc1,mlp.fc2}.*``,
      ``backbone.norm_f.weight``, ``lm_head.weight``, which may be absent when tied).
    * ``from_mamba_ssm(model_name, kwargs, state_dict)``: one layer, ``"Mamba"``
      (``mamba_ssm.modules.mamba_simple.Mamba``) or ``"Mamba2"`` (``mamba_ssm.modules.mamba2.Mamba2``), with its
      constructor keyword arguments and its names (``in_proj.weight``, ``conv1d.weight``, ``conv1d.bias``,
      ``A_log``, ``D``, ``out_proj.weight``, ...).

    ``rngs`` is used only for construction: every parameter is then overwritten, except the event-mode
    ``dtA_proj`` of lrnnx's Mamba, which ``mamba_ssm`` does not have and which acts only with
    ``integration_timesteps``.

    Raises:
      ValueError: for an unknown model, layer or config field, or naming every missing, unexpected or wrongly
        shaped entry at once.
    """
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    if len(args) == 2:
        return _mamba_ssm_lm(*args, rngs=rngs)
    if len(args) != 3:
        raise TypeError("from_mamba_ssm takes (config, state_dict) or (model_name, kwargs, state_dict), "
                        f"got {len(args)} positional arguments")
    model_name, kwargs, state_dict = args
    if model_name not in MAMBA_SSM_MODELS:
        raise ValueError(f"unknown mamba_ssm model {model_name!r}; expected one of {sorted(MAMBA_SSM_MODELS)}")
    module, name = MAMBA_SSM_MODELS[model_name]
    model = getattr(importlib.import_module(module), name)(**dict(kwargs), rngs=rngs)
    return load_entries(model, model.mamba_ssm_entries(), (), state_dict)


def mamba_ssm_config(config) -> dict[str, Any]:
    """A ``MambaConfig``'s fields, its defaults filled in, from a mapping, a ``MambaConfig`` (any dataclass with
    its fields) or the path of a ``config.json`` (or of the directory holding it).

    Raises:
      ValueError: naming fields that ``MambaConfig`` does not have (``MambaConfig(**fields)`` refuses them too).
    """
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            config = json.load(f)
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    elif not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping, a MambaConfig or a path to config.json, got {type(config).__name__}")
    unknown = sorted(set(config) - set(MAMBA_CONFIG_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown MambaConfig fields {unknown}; expected among {sorted(MAMBA_CONFIG_DEFAULTS)}")
    return {**copy.deepcopy(MAMBA_CONFIG_DEFAULTS), **config}


def mamba_ssm_lm_kwargs(config) -> dict[str, Any]:
    """The :class:`~lrnnx_jax.architectures.LRNNLMHeadModel` arguments of a ``MambaLMHeadModel`` config.

    As ``mamba_ssm``'s ``create_block``: every layer in ``attn_layer_idx`` is ``MHA(**attn_cfg)`` (whose
    default is ``causal=False``: hybrid configs set ``"causal": true``), every other one is
    ``ssm_cfg["layer"]`` (``"Mamba1"``, the default, or ``"Mamba2"``) built with the rest of ``ssm_cfg``, at
    that layer's default ``d_state`` unless ``ssm_cfg`` gives one. ``fused_add_norm`` does not change the
    function and is dropped; the norms' epsilon is ``MixerModel``'s 1e-5.

    Raises:
      ValueError: for an unsupported ``ssm_cfg["layer"]`` (``"Mamba3"``), an ``attn_layer_idx`` outside
        ``[0, n_layer)``, or attention layers whose ``attn_cfg`` has no ``num_heads``.
    """
    config = mamba_ssm_config(config)
    ssm_cfg = dict(config["ssm_cfg"] or {})
    layer = ssm_cfg.pop("layer", "Mamba1")
    if layer not in MAMBA_SSM_LAYERS:
        raise ValueError(f"ssm_cfg layer {layer!r} is not supported; expected one of {sorted(MAMBA_SSM_LAYERS)}")
    mixer_type, default_d_state = MAMBA_SSM_LAYERS[layer]
    ssm_cfg.setdefault("d_state", default_d_state)
    n_layer = config["n_layer"]
    attn_layers = set(config["attn_layer_idx"] or [])
    outside = sorted(i for i in attn_layers if not (isinstance(i, int) and 0 <= i < n_layer))
    if outside:
        raise ValueError(f"attn_layer_idx {outside} are not layer indices in [0, n_layer={n_layer})")
    attn_cfg = dict(config["attn_cfg"] or {})
    if attn_layers and "num_heads" not in attn_cfg:
        raise ValueError(f"attn_cfg must give num_heads for the attention layers {sorted(attn_layers)}, got {attn_cfg}")
    mixer_types = ["attn" if i in attn_layers else mixer_type for i in range(n_layer)]
    mixer_kwargs = {name: kwargs for name, kwargs in ((mixer_type, ssm_cfg), ("attn", attn_cfg)) if name in mixer_types}
    return dict(d_model=config["d_model"], d_state=ssm_cfg["d_state"], n_layer=n_layer, vocab_size=config["vocab_size"],
                mixer_types=mixer_types, d_intermediate=config["d_intermediate"], mixer_kwargs=mixer_kwargs,
                norm_epsilon=MAMBA_SSM_NORM_EPSILON, rms_norm=config["rms_norm"],
                residual_in_fp32=config["residual_in_fp32"], tie_embeddings=config["tie_embeddings"],
                pad_vocab_size_multiple=config["pad_vocab_size_multiple"])


def _mamba_ssm_mixer_entries(mixer):
    """A mixer's ``mamba_ssm`` names; attention (``MHA``) has lrnnx's, which are ``mamba_ssm``'s."""
    mamba_ssm_entries = getattr(mixer, "mamba_ssm_entries", None)
    return mixer.lrnnx_entries() if mamba_ssm_entries is None else mamba_ssm_entries()


def _mamba_ssm_lm(config, state_dict: Mapping[str, Any], *, rngs: nnx.Rngs):
    from lrnnx_jax.architectures.language_model import LRNNLMHeadModel

    model = LRNNLMHeadModel(**mamba_ssm_lm_kwargs(config), rngs=rngs)
    ignored = ()
    if model.tie_embeddings:
        ignored = ("lm_head.weight",)  # torch's state_dict holds the tied embedding under both names
        head, embedding = state_dict.get("lm_head.weight"), state_dict.get("backbone.embedding.weight")
        if head is not None and embedding is not None and not np.array_equal(np.asarray(head), np.asarray(embedding)):
            raise ValueError("the config ties the embeddings (tie_embeddings=True, MambaConfig's default), but the "
                             "state_dict's lm_head.weight differs from backbone.embedding.weight; is the config's "
                             "tie_embeddings right?")
    return load_entries(model, model.checkpoint_entries(_mamba_ssm_mixer_entries), ignored, state_dict)
