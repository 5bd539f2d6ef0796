"""The interface every lrnnx_jax model implements (LTI and LTV alike).

Public API (names as in PyTorch lrnnx):

* ``model(x, integration_timesteps=None, lengths=None, *, cache=None, return_cache=False)``:
  ``x (B, L, H) -> y (B, L, H)``, starting from ``cache`` (an inference cache; None: the
  zero state); with ``return_cache=True`` returns ``(y, cache)``, the inference cache
  after the last valid step of each row, ready for ``step`` or for the next forward
  (chunked prefill).
* ``model.allocate_inference_cache(batch_size, max_seqlen=1, dtype=None)``: a
  pytree (dict) of zero states.
* ``model.step(x_t, cache, integration_timesteps=None) -> (y_t, new_cache)``:
  ``x_t, y_t (B, H)``. Pure: the cache is returned, never mutated.
* ``model.multi_step(x, cache, integration_timesteps=None, *, return_states=False)``:
  T given tokens in one call, optionally with the cache after every token.

Subclasses implement ``_forward``, ``allocate_inference_cache`` and their step as a
cell (``cell``, ``cell_state``, ``cell_cache``, ``cell_inputs``; see
``pallas_kernels.cells``), which every step path runs, and receive validated inputs in the compute dtype (float32, or float64 when the
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
from lrnnx_jax.core.capture import as_model
from pallas_kernels import dispatch, drivers

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


def in_compute_dtype(a):
    """``a`` as an array of :func:`compute_dtype` of its dtype (a cell's parameters: float32, or float64)."""
    a = jnp.asarray(a)
    return a.astype(compute_dtype(a.dtype))


class LRNN(nnx.Module):
    """Base class of all models. See the module docstring for the contract."""

    #: Whether the model has an event mode (uses ``integration_timesteps``).
    supports_integration_timesteps: ClassVar[bool] = False
    #: A cache entry whose leading axis is the batch (used for batch checks).
    cache_batch_key: ClassVar[str] = "lrnn_state"
    #: lrnnx ``state_dict`` entries that are derived buffers, accepted and ignored by ``from_lrnnx``.
    lrnnx_ignored_entries: ClassVar[tuple[str, ...]] = ()
    #: How each inference-cache entry carries over a cut of the sequence (``lrnnx_jax.parallel.sequence_parallel``):
    #: ``"diagonal"``, a recurrent state that each step multiplies elementwise (plus a term of the inputs);
    #: ``"dense"``, a recurrent state whose step mixes its last axis; ``"window"``, the last ``K`` raw inputs of a
    #: causal conv (``K`` its last axis), a function of the last ``K`` tokens alone. Keys a model's cache lacks are
    #: ignored.
    cache_carry: ClassVar[dict[str, str]] = {"lrnn_state": "diagonal", "conv_state": "window"}

    d_model: int

    # ---------------------------------------------------------------- public API
    def __call__(self, x, integration_timesteps=None, lengths=None, *, cache: Optional[Cache] = None,
                 return_cache: bool = False):
        return self._forward_call(self, x, integration_timesteps, lengths, cache=cache, return_cache=return_cache)

    # Each public call is its ``_*_call`` with this model as ``argument``, what its program receives: a
    # ``decoding.CapturedModel`` passes its captured leaves instead (``lrnnx_jax.core.capture``), and a subclass that
    # changes a call overrides the ``_*_call``, so that both paths keep it.
    def _forward_call(self, argument, x, integration_timesteps=None, lengths=None, *, cache: Optional[Cache] = None,
                      return_cache: bool = False):
        x = validation.check_sequence(x, self.d_model)
        batch, length, _ = x.shape
        tau = self._check_timesteps(integration_timesteps, (batch, length))
        mask = validation.check_lengths(lengths, batch, length)
        if cache is not None:
            expected = jax.eval_shape(lambda: self.allocate_inference_cache(batch))
            validation.check_cache(cache, expected, self.cache_batch_key)
        y, cache, rng_state = _jit_forward(argument, x.astype(compute_dtype(x.dtype)), tau, mask, lengths, cache,
                                           return_cache)
        if rng_state is not None:
            nnx.update(self, rng_state)
        y = y.astype(x.dtype)
        return (y, cache) if return_cache else y

    def step(self, x_t, cache: Cache, integration_timesteps=None, *, kernel_config=None):
        """One recurrence step: ``x_t (B, H) -> (y_t (B, H), new_cache)``.

        Runs the model's cell (:meth:`cell`) through ``pallas_kernels.drivers.step``: the one-step
        fused kernel where ``kernel_config`` (a ``pallas_kernels.KernelConfig``; the default when None)
        and the cell's policy select it, else the XLA driver.
        """
        return self._step_call(self, x_t, cache, integration_timesteps, kernel_config=kernel_config)

    def _step_call(self, argument, x_t, cache: Cache, integration_timesteps=None, *, kernel_config=None):
        x_t = validation.check_token(x_t, self.d_model)
        validation.check_cache_batch(cache, x_t.shape[0], self.cache_batch_key)
        tau = self._check_timesteps(integration_timesteps, (x_t.shape[0],))
        y_t, new_cache, rng_state = _jit_step(argument, x_t.astype(compute_dtype(x_t.dtype)), cache, tau,
                                              dispatch.resolve(kernel_config))
        if rng_state is not None:
            nnx.update(self, rng_state)
        return y_t.astype(x_t.dtype), new_cache

    def multi_step(self, x, cache: Cache, integration_timesteps=None, *, return_states: bool = False, kernel_config=None):
        """T given tokens from ``cache`` in one call: ``x (B, T, H) -> (y (B, T, H), cache after them)``.

        Equal to T calls of :meth:`step`. With ``return_states=True`` it returns
        ``(y, cache, states)``, where ``states`` is the cache after every token (each leaf with
        the token axis after the batch, ``(B, T, ...)``): what speculative verification keeps
        to accept a prefix. ``integration_timesteps``: ``(B, T)`` (event mode).
        """
        return self._multi_step_call(self, x, cache, integration_timesteps, return_states=return_states,
                                     kernel_config=kernel_config)

    def _multi_step_call(self, argument, x, cache: Cache, integration_timesteps=None, *, return_states: bool = False,
                         kernel_config=None):
        x = validation.check_sequence(x, self.d_model)
        batch, length, _ = x.shape
        validation.check_cache_batch(cache, batch, self.cache_batch_key)
        tau = self._check_timesteps(integration_timesteps, (batch, length))
        y, new_cache, states, rng_state = _jit_multi_step(argument, x.astype(compute_dtype(x.dtype)), cache, tau,
                                                          bool(return_states), dispatch.resolve(kernel_config))
        if rng_state is not None:
            nnx.update(self, rng_state)
        y = y.astype(x.dtype)
        return (y, new_cache, states) if return_states else (y, new_cache)

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int = 1, dtype=None) -> Cache:
        raise NotImplementedError

    def allocate_verify_cache(self, batch_size: int, num_tokens: int, dtype=None, **layout) -> Cache:
        """The cache of :meth:`verify_step` for calls of ``num_tokens`` tokens, from the zero state
        (:meth:`verify_cache_from`, which receives ``layout``: Mamba's ``checkpointed_ssu``)."""
        return self.verify_cache_from(self.allocate_inference_cache(batch_size, dtype=dtype), num_tokens, dtype, **layout)

    def verify_cache_from(self, checkpoint: Cache, num_tokens: int, dtype=None) -> Cache:
        """The verify cache that continues an inference cache (after a prefill): ``{"checkpoint"`` (the committed
        state), ``"old_x" (B, T, H)`` (the previous call's tokens, zeros at first), and in event mode
        ``"old_tau" (B, T)``}. Models whose verification keeps other per-token caches override it (Mamba-2)."""
        num_tokens = validation.check_positive_int(num_tokens, "num_tokens")
        batch = jax.tree.leaves(checkpoint)[0].shape[0]
        real = compute_dtype(dtype or jnp.float32)
        cache = {"checkpoint": checkpoint, "old_x": jnp.zeros((batch, num_tokens, self.d_model), real)}
        if self.supports_integration_timesteps:
            cache["old_tau"] = jnp.ones((batch, num_tokens), real)
        return cache

    def verify_step(self, x_tokens, cache: Cache, num_accepted=None, integration_timesteps=None, *, kernel_config=None):
        """Speculative verification: T drafted tokens in one call, of which a later call accepts a prefix.

        The cache (:meth:`allocate_verify_cache`) holds a checkpoint (the committed state) and the previous
        call's tokens. A call first replays the ``num_accepted`` accepted tokens of the previous call onto the
        checkpoint (the parallel forward from the cache, with ``lengths=num_accepted``: the conv states too)
        and commits the result as the new checkpoint; then it runs the new tokens from it with
        :meth:`multi_step` and keeps them for the next call's replay. The new tokens are not committed.

        Args:
          x_tokens: ``(B, T, H)``, T as allocated.
          cache: from :meth:`allocate_verify_cache` or the previous call.
          num_accepted: ``(B,)`` integers in ``[0, T]``: how many tokens of the previous call were accepted
            (None: none, as at the first call).
          integration_timesteps: ``(B, T)`` (event mode).

        Returns:
          ``(y (B, T, H), new_cache)``: ``y[:, t]`` is the output after the committed state and tokens ``0..t``.
        """
        return self._verify_call(self, x_tokens, cache, num_accepted, integration_timesteps, kernel_config=kernel_config)

    def _verify_call(self, argument, x_tokens, cache: Cache, num_accepted=None, integration_timesteps=None, *,
                     kernel_config=None):
        x_tokens = validation.check_sequence(x_tokens, self.d_model, name="x_tokens")
        batch, length, _ = x_tokens.shape
        if not isinstance(cache, dict) or "checkpoint" not in cache or "old_x" not in cache:
            raise TypeError("cache must be the dict from allocate_verify_cache (keys 'checkpoint', 'old_x')")
        if tuple(cache["old_x"].shape[:2]) != (batch, length):
            raise ValueError(f"x_tokens must have the verify cache's (B, T) = {tuple(cache['old_x'].shape[:2])}, got "
                             f"{tuple(x_tokens.shape[:2])}; call allocate_verify_cache(batch_size={batch}, num_tokens={length})")
        validation.check_cache_batch(cache["checkpoint"], batch, self.cache_batch_key)
        if num_accepted is None:
            num_accepted = jnp.zeros((batch,), jnp.int32)
        validation.check_lengths(num_accepted, batch, length, name="num_accepted")
        tau = self._check_timesteps(integration_timesteps, (batch, length))
        old_tau = cache.get("old_tau") if tau is not None else None
        y, new_cache, rng_state = _jit_verify(argument, x_tokens.astype(compute_dtype(x_tokens.dtype)), cache,
                                              jnp.asarray(num_accepted, jnp.int32), tau, old_tau,
                                              dispatch.resolve(kernel_config))
        if rng_state is not None:
            nnx.update(self, rng_state)
        return y.astype(x_tokens.dtype), new_cache

    def dropout_active(self) -> bool:
        """Whether any ``nnx.Dropout`` of the model would drop (training mode with a nonzero rate)."""
        return dropout_active(self)

    # ------------------------------------------------------------- the cell
    def cell(self):
        """The model's step as a ``pallas_kernels.cells.Cell`` (parameters in the kernel layout and
        one pure step function); the only definition of the model's recurrence step."""
        raise NotImplementedError

    def cell_state(self, cache: Cache):
        """The cell's state (a pytree of per-row arrays, compute dtype) from the inference cache."""
        raise NotImplementedError

    def cell_cache(self, state, like: Cache) -> Cache:
        """The inference cache (dtypes and shapes of ``like``) from the cell's state."""
        raise NotImplementedError

    def cell_inputs(self, shape: tuple, integration_timesteps=None) -> dict:
        """The cell's per-token inputs for tokens of leading shape ``shape`` (``(B,)`` or ``(B, T)``):
        from ``integration_timesteps`` (of that shape) in event mode; ``{}`` by default."""
        return {}

    # --------------------------------------------------------------- for models
    def _forward(self, x, integration_timesteps, mask, lengths, return_cache: bool, cache: Optional[Cache]):
        """``x (B, L, H)`` compute dtype -> ``(y (B, L, H), cache or None)``, starting from ``cache``
        (None: the zero state)."""
        raise NotImplementedError

    def masked_forward(self, x, integration_timesteps, mask, lengths, return_cache: bool, cache: Optional[Cache]):
        """:meth:`_forward` with the ``lengths`` masking of ``__call__`` (inputs and outputs zero at and after a
        row's length), for validated compute-dtype inputs; what ``__call__`` and the programs that run a model
        inside their own (the language model) call. ``mask (B, L)`` is ``lengths``' mask or None."""
        if mask is not None:
            x = jnp.where(mask[..., None], x, 0)
        y, cache = self._forward(x, integration_timesteps, mask, lengths, return_cache, cache)
        if mask is not None:
            y = jnp.where(mask[..., None], y, 0)
        return y, cache

    def verify(self, x, cache: Cache, num_accepted, tau, old_tau, config):
        """:meth:`verify_step` on validated compute-dtype inputs (``num_accepted (B,)`` int32): the replay (the
        forward from the checkpoint over the accepted tokens), then the new tokens (``_multi_step``) from the
        replayed state. Returns ``(y (B, T, H), new_cache)``."""
        accepted = jnp.arange(cache["old_x"].shape[1]) < num_accepted[:, None]
        old_x = cache["old_x"].astype(x.dtype)
        _, replayed = self.masked_forward(old_x, old_tau, accepted, num_accepted, True, cache["checkpoint"])
        replayed = jax.tree.map(lambda new, old: new.astype(old.dtype), replayed, cache["checkpoint"])
        y, _, _ = self._multi_step(x, replayed, tau, False, config)
        new_cache = {"checkpoint": replayed, "old_x": x.astype(cache["old_x"].dtype)}
        if "old_tau" in cache:
            new_cache["old_tau"] = cache["old_tau"] if tau is None else tau.astype(cache["old_tau"].dtype)
        return y, new_cache

    def kernel_refusal(self) -> Optional[str]:
        """Why the cell kernels cannot run this model as it is, or None: active dropout (they run it in eval mode)."""
        if self.dropout_active():
            return f"{type(self).__name__} with active dropout (in training mode; the kernels run the model in eval mode)"
        return None

    def _step(self, x_t, cache: Cache, integration_timesteps, config):
        """``x_t (B, H)`` compute dtype, timesteps ``(B,)`` or None -> ``(y_t, cache)`` through the cell."""
        y, state = drivers.step(self.cell(), self.cell_state(cache), x_t, self.cell_inputs(x_t.shape[:1], integration_timesteps),
                                config, model_reason=self.kernel_refusal())
        return y, self.cell_cache(state, cache)

    def _multi_step(self, x, cache: Cache, integration_timesteps, return_states: bool, config):
        y, state, states = drivers.multi_step(
            self.cell(), self.cell_state(cache), x, self.cell_inputs(x.shape[:2], integration_timesteps), config,
            return_states=return_states, model_reason=self.kernel_refusal())
        if states is not None:
            stacked_like = jax.tree.map(lambda a: jnp.zeros((a.shape[0], x.shape[1], *a.shape[1:]), a.dtype), cache)
            flat = lambda tree: jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), tree)  # noqa: E731
            rows = self.cell_cache(flat(states), flat(stacked_like))
            states = jax.tree.map(lambda a, like: a.reshape(like.shape), rows, stacked_like)
        return y, self.cell_cache(state, cache), states

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
# inside a user's own jit / grad / vmap the inner jit is simply inlined. The model goes in as the
# pytree it is (its parameters as arguments, never constants, its structure the cache key):
# ``jax.jit`` flattens it in 15-40 µs, where ``nnx.split`` walked its graph in 100-250 µs at every
# eager call (Mamba, on the CPU). Random state is returned (and written back) only when active
# dropout drew from it, decided once per trace: otherwise None, and a call costs no write-back.
@functools.partial(jax.jit, static_argnames=("return_cache",))
def _jit_forward(model, x, integration_timesteps, mask, lengths, cache, return_cache):
    model = as_model(model)
    y, cache = model.masked_forward(x, integration_timesteps, mask, lengths, return_cache, cache)
    return y, cache, drawn_random_state(model)


