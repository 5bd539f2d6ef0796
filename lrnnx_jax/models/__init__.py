"""Model zoo: LTI models in :mod:`lrnnx_jax.models.lti`, LTV models in :mod:`lrnnx_jax.models.ltv`."""
