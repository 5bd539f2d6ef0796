"""Pallas GPU kernels for the single-step state updates of lrnnx_jax models.

Each op has one dispatch function that runs its Pallas kernel on NVIDIA GPUs and
its pure-JAX reference elsewhere (see :mod:`pallas_kernels.dispatch`):

* :func:`selective_state_update`: Mamba (and RG-LRU, S7 as lrnnx maps them);
* :func:`simplified_state_update`: the diagonal complex SSMs (S5, LRU, Centaurus);
* :mod:`pallas_kernels.fused_generation`: the whole rollout of a layer in one kernel
  (``generate``), and ``fused_step``, one step of the S4 / S4D block in one kernel.

The models' ``step`` methods call these ops, so on NVIDIA GPUs ``model.step`` and
``generate`` run the kernels wherever the switch selects them.

Importing the package never needs a GPU or Pallas; kernels are built on first use.
"""

from pallas_kernels.complex_lib import Planes
from pallas_kernels.dispatch import KernelConfig, get_config, kernel_config, set_config
from pallas_kernels.selective import selective_state_update
from pallas_kernels.simplified import simplified_state_update

__all__ = [
    "KernelConfig",
    "Planes",
    "get_config",
    "kernel_config",
    "selective_state_update",
    "set_config",
    "simplified_state_update",
]
