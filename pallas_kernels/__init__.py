"""Pallas GPU kernels for lrnnx_jax (optional at import time; see the kernel issues)."""
