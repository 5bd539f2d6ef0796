"""Load PyTorch lrnnx checkpoints: ``from_lrnnx(model_name, kwargs, state_dict)``.

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
    entries = model.lrnnx_entries()
    ignored = set(model.lrnnx_ignored_entries)
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
