"""Linear time-invariant models."""

from lrnnx_jax.models.lti.lru import LRU
from lrnnx_jax.models.lti.s5 import S5
from lrnnx_jax.models.lti.centaurus import Centaurus, CentaurusDWS, CentaurusFull, CentaurusNeck, CentaurusPWNeck

__all__ = ["LRU", "S5"]

__all__ += ["Centaurus", "CentaurusDWS", "CentaurusFull", "CentaurusNeck", "CentaurusPWNeck"]
from lrnnx_jax.models.lti.s4 import S4
from lrnnx_jax.models.lti.s4d import S4D

__all__ += ["S4", "S4D"]
