"""What the training-scan kernels share (:mod:`pallas_kernels.selective_scan`, :mod:`pallas_kernels.diagonal_scan`).

* :class:`ScanPolicy`: where ``use_kernels="auto"`` takes a training-scan op's kernels (data, with its evidence);
* :func:`unsupported_dtype` and :func:`unsupported_size`: the reasons every op's dispatch gives for the reference
  path (float64 and other dtypes never reach a kernel; 32-bit offsets);
* :func:`pallas_call`: a kernel's ``pl.pallas_call`` under a :class:`~pallas_kernels.dispatch.KernelConfig`
  (interpret mode off the GPU, the Triton compiler parameters), the one place a scan kernel is built;
* :func:`pipelined_chunks`: a kernel's loop over the chunks of a sequence, each chunk's loads issued one chunk
  ahead of its steps;
* :func:`pad_time`: padding of a ``(batch, L, ...)`` sequence along time;
* :func:`model_config`: a model's ``kernel_config`` argument, checked.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch

#: the real dtypes the scan kernels take (they compute in float32)
REAL_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
#: the evidence of a policy that nothing measured yet
NOT_MEASURED = "not measured on a GPU yet"


@dataclasses.dataclass(frozen=True)
class ScanPolicy:
    """Where ``use_kernels="auto"`` runs a training-scan op's kernels on an NVIDIA GPU (like
    :class:`pallas_kernels.cells.KernelPolicy` for the cells' kernels).

    Attributes:
      auto: whether ``"auto"`` takes the kernels (once they were measured faster than the XLA path).
      evidence: the measurement behind the decision (device, sizes, times), or why there is none.
    """

    auto: bool = False
    evidence: str = ""

    def slower_reason(self) -> Optional[str]:
        """None when ``"auto"`` takes the kernels."""
        return None if self.auto else f"the training-scan kernels under 'auto' ({self.evidence})"


def unsupported_dtype(arrays: dict, allow_complex: bool = False) -> Optional[str]:
    """Why an array of ``arrays`` (name -> array or None) cannot enter a kernel, or None.

    Real arrays: :data:`REAL_DTYPES`; with ``allow_complex``, also complex64 (as float32 planes).
    """
    allowed = REAL_DTYPES + ((jnp.complex64,) if allow_complex else ())
    for name, a in arrays.items():
        if a is not None and not any(a.dtype == t for t in allowed):
            names = ", ".join(jnp.dtype(t).name for t in allowed)
            return f"{name} of dtype {a.dtype} (supported: {names})"
    return None


def unsupported_size(*element_counts: int) -> Optional[str]:
    """Why the kernels cannot index arrays of these element counts (32-bit offsets), or None."""
    if max(element_counts) >= 2**31:
        return "arrays of 2**31 elements or more (32-bit offsets)"
    return None


def pallas_call(body, out_shape, grid, config: dispatch.KernelConfig, name: str, num_warps: Optional[int] = None):
    """``pl.pallas_call(body, ...)`` for a scan kernel: interpret mode and compiler parameters from ``config``
    (``num_warps``: the kernel's default warps per program, which ``config.num_warps`` overrides)."""
    pl, _ = dispatch.pallas_modules()
    return pl.pallas_call(
        body,
        out_shape=out_shape,
        grid=grid,
        interpret=dispatch.interpret_mode(config),
        compiler_params=dispatch.compiler_params(config, num_warps),
        name=name,
    )


def pipelined_chunks(num_chunks: int, load: Callable, process: Callable, carry, *, reverse: bool = False):
    """A kernel's loop over the ``num_chunks`` chunks of a sequence (descending when ``reverse``), software-pipelined.

    ``load(c)`` returns chunk ``c``'s inputs (a pytree of the values its steps read from memory); ``process(c,
    inputs, carry) -> carry`` runs the chunk's steps (unrolled by the caller) and stores their outputs. The loads of
    chunk ``c + 1`` are issued before chunk ``c`` is processed and travel in the loop's carry, so their memory
    latency hides behind a chunk of arithmetic. Why it matters (measured on an H200, Mamba's forward kernel at
    B=32, L=2048, D=256, N=16): with a load, the step and a store per step, every step waits for its loads, since
    a load may not move above an earlier store to a possibly aliasing ref: 2.09 ms; unrolled chunks of 16 steps,
    still loading per step: 1.35 ms. ``process`` should store after its steps, for the same reason.
    """
    order = (lambda k: num_chunks - 1 - k) if reverse else (lambda k: k)

    def body(k, state):
        carry, inputs = state
        upcoming = load(order(jnp.minimum(k + 1, num_chunks - 1)))
        return process(order(k), inputs, carry), upcoming

    carry, _ = jax.lax.fori_loop(0, num_chunks, body, (carry, load(order(jnp.int32(0)))))
    return carry


def model_config(config) -> Optional[dispatch.KernelConfig]:
    """A model's ``kernel_config`` argument: a :class:`~pallas_kernels.dispatch.KernelConfig`, or None (the default
    is then read when the model's forward is traced); a ``TypeError`` for anything else."""
    return None if config is None else dispatch.resolve(config)


def pad_time(a, pad: int):
    """``a (batch, L, ...)`` with ``pad`` zero steps appended (``a`` itself when None or ``pad == 0``)."""
    if a is None or not pad:
        return a
    return jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
