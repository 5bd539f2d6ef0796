"""Several devices through ``jax.sharding``.

* :mod:`lrnnx_jax.parallel.data`: data parallelism (the batch sharded over a mesh axis, parameters replicated) and
  the reading of compiled programs' collectives (how the tests check that no activation crosses devices).
* :mod:`lrnnx_jax.parallel.sequence`: sequence parallelism (one sequence split along its length over a mesh axis;
  each device's entering state from the other devices' small summaries).
* :mod:`lrnnx_jax.parallel.model`: model (tensor) parallelism of the language model, Megatron-style (its
  parameters and caches split over a ``model`` mesh axis; ``generate_tokens`` one SPMD program over it).
"""

from lrnnx_jax.parallel.data import (
    COLLECTIVES,
    DATA,
    Collective,
    activation_collectives,
    as_batch_sharding,
    batch_sharding,
    batch_sharding_of,
    collectives,
    data_mesh,
    data_parallel,
    describe,
    mesh_context,
    replicate,
    replicated,
    same_placement,
    shard_batch,
)
from lrnnx_jax.parallel.sequence import SEQUENCE, length_collectives, sequence_parallel, sequence_sharding, shard_sequence
from lrnnx_jax.parallel.model import MODEL, RULES, ModelParallel, Rule, model_mesh, partition_spec, shard_model
