"""Argument checks shared by every model, generation and conversion.

Shape and dtype checks always run (shapes are static under ``jit``). Value
checks (negative or NaN timesteps, lengths out of range, token ids out of range)
raise ``ValueError`` whenever the values are concrete, i.e. outside ``jit``. Inside
a traced function (``jit``, ``grad``, ``vmap``, ``scan``) they are skipped, unless the
function runs under :func:`checked`: then each becomes a ``checkify.check`` with the
same message, which :func:`checked` raises as that ``ValueError`` after the call.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import checkify

#: True while :func:`checked` traces its function. A jit-cache-sensitive context
#: (``jax.make_user_context``): every ``jax.jit`` (the user's and the models' own,
#: ``core.base._jit_forward`` ...) traces again under it instead of reusing a program
#: traced without the checks, and the programs traced with them are never reused outside.
_TRACED_CHECKS = jax.make_user_context(default_value=False)


def is_concrete(x) -> bool:
    """True when ``x`` holds values (not a tracer), so value checks can run."""
    return not isinstance(x, jax.core.Tracer)


def traced_checks_enabled() -> bool:
    """Whether value checks on traced values are emitted (``checkify.check``): only under :func:`checked`."""
    return bool(_TRACED_CHECKS.value)


def _traced_check(ok, message: str, *values):
    """Under :func:`checked`, ``checkify.check(ok, message, *values)`` (``{}`` in ``message`` formats ``values``
    at run time); elsewhere nothing, because an unfunctionalized ``checkify.check`` cannot be traced."""
    if traced_checks_enabled():
        checkify.check(ok, message, *values)


def checked(fn: Callable) -> Callable:
    """``fn`` with every value check of the library enforced inside ``jit`` too.

    ``fn`` is any function of models and arrays, jitted (``jax.jit``, ``nnx.jit``) or not. Outside
    ``jit`` the checks below raise ``ValueError`` as soon as they meet bad values; inside a traced
    function they are skipped (the values are unknown while tracing). ``checked(fn)`` runs ``fn``
    under ``jax.experimental.checkify`` with the checks traced as ``checkify.check``: the call returns
    ``fn``'s result, or raises the same ``ValueError``, with the same message naming the argument, as the
    check raises outside ``jit``. The checks:

    * ``lengths`` of a forward (models, ``LRUUnet``, the language model): integers in ``[0, L]``;
    * ``num_accepted`` of ``verify_step`` (models and the language model): integers in ``[0, T]``;
    * ``integration_timesteps`` (event mode): finite, then ``> 0``;
    * token ids of the language model (``input_ids``, ``ids``): in ``[0, padded_vocab_size)``.

    When several checks fail, the first one in program order is raised (under ``vmap``, the min and max
    are those of the failing row). ``checked`` must be the outermost transformation: ``checked(jax.jit(f))``,
    not ``jax.jit(checked(f))``; a ``checked`` function called inside another one simply runs (its checks
    are raised by the outer one). ``fn`` runs as one compiled program whose NNX objects (models, optimizers)
    are updated in place afterwards, as ``nnx.jit`` does, and only when no check failed.

    Build ``checked(fn)`` once and call it many times: each ``checked(fn)`` compiles its own program, and
    under it every ``jit`` inside traces again, once per shape. The checked programs are cached apart from
    the plain ones (the flag is part of JAX's jit cache key), which stay check-free and as fast as before.
    """
    def pure(graphdef, state):
        args, kwargs = nnx.merge(graphdef, state)  # the models rebuilt at this trace level, so nnx.jit can update them
        out = fn(*args, **kwargs)
        return out, nnx.state(_stateful_nodes((args, kwargs)))

    # one program (jit): the models' variables then live at the trace level of nnx.jit's write-back
    checkified = checkify.checkify(jax.jit(pure), errors=checkify.user_checks)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if traced_checks_enabled():  # inside an outer checked(): its checkify functionalizes our checks
            return fn(*args, **kwargs)
        graphdef, state = nnx.split((args, kwargs))
        with _TRACED_CHECKS(True):
            err, (out, new_state) = checkified(graphdef, state)
        if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(err)):
            raise TypeError("checked(fn) must be the outermost transformation: call checked(jax.jit(fn)), "
                            "not jax.jit(checked(fn)) (nor grad or vmap of it)")
        exception = err.get_exception()
        if exception is not None:
            if hasattr(exception, "fmt_string"):  # a failed checkify.check: its message, without "(`check` failed)"
                message = exception.fmt_string.format(*exception.args, **exception.kwargs)
            else:
                message = str(exception)
            raise ValueError(message)
        nnx.update(_stateful_nodes((args, kwargs)), new_state)  # what fn changed in the models (as nnx.jit does)
        return out

    return run


def _stateful_nodes(tree) -> list:
    """The NNX objects (models, optimizers, variables) in ``tree``, in a fixed order."""
    stateful = lambda x: isinstance(x, (nnx.Pytree, nnx.Variable))  # noqa: E731
    return [leaf for leaf in jax.tree.leaves(tree, is_leaf=stateful) if stateful(leaf)]


def check_float(x, name: str):
    """Raise ``TypeError`` unless ``x`` has a floating dtype."""
    dtype = jnp.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype (float32, bfloat16, ...), got {dtype}")


def check_sequence(x, d_model: int, name: str = "x", layout: str = "(B, L, H)"):
    """Validate a full-sequence input ``(B, L, H)`` and return it as a JAX array."""
    if not hasattr(x, "shape"):
        x = jnp.asarray(x)
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape {layout} with H={d_model}, got rank {x.ndim} shape {tuple(x.shape)}")
    if x.shape[-1] != d_model:
        raise ValueError(f"{name} must have shape {layout} with H={d_model}, got shape {tuple(x.shape)}")
    check_float(x, name)
    return x


def check_token(x_t, d_model: int, name: str = "x_t"):
    """Validate a single-step input ``(B, H)``."""
    if not hasattr(x_t, "shape"):
        x_t = jnp.asarray(x_t)
    if x_t.ndim != 2 or x_t.shape[-1] != d_model:
        raise ValueError(f"{name} must have shape (B, H) with H={d_model}, got shape {tuple(x_t.shape)}")
    check_float(x_t, name)
    return x_t


def check_cache_batch(cache, batch_size: int, key: str):
    """Raise when the cache's batch size (leading axis of ``cache[key]``) differs from ``batch_size``."""
    if not isinstance(cache, dict) or key not in cache:
        got = sorted(cache) if isinstance(cache, dict) else type(cache).__name__
        raise TypeError(f"cache must be the dict from allocate_inference_cache with key {key!r}, got {got}")
    cache_batch = cache[key].shape[0]
    if cache_batch != batch_size:
        raise ValueError(
            f"x_t has batch size {batch_size} but the cache was allocated for batch size {cache_batch}; "
            f"call allocate_inference_cache(batch_size={batch_size})"
        )


def check_cache(cache, expected, key: str):
    """Raise unless ``cache`` has the keys and shapes of ``expected`` (an abstract inference cache)."""
    check_cache_batch(cache, jax.tree.leaves(expected[key])[0].shape[0] if key in expected else 0, key)
    if sorted(cache) != sorted(expected):
        raise ValueError(f"cache must have the keys {sorted(expected)} of allocate_inference_cache, got {sorted(cache)}")
    for name in expected:
        got, want = cache[name], expected[name]
        if tuple(got.shape) != tuple(want.shape):
            raise ValueError(f"cache[{name!r}] must have shape {tuple(want.shape)} (allocate_inference_cache), "
                             f"got {tuple(got.shape)}")
        if jnp.iscomplexobj(want) != jnp.iscomplexobj(got) or not jnp.issubdtype(got.dtype, jnp.inexact):
            raise TypeError(f"cache[{name!r}] must have a dtype like {want.dtype}, got {got.dtype}")


def check_lengths(lengths, batch: int, length: int, name: str = "lengths") -> Optional[jax.Array]:
    """Validate ``lengths (B,)`` integers in ``[0, L]`` and return the ``(B, L)`` validity mask."""
    if lengths is None:
        return None
    if not hasattr(lengths, "shape"):
        lengths = jnp.asarray(lengths)
    if lengths.shape != (batch,):
        raise ValueError(f"{name} must have shape (B,) = ({batch},), got {tuple(lengths.shape)}")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"{name} must be integers, got dtype {lengths.dtype}")
    _check_values_within(lengths, 0, length, f"{name} must lie in [0, L={length}], got min {{}} and max {{}}")
    return jnp.arange(length)[None, :] < lengths[:, None]


