"""Linear time-varying models."""

__all__: list[str] = []

from lrnnx_jax.models.ltv.rglru import RGLRU
from lrnnx_jax.models.ltv.s5 import S5
from lrnnx_jax.models.ltv.s7 import S7

__all__ += ["RGLRU", "S5", "S7"]

from lrnnx_jax.models.ltv.mamba import Mamba
from lrnnx_jax.models.ltv.mamba2 import Mamba2

__all__ += ["Mamba", "Mamba2"]
