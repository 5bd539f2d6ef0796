"""Load PyTorch checkpoints: lrnnx's (``from_lrnnx(model_name, kwargs, state_dict)``) and ``mamba_ssm``'s
(``from_mamba_ssm("Mamba2", kwargs, state_dict)``).

torch is not needed: ``state_dict`` maps lrnnx's entry names to NumPy arrays
(``{k: v.numpy() for k, v in module.state_dict().items()}`` on the PyTorch side).
Each model declares its lrnnx layout in ``lrnnx_entries()``; this module checks
the whole dict against it (missing, unexpected and wrongly shaped entries are
all reported at once) and then loads it.
"""

from __future__ import annotations

import importlib
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
    "Mamba2": ("lrnnx_jax.models.ltv.mamba2", "Mamba2"),
}


def from_mamba_ssm(model_name: str, kwargs: Mapping[str, Any], state_dict: Mapping[str, Any], *,
                   rngs: nnx.Rngs | None = None):
    """Build the lrnnx_jax twin of a ``mamba_ssm`` layer and load its ``state_dict``.

    Args:
      model_name: ``"Mamba2"`` (``mamba_ssm.modules.mamba2.Mamba2``).
      kwargs: its constructor keyword arguments.
      state_dict: ``mamba_ssm``'s entry names (``in_proj.weight``, ``conv1d.weight``, ``conv1d.bias``,
        ``dt_bias``, ``A_log``, ``D``, ``norm.weight``, ``out_proj.weight``, ...) -> arrays.
      rngs: used only for construction (every parameter is then overwritten).

    Raises:
      ValueError: for an unknown name, or naming every missing, unexpected or wrongly shaped entry.
    """
    if model_name not in MAMBA_SSM_MODELS:
        raise ValueError(f"unknown mamba_ssm model {model_name!r}; expected one of {sorted(MAMBA_SSM_MODELS)}")
    module, name = MAMBA_SSM_MODELS[model_name]
    model = getattr(importlib.import_module(module), name)(**dict(kwargs), rngs=rngs if rngs is not None else nnx.Rngs(0))
    return load_entries(model, model.mamba_ssm_entries(), (), state_dict)