@functools.partial(jax.jit, static_argnames=("config",))
def _jit_step(model, x_t, cache, integration_timesteps, config):
    model = as_model(model)
    y_t, cache = model._step(x_t, cache, integration_timesteps, config)
    return y_t, cache, drawn_random_state(model)


@functools.partial(jax.jit, static_argnames=("return_states", "config"))
def _jit_multi_step(model, x, cache, integration_timesteps, return_states, config):
    model = as_model(model)
    y, cache, states = model._multi_step(x, cache, integration_timesteps, return_states, config)
    return y, cache, states, drawn_random_state(model)


@functools.partial(jax.jit, static_argnames=("config",))
def _jit_verify(model, x, cache, num_accepted, tau, old_tau, config):
    model = as_model(model)
    y, new_cache = model.verify(x, cache, num_accepted, tau, old_tau, config)
    return y, new_cache, drawn_random_state(model)


def drawn_random_state(model):
    """Inside a traced call: the model's random state when active dropout drew from it (to write back with
    ``nnx.update``), else None."""
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


def linear_blocks(linear: nnx.Linear, inputs, sizes) -> list:
    """``linear(inputs)`` split into blocks of ``sizes`` output columns (summing to its output features), computed
    as one contraction per block of the kernel's columns, with ``nnx.Linear``'s dtype promotion and precision.

    The value equals ``jnp.split(linear(inputs), ...)`` (up to the order of the sums); the gradient differs in cost: the input's gradient is the
    sum of the blocks' contractions, so the output gradients are never concatenated into one ``(..., out)`` array.
    """
    if sum(sizes) != linear.out_features:
        raise ValueError(f"sizes must sum to the {linear.out_features} output features, got {tuple(sizes)}")
    kernel = linear.kernel[...]
    bias = linear.bias[...] if linear.bias is not None else None
    inputs, kernel, bias = linear.promote_dtype((inputs, kernel, bias), dtype=linear.dtype)
    extra = {} if linear.preferred_element_type is None else {"preferred_element_type": linear.preferred_element_type}
    blocks, start = [], 0
    for size in sizes:
        y = linear.dot_general(inputs, kernel[:, start : start + size], (((inputs.ndim - 1,), (0,)), ((), ())),
                               precision=linear.precision, **extra)
        blocks.append(y if bias is None else y + bias[start : start + size])
        start += size
    return blocks


def lrnnx_linear_entries(name: str, linear: nnx.Linear) -> dict[str, LrnnxEntry]:
    """The lrnnx entries ``name.weight`` (torch layout ``(out, in)``) and ``name.bias`` of ``linear``."""
    kernel = linear.kernel
    entries = {f"{name}.weight": lrnnx_entry(kernel, convert=np.transpose, shape=kernel.get_value().shape[::-1])}
    if linear.bias is not None:
        entries[f"{name}.bias"] = lrnnx_entry(linear.bias)
    return entries