def _check_values_within(a, low: int, high: int, message: str):
    """``ValueError(message.format(min, max))`` unless every value of the integer array ``a`` lies in ``[low, high]``:
    at once when ``a`` is concrete, else a traced check under :func:`checked`."""
    if is_concrete(a):
        values = np.asarray(a)
        if values.size and (values.min() < low or values.max() > high):
            raise ValueError(message.format(values.min(), values.max()))
    elif a.size:
        _traced_check(jnp.all((a >= low) & (a <= high)), message, jnp.min(a), jnp.max(a))


def check_timesteps(integration_timesteps, shape: tuple[int, ...], name: str = "integration_timesteps"):
    """Validate event-mode timesteps and return them with shape ``shape`` (float).

    Accepts exactly ``shape`` or ``shape + (1,)``. Values must be finite and > 0.
    """
    if integration_timesteps is None:
        return None
    tau = integration_timesteps if hasattr(integration_timesteps, "shape") else jnp.asarray(integration_timesteps)
    if tuple(tau.shape) == tuple(shape) + (1,):
        tau = tau[..., 0]
    if tuple(tau.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tau.shape)}")
    check_float(tau, name)
    not_finite = f"{name} must be finite, got NaN or inf"
    not_positive = f"{name} must be > 0 (time between events), got min {{}}"
    if is_concrete(tau):
        values = np.asarray(tau, dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError(not_finite)
        if np.any(values <= 0):
            raise ValueError(not_positive.format(np.asarray(tau).min()))  # the min in tau's dtype, as traced
    elif tau.size:
        _traced_check(jnp.all(jnp.isfinite(tau)), not_finite)
        _traced_check(jnp.all(tau > 0), not_positive, jnp.min(tau))
    return tau


def check_id_values(ids, num_ids: int, name: str):
    """Raise ``ValueError`` unless the integer ``ids`` lie in ``[0, num_ids)`` (token ids, positions); a traced
    check under :func:`checked`. Shapes and dtypes are the caller's to check."""
    _check_values_within(ids, 0, num_ids - 1, f"{name} must lie in [0, {num_ids}), got min {{}} and max {{}}")


def reject_timesteps(integration_timesteps, model_name: str):
    """Raise for models that have no event mode, so timesteps are never silently ignored."""
    if integration_timesteps is not None:
        raise ValueError(
            f"{model_name} has no event mode and does not use integration_timesteps; "
            "pass integration_timesteps=None"
        )


def check_positive_int(value, name: str) -> int:
    """``value`` as an ``int``; ``ValueError`` naming ``name`` unless it is an integer >= 1 (not a bool)."""
    if not _is_positive_int(value):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _is_positive_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= 1


def check_chunk_size(chunk_size, name: str = "chunk_size") -> Optional[int]:
    """A scan's ``chunk_size``: a positive integer, or None (one chunk, the unchunked scan)."""
    if chunk_size is None:
        return None
    if not _is_positive_int(chunk_size):
        raise ValueError(f"{name} must be a positive integer or None, got {chunk_size!r}")
    return int(chunk_size)


def check_cache_size(batch_size, max_seqlen) -> tuple[int, int]:
    """The arguments of ``allocate_inference_cache``: ``batch_size`` and ``max_seqlen`` positive integers
    (as :func:`lrnnx_jax.generation.capture_graph` requires them)."""
    return check_positive_int(batch_size, "batch_size"), check_positive_int(max_seqlen, "max_seqlen")
