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
    #: run the float64 finite-difference gradient check (at least one entry per model and per
    #: event/non-event path; the check compiles in float64 and is the most expensive one)
    grad_check: bool = True

    def build(self, seed: int = 0, **overrides):
        cls = getattr(importlib.import_module(self.module), self.cls)
        return cls(**{**self.kwargs, **overrides}, rngs=nnx.Rngs(seed))


H = 6

ZOO: list[ZooEntry] = [
    ZooEntry("LRU", "lrnnx_jax.models.lti.lru", "LRU", dict(d_model=H, d_state=5, r_min=0.4, r_max=0.95), methods=("fft", "scan")),
    ZooEntry("S5-zoh", "lrnnx_jax.models.lti.s5", "S5", dict(d_model=H, d_state=4, discretization="zoh"), methods=("fft", "scan")),
    ZooEntry("S5-bilinear-conj", "lrnnx_jax.models.lti.s5", "S5", dict(d_model=H, d_state=3, discretization="bilinear", conj_sym=True), methods=("fft", "scan"), grad_check=False),
    ZooEntry("S5-dirac-event", "lrnnx_jax.models.lti.s5", "S5", dict(d_model=H, d_state=4, discretization="dirac"), event=True, grad_check=False),
    ZooEntry("S5-async-event", "lrnnx_jax.models.lti.s5", "S5", dict(d_model=H, d_state=4, discretization="async"), event=True),
    ZooEntry("CentaurusNeck", "lrnnx_jax.models.lti.centaurus", "Centaurus", dict(d_model=H, d_state=5, sub_state_dim=3, mode="neck"), methods=("fft", "scan")),
    ZooEntry("CentaurusPWNeck", "lrnnx_jax.models.lti.centaurus", "Centaurus", dict(d_model=H, d_state=4, sub_state_dim=2, mode="pw"), methods=("fft", "scan"), grad_check=False),
    ZooEntry("CentaurusDWS", "lrnnx_jax.models.lti.centaurus", "Centaurus", dict(d_model=H, d_state=H, sub_state_dim=3, mode="dws"), methods=("fft", "scan"), grad_check=False),
    ZooEntry("CentaurusFull", "lrnnx_jax.models.lti.centaurus", "Centaurus", dict(d_model=H, d_state=H * H, sub_state_dim=2, mode="full"), methods=("fft", "scan")),
    ZooEntry("ltv.S5-zoh", "lrnnx_jax.models.ltv.s5", "S5", dict(d_model=H, d_state=4), methods=("fft", "scan")),
    ZooEntry("ltv.S5-bilinear-conj-event", "lrnnx_jax.models.ltv.s5", "S5", dict(d_model=H, d_state=3, discretization="bilinear", conj_sym=True), event=True),
    ZooEntry("ltv.S5-dirac-event", "lrnnx_jax.models.ltv.s5", "S5", dict(d_model=H, d_state=4, discretization="dirac", step_rescale=2.0), event=True, grad_check=False),
    ZooEntry("S7-J1", "lrnnx_jax.models.ltv.s7", "S7", dict(d_model=H, d_state=4), grad_check=False),
    ZooEntry("S7-J2", "lrnnx_jax.models.ltv.s7", "S7", dict(d_model=H, d_state=4, J=2)),
    ZooEntry("S7-N6-J3", "lrnnx_jax.models.ltv.s7", "S7", dict(d_model=H, d_state=6, J=3, chunk_size=4), grad_check=False),
    ZooEntry("RGLRU-e1-k4", "lrnnx_jax.models.ltv.rglru", "RGLRU", dict(d_model=H), grad_check=False),
    ZooEntry("RGLRU-e2-k2-bias", "lrnnx_jax.models.ltv.rglru", "RGLRU", dict(d_model=H, d_conv=2, expand=2, bias=True, conv_bias=False, chunk_size=4)),
    # Mamba: dt in [0.05, 1] so that the discretizations differ visibly (lrnnx's default dt is tiny). Each
    # discretization once (about 20 s of CPU per entry); tests/test_mamba.py checks every discretization with and
    # without event mode against a float64 reference (forward, step and prefill).
    ZooEntry("Mamba", "lrnnx_jax.models.ltv.mamba", "Mamba", dict(d_model=H, d_state=4, dt_min=0.05, dt_max=0.5), grad_check=False),
    ZooEntry("Mamba-zoh-k2-e1.5-bias-r2-c4", "lrnnx_jax.models.ltv.mamba", "Mamba", dict(d_model=H, d_state=3, d_conv=2, expand=1.5, dt_rank=2, bias=True, conv_bias=False, discretization="zoh", chunk_size=4, dt_min=0.05, dt_max=0.5)),
    ZooEntry("Mamba-dirac-event", "lrnnx_jax.models.ltv.mamba", "Mamba", dict(d_model=H, d_state=4, discretization="dirac", dt_min=0.05, dt_max=0.5), event=True, grad_check=False),
    ZooEntry("Mamba-bilinear-event-c4", "lrnnx_jax.models.ltv.mamba", "Mamba", dict(d_model=H, d_state=4, discretization="bilinear", chunk_size=4, dt_min=0.1, dt_max=1.0), event=True),
    # Mamba-2 (mamba_ssm's layer; lrnnx has none): 3 heads of 4 channels, one group; and 3 groups with biases,
    # a skip per channel and the norm before the gate. tests/test_mamba2.py checks it against float64 NumPy.
    ZooEntry("Mamba2", "lrnnx_jax.models.ltv.mamba2", "Mamba2", dict(d_model=H, d_state=4, headdim=4, d_conv=3, chunk_size=4, dt_min=0.05, dt_max=0.5)),
    ZooEntry("Mamba2-g3-bias-hdim-normfirst", "lrnnx_jax.models.ltv.mamba2", "Mamba2", dict(d_model=H, d_state=4, headdim=4, ngroups=3, bias=True, D_has_hdim=True, norm_before_gate=True, chunk_size=None, dt_min=0.05, dt_max=0.5), grad_check=False),
    # S4 / S4D: dt up to 0.5 so that the bilinear dynamics matter within a few steps; the default configurations
    # (legs, one channel, no gate) are the fixtures 05-07, and tests/test_s4*.py cover the rest.
    ZooEntry("S4-legt-r2-c2-gate-bottleneck", "lrnnx_jax.models.lti.s4", "S4", dict(d_model=H, d_state=6, rank=2, init="legt", channels=2, gate=2, bottleneck=2, dt_tie=False, transposed=False, chunk_size=4, dt_min=0.01, dt_max=0.5), methods=("fft", "scan")),
    ZooEntry("S4D-bilinear-lin-c2-gate2", "lrnnx_jax.models.lti.s4d", "S4D", dict(d_model=H, d_state=6, disc="bilinear", init="diag-lin", channels=2, gate=2, transposed=False, chunk_size=4, dt_min=0.01, dt_max=0.5), methods=("fft", "scan")),
]

