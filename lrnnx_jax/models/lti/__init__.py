"""Linear time-invariant models."""

from lrnnx_jax.models.lti.lru import LRU

__all__ = ["LRU"]
