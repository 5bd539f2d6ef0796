"""The interface every lrnnx_jax model implements (LTI and LTV alike).

Public API (names as in PyTorch lrnnx):

* ``model(x, integration_timesteps=None, lengths=None, *, return_cache=False)``:
  ``x (B, L, H) -> y (B, L, H)``; with ``return_cache=True`` returns ``(y, cache)``,
  the inference cache after the last valid step of each row, ready for ``step``.
* ``model.allocate_inference_cache(batch_size, max_seqlen=1, dtype=None)``: a
  pytree (dict) of zero states.
* ``model.step(x_t, cache, integration_timesteps=None) -> (y_t, new_cache)``:
  ``x_t, y_t (B, H)``. Pure: the cache is returned, never mutated.

Subclasses implement ``_forward``, ``_step`` and ``allocate_inference_cache``
and receive validated inputs in the compute dtype (float32, or float64 when the
input is float64). This base class does the validation, the ``lengths``
masking and the dtype handling once for every model.

``lengths (B,)`` gives variable-length batches: inputs at and after a row's
length are zeroed before the model sees them, outputs there are zero, and the
returned cache is the state after the row's last valid step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrnnx_jax.core import validation

Cache = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LrnnxEntry:
    """How one entry of an lrnnx ``state_dict`` loads into a model.

    ``shape`` is the lrnnx shape; ``load`` receives the NumPy array and writes
    the model's parameter(s).
    """

    shape: tuple[int, ...]
    load: Callable[[np.ndarray], None]


def lrnnx_entry(variable: nnx.Variable, convert: Optional[Callable[[np.ndarray], Any]] = None, shape=None) -> LrnnxEntry:
    """An entry that sets ``variable`` to ``convert(array)`` (identity by default).

    ``shape`` is lrnnx's shape, by default the variable's own.
    """

    def load(array):
        value = array if convert is None else convert(array)
        current = variable.get_value()
        variable.set_value(jnp.asarray(value, dtype=current.dtype).reshape(current.shape))

    return LrnnxEntry(tuple(variable.get_value().shape) if shape is None else tuple(shape), load)


def dropout_active(model) -> bool:
    """Whether any ``nnx.Dropout`` in ``model`` would drop (a nonzero rate and not deterministic, i.e. in training mode)."""
    return any(isinstance(m, nnx.Dropout) and m.rate > 0 and not m.deterministic for _, m in nnx.iter_modules(model))


def compute_dtype(dtype):
    """float32 for bf16/f16/f32 inputs, float64 for float64 inputs."""
    return jnp.promote_types(dtype, jnp.float32)


class LRNN(nnx.Module):
    """Base class of all models. See the module docstring for the contract."""

    #: Whether the model has an event mode (uses ``integration_timesteps``).
    supports_integration_timesteps: ClassVar[bool] = False
    #: A cache entry whose leading axis is the batch (used for batch checks).
    cache_batch_key: ClassVar[str] = "lrnn_state"
    #: lrnnx ``state_dict`` entries that are derived buffers, accepted and ignored by ``from_lrnnx``.
    lrnnx_ignored_entries: ClassVar[tuple[str, ...]] = ()

    d_model: int

    # ---------------------------------------------------------------- public API
    def __call__(self, x, integration_timesteps=None, lengths=None, *, return_cache: bool = False):
        x = validation.check_sequence(x, self.d_model)
        batch, length, _ = x.shape
        tau = self._check_timesteps(integration_timesteps, (batch, length))
        mask = validation.check_lengths(lengths, batch, length)
        xc = x.astype(compute_dtype(x.dtype))
        if mask is not None:
            xc = jnp.where(mask[..., None], xc, 0)
        graphdef, state = nnx.split(self)
        y, cache, rng_state = _jit_forward(graphdef, state, xc, tau, mask, lengths, return_cache)
        if rng_state is not None:
            nnx.update(self, rng_state)
        if mask is not None:
            y = jnp.where(mask[..., None], y, 0)
        y = y.astype(x.dtype)
        return (y, cache) if return_cache else y

    def step(self, x_t, cache: Cache, integration_timesteps=None):
        """One recurrence step: ``x_t (B, H) -> (y_t (B, H), new_cache)``."""
        x_t = validation.check_token(x_t, self.d_model)
        validation.check_cache_batch(cache, x_t.shape[0], self.cache_batch_key)
        tau = self._check_timesteps(integration_timesteps, (x_t.shape[0],))
        graphdef, state = nnx.split(self)
        y_t, new_cache, rng_state = _jit_step(graphdef, state, x_t.astype(compute_dtype(x_t.dtype)), cache, tau)
        if rng_state is not None:
            nnx.update(self, rng_state)
        return y_t.astype(x_t.dtype), new_cache

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int = 1, dtype=None) -> Cache:
        raise NotImplementedError

    # --------------------------------------------------------------- for models
    def _forward(self, x, integration_timesteps, mask, lengths, return_cache: bool):
        """``x (B, L, H)`` compute dtype -> ``(y (B, L, H), cache or None)``."""
        raise NotImplementedError

    def _step(self, x_t, cache: Cache, integration_timesteps):
        """``x_t (B, H)`` compute dtype, timesteps ``(B,)`` or None -> ``(y_t, cache)``."""
        raise NotImplementedError

    def lrnnx_entries(self) -> dict[str, LrnnxEntry]:
        """The lrnnx ``state_dict`` layout of this model (see :mod:`lrnnx_jax.convert`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot load lrnnx checkpoints")

    def _check_timesteps(self, integration_timesteps, shape):
        if not self.supports_integration_timesteps:
            validation.reject_timesteps(integration_timesteps, type(self).__name__)
            return None
        # (B, L) or (B, L, 1) for a sequence; (B,) or (B, 1) for a step, as in lrnnx
        return validation.check_timesteps(integration_timesteps, shape)

    @staticmethod
    def _state_dtype(dtype, complex_state: bool):
        """The cache dtype: float32 (complex64) unless ``dtype`` asks for more."""
        real = jnp.float32 if dtype is None else jnp.promote_types(dtype, jnp.float32)
        return jnp.result_type(real, jnp.complex64) if complex_state else real


# The model's math runs under one cached ``jax.jit`` per (model structure, shapes): eager calls
# then cost one dispatch instead of compiling the scan's closures again at every call, and
# inside a user's own jit / grad / vmap the inner jit is simply inlined. The parameters are
# arguments, never constants. Random state is returned (and written back) only when active
# dropout drew from it, decided once per trace: otherwise None, and a call costs no write-back.
@functools.partial(jax.jit, static_argnames=("graphdef", "return_cache"))
def _jit_forward(graphdef, state, x, integration_timesteps, mask, lengths, return_cache):
    model = nnx.merge(graphdef, state)
    y, cache = model._forward(x, integration_timesteps, mask, lengths, return_cache)
    return y, cache, _drawn_random_state(model)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _jit_step(graphdef, state, x_t, cache, integration_timesteps):
    model = nnx.merge(graphdef, state)
    y_t, cache = model._step(x_t, cache, integration_timesteps)
    return y_t, cache, _drawn_random_state(model)


def _drawn_random_state(model):
    return nnx.state(model, nnx.RngState) if dropout_active(model) else None


def torch_linear(in_features: int, out_features: int, *, use_bias: bool, rngs: nnx.Rngs, param_dtype=jnp.float32) -> nnx.Linear:
    """An ``nnx.Linear`` initialised like ``torch.nn.Linear``: weight and bias ``U(+-1/sqrt(in_features))``."""
    bound = 1 / np.sqrt(in_features)

    def uniform(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nnx.Linear(
        in_features, out_features, use_bias=use_bias, kernel_init=uniform, bias_init=uniform,
        param_dtype=param_dtype, rngs=rngs,
    )


def lrnnx_linear_entries(name: str, linear: nnx.Linear) -> dict[str, LrnnxEntry]:
    """The lrnnx entries ``name.weight`` (torch layout ``(out, in)``) and ``name.bias`` of ``linear``."""
    kernel = linear.kernel
    entries = {f"{name}.weight": lrnnx_entry(kernel, convert=np.transpose, shape=kernel.get_value().shape[::-1])}
    if linear.bias is not None:
        entries[f"{name}.bias"] = lrnnx_entry(linear.bias)
    return entries
