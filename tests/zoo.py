"""Every model configuration that the generic contract tests run (tests/test_model_contract.py).

Each entry builds a small model. ``event`` marks configurations that take
``integration_timesteps``. Model issues add their configurations here.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from flax import nnx


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    name: str
    module: str
    cls: str
    kwargs: dict[str, Any]
    event: bool = False
    #: values of the model's ``method`` attribute to compare (empty: just the default)
    methods: tuple[str, ...] = ()
    #: relative tolerance of forward vs step in float32
    rtol: float = 1e-4

    def build(self, seed: int = 0, **overrides):
        cls = getattr(importlib.import_module(self.module), self.cls)
        return cls(**{**self.kwargs, **overrides}, rngs=nnx.Rngs(seed))


H = 6

ZOO: list[ZooEntry] = [
    ZooEntry("LRU", "lrnnx_jax.models.lti.lru", "LRU", dict(d_model=H, d_state=5, r_min=0.4, r_max=0.95), methods=("fft", "scan")),
]


def zoo_ids() -> list[str]:
    return [entry.name for entry in ZOO]

