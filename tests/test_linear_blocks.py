"""lrnnx_jax.core.base.linear_blocks: an ``nnx.Linear`` as one contraction per block of output columns."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lrnnx_jax.core.base import linear_blocks, torch_linear


@pytest.mark.parametrize("use_bias,param_dtype", [(True, jnp.float32), (False, jnp.float32), (True, jnp.bfloat16)])
def test_blocks_equal_the_split_output_and_the_gradients_match(use_bias, param_dtype):
    linear = torch_linear(6, 9, use_bias=use_bias, rngs=nnx.Rngs(3), param_dtype=param_dtype)
    x = jax.random.normal(jax.random.key(1), (2, 5, 6), jnp.float32)
    blocks = linear_blocks(linear, x, (2, 3, 4))
    whole = jnp.split(linear(x), [2, 5], axis=-1)
    for block, expected, width in zip(blocks, whole, (2, 3, 4)):
        chex.assert_shape(block, (2, 5, width))
        chex.assert_type(block, expected.dtype)
        # float64 NumPy reference of the affine map on the block's columns
        kernel = np.asarray(linear.kernel[...], np.float64)
        start = {2: 0, 3: 2, 4: 5}[width]
        reference = np.asarray(x, np.float64) @ kernel[:, start : start + width]
        if use_bias:
            reference += np.asarray(linear.bias[...], np.float64)[start : start + width]
        tol = 1e-5 if param_dtype == jnp.float32 else 2e-2  # bfloat16 products carry 8 bits
        np.testing.assert_allclose(np.asarray(block, np.float64), reference, rtol=tol, atol=tol)
        # the same products, summed in another order: float32 (or bfloat16) rounding of a 6-term sum apart
        np.testing.assert_allclose(np.asarray(block, np.float64), np.asarray(expected, np.float64),
                                   rtol=tol / 10, atol=tol / 10)

    weights = jax.random.normal(jax.random.key(2), (9,), jnp.float32)
    loss_blocks = lambda x: jnp.sum(jnp.concatenate(linear_blocks(linear, x, (2, 3, 4)), -1) * weights)  # noqa: E731
    loss_whole = lambda x: jnp.sum(linear(x) * weights)  # noqa: E731
    np.testing.assert_allclose(jax.grad(loss_blocks)(x), jax.grad(loss_whole)(x), rtol=1e-5, atol=1e-6)


def test_sizes_must_cover_the_output_features():
    linear = torch_linear(4, 6, use_bias=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"sizes must sum to the 6 output features, got \(2, 3\)"):
        linear_blocks(linear, jnp.ones((1, 4)), (2, 3))
