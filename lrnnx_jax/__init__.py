"""lrnnx_jax: linear RNNs in JAX (Flax NNX), at parity with PyTorch lrnnx."""

from lrnnx_jax import core, models, parallel
from lrnnx_jax.convert import from_lrnnx
from lrnnx_jax.core.validation import checked
from lrnnx_jax.generation import generate
from lrnnx_jax.models import lti, ltv

__version__ = "0.1.0"

__all__ = ["core", "models", "parallel", "lti", "ltv", "from_lrnnx", "generate", "checked", "__version__"]
