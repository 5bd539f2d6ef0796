"""Compile-once autoregressive generation: each output is fed back as the next input.

The names mirror ``lrnnx.utils.generation``, so code written against lrnnx runs
with only its import changed::

    graph = capture_graph(model, batch_size=32)        # compiles once, ahead of time
    ys = generate(model, x0, 512, graph_cache=graph)   # (32, 512, H); compiles no generation program

lrnnx captures one recurrent step as a CUDA graph and replays it from a Python
loop, once per token. Here the whole generation is one compiled program, a driver
of the model's cell (``model.cell()``, the one definition of its step):

* **The XLA program** (:func:`xla_program`) advances exactly ``num_valid <=
  chunk_size`` steps: a ``lax.while_loop`` over whole blocks of ``block_size`` steps
  (each a ``lax.scan`` with a static trip count), then the remainder as a binary
  decomposition, one ``lax.cond``-guarded scan of 2^k steps for each bit of it. The
  cost therefore follows the number of steps with no block granularity (one more
  step costs about one step), and no surplus step is ever run. Its steps run
  :func:`pallas_kernels.drivers.step` (the one-step kernel where the kernel
  configuration and the cell's policy select it).
* **The fused program** (:func:`pallas_kernels.fused_generation.fused_program`) runs
  the whole chunk in one Pallas kernel; it is chosen where the kernel configuration
  and the cell's :class:`~pallas_kernels.cells.KernelPolicy` select it
  (:func:`pallas_kernels.fused_generation.use_fused_rollout`).

``generate`` calls the program ``ceil(num_steps / chunk_size)`` times, handing the
last output and cache of one call to the next, so one compiled program serves any
``num_steps``; the calls are dispatched asynchronously, with no host sync between
them. The parameters are an argument of the program (the model's pytree leaves),
never constants baked into it: after an optimizer step the same program uses the
new weights. Each generation starts from the zero state of ``allocate_inference_cache``.

Compilation: :func:`capture_graph` compiles the program ahead of time. Besides it,
``generate`` slices the program's fixed-size output buffers to ``(B, num_steps, H)``
(:func:`assemble`) unless ``num_steps`` is ``chunk_size``: on the CPU with NumPy (no
compilation); on an accelerator an array of a new shape needs an XLA program, so each
distinct ``num_steps`` compiles one small slicing program once (a repeated ``num_steps``
compiles nothing). The kernel configuration (``kernel_config=``, a
``pallas_kernels.KernelConfig``; the default when None) is part of every program's key.
"""

from __future__ import annotations

import collections
import collections.abc
import dataclasses
import functools
import os
import pathlib
import time
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lrnnx_jax import parallel
from lrnnx_jax.core import validation
from lrnnx_jax.core.base import compute_dtype
from lrnnx_jax.decoding import flatten_model
from pallas_kernels import dispatch as kernel_dispatch
from pallas_kernels import drivers
from pallas_kernels import fused_generation

#: ``GenerationConfig.unroll`` on GPUs and TPUs (on an H100, 8 ran 1.2-5x faster per step than 1;
#: ``python -m benchmarks.run_all --unroll 1,8`` measures it), unless the cell's policy sets its own
#: (``KernelPolicy.xla_unroll``: a long step compiles faster with a smaller one, at the same speed).
ACCELERATOR_UNROLL = 8


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How the XLA generation program is built (its knobs, in one place; the kernel knobs are
    ``pallas_kernels.KernelConfig``).

    Args:
      chunk_size: steps per program call; the program's output buffer is
        ``(B, chunk_size, H)``, and ``generate`` makes ``ceil(num_steps / chunk_size)`` calls.
      block_size: steps per iteration of the program's dynamic loop (a power of two), a
        ``lax.scan`` with a static trip count inside; the remainder of a call runs as scans
        of the powers of two below it. A dynamic trip count costs a device-to-host round
        trip per iteration on a GPU (unless XLA captures the loop in a command buffer); a
        static one costs none. Capped at the largest power of two <= ``chunk_size``.
      unroll: the ``unroll`` of those scans (steps per iteration of XLA's inner loop);
        None: on accelerators the cell's ``KernelPolicy.xla_unroll`` or else
        :data:`ACCELERATOR_UNROLL` (8, which saves loop overhead per step), and 1 on CPU,
        where unrolling only lengthens compilation. The program holds about
        ``5 * unroll`` copies of the step (the blocks and the remainder's scans), so
        ``capture_graph``'s compile time follows it.
      compiler_options: XLA options the generation program is compiled with (a mapping
        of option names to values, as ``jax.stages.Lowered.compile`` takes them, e.g.
        ``{"xla_gpu_autotune_level": 0}``; kept as a sorted tuple of pairs, so the config
        stays hashable); None: XLA's defaults. They apply to the whole compiled program
        (for the fused program, to the XLA code around its kernel). On an H200,
        ``xla_gpu_autotune_level=0`` shortened S7's capture by 0.4-2.8 s but made its
        step at B=32 1.6x slower, and ``{"xla_gpu_enable_triton_gemm": False}`` (cuBLAS for
        every GEMM, no Triton GEMM candidates to compile) took its capture at B=32 from
        3.0-3.5 to 1.3 s for a 4 % slower step (BENCHMARKS.md §9), so the default keeps
        XLA's autotuning.
    """

    chunk_size: int = 512
    block_size: int = 64
    unroll: Optional[int] = None
    compiler_options: Any = None

    def __post_init__(self):
        validation.check_positive_int(self.chunk_size, "chunk_size")
        validation.check_positive_int(self.block_size, "block_size")
        if self.unroll is not None:
            validation.check_positive_int(self.unroll, "unroll")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        object.__setattr__(self, "compiler_options", _option_pairs(self.compiler_options or {}))

    def resolved(self, accelerator_unroll: int = ACCELERATOR_UNROLL) -> "GenerationConfig":
        """This config with ``unroll=None`` replaced by the platform's default: 1 on CPU, ``accelerator_unroll``
        elsewhere (the cell's ``KernelPolicy.xla_unroll`` where it sets one)."""
        if self.unroll is not None:
            return self
        return dataclasses.replace(self, unroll=1 if jax.default_backend() == "cpu" else accelerator_unroll)

    @property
    def block(self) -> int:
        """The block size in effect: ``block_size`` capped at the largest power of two <= ``chunk_size``."""
        return min(self.block_size, 1 << (self.chunk_size.bit_length() - 1))


def _option_pairs(options) -> tuple:
    """``options`` (a mapping of XLA option names to values, or such pairs) as a sorted tuple of pairs."""
    if isinstance(options, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in options):
        options = dict(options)
    if not isinstance(options, collections.abc.Mapping):
        raise TypeError(f"compiler_options must be a mapping of XLA option names to values or None, got "
                        f"{type(options).__name__}")
    for name, value in options.items():
        if not isinstance(name, str) or not isinstance(value, (bool, int, float, str)):
            raise TypeError(f"compiler_options must map option names (str) to bool, int, float or str values, got "
                            f"{name!r}: {value!r}")
    return tuple(sorted(options.items()))


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
    """Everything a program builder needs; also the key of the compiled-program cache.

    ``treedef`` and ``leaf_types`` describe the model as a pytree (structure, static
    attributes, parameter shapes and dtypes). ``kernels`` is the kernel configuration
    the program is traced under, and ``fused`` whether it is the fused Pallas program.
    """

    treedef: Any
    leaf_types: tuple
    batch_size: int
    d_model: int
    dtype: Any
    event_mode: bool
    max_seqlen: int
    config: GenerationConfig
    kernels: kernel_dispatch.KernelConfig
    fused: bool
    #: the batch's ``NamedSharding`` (``lrnnx_jax.parallel.batch_sharding``) the program is compiled for; None: one device
    sharding: Any = None

    def __post_init__(self):
        object.__setattr__(self, "config", self.config.resolved())  # a concrete unroll (where not already), in the key

    @property
    def chunk_size(self) -> int:
        return self.config.chunk_size


def xla_program(spec: ProgramSpec) -> Callable:
    """The XLA generation program for ``spec``.

    Returns ``generation_program(leaves, x, cache, taus, num_valid) -> (ys, x_next, cache)``:

    * ``leaves``: the model's pytree leaves (its parameters);
    * ``x (B, H)``: the input of the first step; ``cache``: the state before it;
    * ``taus (B, chunk_size)``: per-step ``integration_timesteps`` (event mode) or None;
    * ``num_valid``: int32 scalar in ``[1, chunk_size]``, the steps to run;
    * ``ys (B, chunk_size, H)``: the outputs; steps ``>= num_valid`` are zeros;
    * ``x_next (B, H)``, ``cache``: the last output and the state after exactly ``num_valid`` steps.
    """
    chunk, unroll, block = spec.config.chunk_size, spec.config.unroll, spec.config.block
    dtype, kernels = spec.dtype, spec.kernels

    def generation_program(leaves, x, cache, taus, num_valid):
        model = jax.tree.unflatten(spec.treedef, leaves)
        batch = x.shape[0]
        cell = model.cell()
        taus = None if taus is None else jnp.moveaxis(taus, 1, 0)

        def one_step(carry, tau_t):
            x_t, state = carry
            inputs = model.cell_inputs((batch,), tau_t)
            y_t, state = drivers.step(cell, state, x_t.astype(compute_dtype(dtype)), inputs, kernels)
            y_t = y_t.astype(dtype)
            return (y_t, state), y_t

        def run(size, start, x_t, state, ys):
            tau_block = None if taus is None else jax.lax.dynamic_slice_in_dim(taus, start, size)
            (x_t, state), y_block = jax.lax.scan(one_step, (x_t, state), tau_block, length=size, unroll=min(unroll, size))
            return x_t, state, jax.lax.dynamic_update_slice_in_dim(ys, y_block, start, axis=0)

        def whole_block(carry):
            i, x_t, state, ys = carry
            return (i + 1, *run(block, i * block, x_t, state, ys))

        ys = jnp.zeros((chunk, *x.shape), dtype)
        state = model.cell_state(cache)
        _, x, state, ys = jax.lax.while_loop(lambda c: c[0] < num_valid // block, whole_block, (0, x, state, ys))
        start, size = num_valid // block * block, block // 2
        while size >= 1:  # the remainder (< block): one guarded scan per bit
            def part(carry, size=size):
                start, x_t, state, ys = carry
                return (start + size, *run(size, start, x_t, state, ys))

            start, x, state, ys = jax.lax.cond(num_valid & size != 0, part, lambda c: c, (start, x, state, ys))
            size //= 2
        # time-major while it is written (measured on an H200: writing each block batch-major in place instead was
        # not faster, 34.1 against 33.4-33.7 us per step for S5 at B=4096; benchmarks/results/session15_h200/call2)
        return jnp.moveaxis(ys, 0, 1), x, model.cell_cache(state, cache)

    return generation_program


DEFAULT_CONFIG = GenerationConfig()


def build_program(spec: ProgramSpec) -> Callable:
    """The dispatch point: the pure function that :func:`capture_graph` compiles for ``spec``.

    Returns ``(leaves, x, cache, taus, num_valid) -> (ys (B, chunk_size, H), x_next, cache, all_finite)``: the
    program of :func:`xla_program` or :func:`pallas_kernels.fused_generation.fused_program` (the steps from
    ``num_valid`` on hold unspecified values), and whether each row's first ``num_valid`` outputs are finite
    (``(B,)`` bool, per row so that a sharded batch needs no collective; read by :func:`watch_finite` without
    waiting for it).
    """
    program = fused_generation.fused_program(spec) if spec.fused else xla_program(spec)

    @functools.wraps(program)  # its name, in compilation logs
    def checked_program(leaves, x, cache, taus, num_valid):
        ys, x_next, cache = program(leaves, x, cache, taus, num_valid)
        run = (jnp.arange(ys.shape[1]) < num_valid)[None, :, None]
        return ys, x_next, cache, jnp.all(jnp.isfinite(ys) | ~run, axis=(1, 2))

    return checked_program


@functools.lru_cache(maxsize=256)
def _fused_of_structure(treedef, leaf_types: tuple, batch_size: int, dtype, event_mode: bool,
                        kernels: kernel_dispatch.KernelConfig, on_gpu: bool, sharding=None) -> bool:
    """:func:`pallas_kernels.fused_generation.use_fused_rollout`, once per model structure, kernel configuration and
    batch sharding (decided under the sharding's mesh: the fused kernel then runs per shard)."""
    model = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(t.shape, t.dtype) for t in leaf_types])
    with parallel.mesh_context(sharding):
        return fused_generation.use_fused_rollout(model, batch_size, event_mode, dtype, kernels)


def assemble(blocks, num_steps: int, sharding=None):
    """Batch-major ``(B, chunk_size, H)`` blocks -> ``(B, num_steps, H)``, placed with the batch ``sharding``
    (None: one device).

    One whole block is returned as it is. Otherwise an array of a new shape needs a new XLA program, so on an
    accelerator each distinct ``num_steps`` compiles one small slicing program once. On the CPU, whose device memory
    is host memory, the blocks are sliced by NumPy and put back: no compilation at all.
    """
    if len(blocks) == 1 and blocks[0].shape[1] == num_steps:
        ys = blocks[0]
    elif _on_cpu(blocks):
        ys = np.concatenate([np.asarray(block) for block in blocks], axis=1)[:, :num_steps]
        place = next(iter(blocks[0].devices())) if sharding is None else sharding
        return jax.device_put(ys, place)
    else:
        ys = _assemble(tuple(blocks), num_steps)
    return ys if sharding is None else jax.device_put(ys, sharding)  # a no-op where XLA kept the rows in place


def _on_cpu(arrays) -> bool:
    """Whether every device of every array is a CPU (whose device memory is host memory)."""
    return all(device.platform == "cpu" for array in arrays for device in array.devices())


#: the finiteness flags of generations whose values the host has not read yet (:func:`watch_finite`)
_PENDING_FINITE = collections.deque()
_NONFINITE_REPORTED = []


def watch_finite(flags) -> None:
    """Warn (once per process) if a generation's outputs were not finite, without waiting for them.

    ``flags`` are the ``(B,)`` device bool arrays of one generation's program calls. They are read when they are ready:
    here if they already are (on the CPU: here, waiting for them), else by a later ``generate`` or at the
    interpreter's exit. A host callback inside the program would instead hold the host until the
    kernels before it finished, and cost 300-600 µs per call on an H200 (BENCHMARKS.md §10).
    """
    if _NONFINITE_REPORTED:
        return
    for flag in flags:
        flag.copy_to_host_async()
    _register_exit_check()
    _PENDING_FINITE.extend(flags)
    report_ready_flags(wait=_on_cpu(flags))


def report_ready_flags(wait: bool = False) -> None:
    """Read the watched flags that are ready (``wait``: all of them) and warn if one is false."""
    while _PENDING_FINITE and (wait or _PENDING_FINITE[0].is_ready()):
        report_nonfinite(np.all(np.asarray(_PENDING_FINITE.popleft())))
    if _NONFINITE_REPORTED:
        _PENDING_FINITE.clear()


@functools.cache
def _register_exit_check() -> None:
    """The flags still unread at exit are read then (registered after jax's own exit handlers, so run before them)."""
    import atexit

    atexit.register(report_ready_flags, wait=True)


def report_nonfinite(all_finite) -> None:
    """Warn (once per process) that a generation produced inf or NaN: a model fed its own outputs is a closed
    loop, and an untrained (or unstable) one can diverge."""
    if not bool(all_finite) and not _NONFINITE_REPORTED:
        _NONFINITE_REPORTED.append(True)
        warnings.warn("generate produced non-finite values (inf or NaN): the closed loop of this model, fed its own "
                      "outputs, diverges (common for untrained models; scale the seed input down or check the model's "
                      "stability). This warning is shown once.", RuntimeWarning, stacklevel=6)


#: the slicing program is a copy: XLA's optimisation passes only cost compile time (on an H200, 5 new step
#: counts compiled in 0.67 s with the defaults and 0.23 s with these; BENCHMARKS.md §5)
SLICING_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                            "xla_gpu_autotune_level": 0}


@functools.partial(jax.jit, static_argnames="num_steps", compiler_options=SLICING_COMPILER_OPTIONS)
def _assemble(blocks, num_steps: int):
    ys = blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=1)
    return ys[:, :num_steps]


class CompiledGenerator:
    """A generation program compiled ahead of time for one batch size (lrnnx's ``CUDAGraphStepCache``).

    Attributes:
      batch_size, event_mode, dtype, d_model: what it was captured for.
      sharding: the batch's ``NamedSharding`` it was compiled for (None: one device).
      compiled: the ``jax.stages.Compiled`` executable.
      compile_time_s: seconds spent tracing, lowering and compiling it.
      spec: its :class:`ProgramSpec` (model structure, sizes, config).
    """

    def __init__(self, spec: ProgramSpec):
        _check_eval_mode(jax.tree.unflatten(spec.treedef, spec.leaf_types))
        self.spec = spec
        self.batch_size, self.event_mode = spec.batch_size, spec.event_mode
        self.dtype, self.d_model, self.sharding = spec.dtype, spec.d_model, spec.sharding
        # with a batch sharding: the rows (input, cache, timesteps) split over its mesh, everything else replicated
        rows = spec.sharding
        whole = None if rows is None else parallel.replicated(rows.mesh)
        leaf_types = [jax.ShapeDtypeStruct(t.shape, t.dtype, weak_type=t.weak_type, sharding=whole) for t in spec.leaf_types]
        cache_types = jax.eval_shape(
            lambda leaves: jax.tree.unflatten(spec.treedef, leaves).allocate_inference_cache(
                spec.batch_size, spec.max_seqlen, dtype=spec.dtype
            ),
            leaf_types,
        )
        cache_types = jax.tree.map(lambda t: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=rows), cache_types)
        # allocate_inference_cache returns zeros; building them from NumPy compiles nothing
        self._initial_cache = jax.tree.map(lambda t: jax.device_put(np.zeros(t.shape, t.dtype), t.sharding), cache_types)
        self._counts = {}  # steps -> the device's int32 num_valid (:meth:`_num_valid`)
        chunk = spec.config.chunk_size
        taus_type = None
        if spec.event_mode:
            taus_type = jax.ShapeDtypeStruct((spec.batch_size, chunk), compute_dtype(spec.dtype), sharding=rows)
        start = time.perf_counter()
        with parallel.mesh_context(rows):
            self.lowered = jax.jit(build_program(spec)).lower(
                leaf_types,
                jax.ShapeDtypeStruct((spec.batch_size, spec.d_model), spec.dtype, sharding=rows),
                cache_types,
                taus_type,
                jax.ShapeDtypeStruct((), jnp.int32, sharding=whole),
            )
            self.compiled = self.lowered.compile(dict(spec.config.compiler_options))
        self.compile_time_s = time.perf_counter() - start

    def __repr__(self):
        return (
            f"CompiledGenerator(batch_size={self.batch_size}, H={self.d_model}, dtype={jnp.dtype(self.dtype).name}, "
            f"event_mode={self.event_mode}, {self.spec.config}, compile_time_s={self.compile_time_s:.3f}"
            + ("" if self.sharding is None else f", sharded over {len(self.sharding.device_set)} devices") + ")"
        )

    def rollout(self, leaves, x, taus: Optional[np.ndarray], num_steps: int):
        """Run ``num_steps`` steps from a fresh state; inputs already validated. Returns ``(B, num_steps, H)``."""
        chunk, rows = self.spec.config.chunk_size, self.sharding
        starts = range(0, num_steps, chunk)
        if taus is None:
            tau_chunks = [None] * len(starts)
        elif taus.shape[1] == 1:  # one timestep reused at every step, as in lrnnx
            tau_chunks = [jax.device_put(np.broadcast_to(taus, (taus.shape[0], chunk)), rows)] * len(starts)
        else:  # a per-step schedule, padded with ones (valid values, whose steps are dropped)
            taus = np.pad(taus, ((0, 0), (0, -num_steps % chunk)), constant_values=1)
            tau_chunks = [jax.device_put(taus[:, start : start + chunk], rows) for start in starts]
        num_valid = [self._num_valid(min(chunk, num_steps - start)) for start in starts]
        if rows is not None:  # the program's placement: parameters on every device, the rows split (no-ops when so)
            leaves = jax.device_put(leaves, parallel.replicated(rows.mesh))
            x = jax.device_put(x, rows)
        cache, blocks, flags = self._initial_cache, [], []
        for n, tau_chunk in zip(num_valid, tau_chunks):
            ys, x, cache, all_finite = self.compiled(leaves, x, cache, tau_chunk, n)
            blocks.append(ys)
            flags.append(all_finite)
        ys = assemble(blocks, num_steps, rows)
        watch_finite(flags)
        return ys

    def _num_valid(self, steps: int):
        """The program's ``num_valid`` argument for ``steps``, put on the device once: a host scalar would be copied
        to the device at every call, and the program would wait for that copy (about 150 µs on an H200)."""
        if steps not in self._counts:
            place = None if self.sharding is None else parallel.replicated(self.sharding.mesh)
            self._counts[steps] = jax.device_put(np.int32(steps), place)
        return self._counts[steps]


def _leaf_types(leaves) -> tuple:
    return tuple(jax.typeof(leaf) for leaf in leaves)


def _check_eval_mode(model):
    """``ValueError`` unless ``model`` is in eval mode. A generator checks its spec's structure when it is built
    (:class:`CompiledGenerator`), once: a module's mode is part of its structure (``nnx.Dropout``'s ``deterministic``
    is static, in the treedef), so a model of the captured structure is in eval mode, and walking its modules again
    at every call (40-260 µs on the host) would check nothing new."""
    if model.dropout_active():
        raise ValueError(
            f"{type(model).__name__} is in training mode (active dropout), and generation runs the model in eval mode; "
            "call model.eval() before capture_graph or generate")


def _model_spec(model, leaves, treedef, batch_size, dtype, event_mode, max_seqlen, config, kernel_config,
                sharding=None) -> ProgramSpec:
    """The spec of the module ``model`` whose ``jax.tree.flatten`` is ``(leaves, treedef)`` (:func:`flatten_model`);
    the fused program where the kernel configuration selects it."""
    leaf_types, dtype, event_mode = _leaf_types(leaves), jnp.dtype(dtype), bool(event_mode)
    kernels = kernel_dispatch.resolve(kernel_config)
    config = DEFAULT_CONFIG if config is None else config
    if not isinstance(config, GenerationConfig):
        raise TypeError(f"config must be a GenerationConfig or None, got {type(config).__name__}")
    config = config.resolved(fused_generation.abstract_cell(model).policy.xla_unroll or ACCELERATOR_UNROLL)
    fused = _fused_of_structure(treedef, leaf_types, batch_size, dtype, event_mode, kernels, kernel_dispatch.on_nvidia_gpu(),
                                sharding)
    return ProgramSpec(treedef=treedef, leaf_types=leaf_types, batch_size=batch_size, d_model=model.d_model,
                       dtype=dtype, event_mode=event_mode, max_seqlen=max_seqlen, config=config, kernels=kernels,
                       fused=fused, sharding=sharding)


def _check_event_mode(model, event_mode: bool):
    if event_mode and not getattr(model, "supports_integration_timesteps", False):
        raise ValueError(
            f"{type(model).__name__} has no event mode and does not use integration_timesteps; "
            "use event_mode=False and integration_timesteps=None"
        )


def enable_compilation_cache(directory) -> pathlib.Path:
    """Keep every compiled program in ``directory`` across processes (JAX's persistent compilation cache).

    ``capture_graph`` compiles the generation program (and, on a GPU, its Pallas kernels); with the cache a later
    process that captures the same program (model structure, batch size, configuration, device) loads it instead
    of compiling it. It applies to every jitted program of the process, a training step too (LRU's on an H200:
    11.7 s to compile in a first process, 0.2 s in the next). Every program is kept, however quick to compile
    (JAX's own default keeps those over one second). Call it before the first compilation; it sets
    ``jax_compilation_cache_dir``, ``jax_persistent_cache_min_compile_time_secs=0`` and
    ``jax_persistent_cache_min_entry_size_bytes=0``.

    Args:
      directory: a path (created when missing).

    Returns:
      The directory, as a ``pathlib.Path``.
    """
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a str or os.PathLike, got {type(directory).__name__}")
    path = pathlib.Path(directory).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def capture_graph(
    model,
    batch_size: int,
    H: Optional[int] = None,
    max_seqlen: int = 1,
    event_mode: bool = False,
    dtype=None,
    *,
    config: Optional[GenerationConfig] = None,
    kernel_config: Optional[kernel_dispatch.KernelConfig] = None,
    sharding=None,
) -> CompiledGenerator:
    """Compile the generation program of ``model`` ahead of time for one batch size.

    Args:
      model: any lrnnx_jax model, or a :class:`CapturedModel` of one.
      batch_size: the batch size B it will serve.
      H: input width; defaults to ``model.d_model`` and must equal it when given.
      max_seqlen: passed to ``allocate_inference_cache``.
      event_mode: whether ``generate`` will receive ``integration_timesteps``.
      dtype: dtype of ``x`` and of the outputs (default float32).
      config: a :class:`GenerationConfig` (chunk and block sizes, unroll of the XLA program).
      kernel_config: a ``pallas_kernels.KernelConfig`` (the default when None): whether the
        fused Pallas program or the XLA program runs (with the cell's policy), and the kernels'
        tuning.
      sharding: the batch's ``NamedSharding`` (``lrnnx_jax.parallel.batch_sharding(mesh)``, or
        ``parallel.batch_sharding_of(x)``) for a batch sharded over devices: each device runs its rows, the
        parameters replicated (no kernels: see :mod:`lrnnx_jax.parallel`). None: one device.

    Returns:
      A :class:`CompiledGenerator` for ``generate(..., graph_cache=...)``. It serves
      any ``num_steps``, any input values and any parameter values of a model with
      this structure.
    """
    batch_size = validation.check_positive_int(batch_size, "batch_size")
    max_seqlen = validation.check_positive_int(max_seqlen, "max_seqlen")
    model, leaves, treedef = flatten_model(model)
    if H is not None and H != model.d_model:
        raise ValueError(f"H={H} disagrees with the model's d_model={model.d_model}; pass H={model.d_model} or H=None")
    _check_event_mode(model, event_mode)
    dtype = jnp.dtype(jnp.float32 if dtype is None else dtype)
    validation.check_float(np.zeros((), dtype), "dtype")
    spec = _model_spec(model, leaves, treedef, batch_size, dtype, event_mode, max_seqlen, config, kernel_config,
                       _check_sharding(sharding, batch_size))
    return CompiledGenerator(spec)


def _check_sharding(sharding, batch_size: int):
    """``sharding`` as a batch sharding over several devices (None for one device), checked against the batch."""
    if sharding is None:
        return None
    if not isinstance(sharding, jax.sharding.NamedSharding):
        raise TypeError(f"sharding must be a NamedSharding (lrnnx_jax.parallel.batch_sharding(mesh)) or None, got "
                        f"{type(sharding).__name__}")
    sharding = parallel.as_batch_sharding(sharding)
    if sharding is None:
        return None
    parts = sharding.mesh.shape[sharding.spec[0]]
    if batch_size % parts:
        raise ValueError(f"batch_size={batch_size} cannot be split evenly over the {parts} devices of mesh axis "
                         f"{sharding.spec[0]!r}; use a multiple of {parts}")
    return sharding


_GENERATORS: "collections.OrderedDict[ProgramSpec, CompiledGenerator]" = collections.OrderedDict()
_MAX_GENERATORS = 32


def _cached_generator(spec: ProgramSpec) -> CompiledGenerator:
    """The generator for ``spec``, compiled on first use (least recently used are dropped)."""
    generator = _GENERATORS.pop(spec, None) or CompiledGenerator(spec)
    _GENERATORS[spec] = generator
    while len(_GENERATORS) > _MAX_GENERATORS:
        _GENERATORS.popitem(last=False)
    return generator


def _as_input(x, dtype):
    """``x`` as a device array of ``dtype`` (NumPy inputs are cast on the host, compiling nothing)."""
    if isinstance(x, jax.Array):
        if x.dtype != dtype:
            raise ValueError(
                f"x has dtype {x.dtype} but the generator was captured for {jnp.dtype(dtype).name}; "
                f"pass x.astype({jnp.dtype(dtype).name}) or re-capture with capture_graph(..., dtype={x.dtype.name})"
            )
        return x
    return jax.device_put(np.asarray(x, dtype))


def _check_timesteps(integration_timesteps, batch_size: int, num_steps: int, dtype) -> np.ndarray:
    tau = np.asarray(integration_timesteps)
    if tau.ndim != 2 or tau.shape[1] not in (1, num_steps):
        raise ValueError(
            f"integration_timesteps must have shape (B, 1) or (B, num_steps) = ({batch_size}, 1) or "
            f"({batch_size}, {num_steps}), got {tuple(tau.shape)}"
        )
    tau = validation.check_timesteps(tau, (batch_size, tau.shape[1]))
    return np.asarray(tau, compute_dtype(dtype))


def generate(
    model,
    x,
    num_steps: int,
    graph_cache: Optional[CompiledGenerator] = None,
    integration_timesteps=None,
    *,
    config: Optional[GenerationConfig] = None,
    kernel_config: Optional[kernel_dispatch.KernelConfig] = None,
):
    """Closed-loop generation from a fresh state: output t is the input of step t + 1.

    A model fed its own outputs is a closed loop: an untrained or unstable one can diverge to inf or NaN (a
    random layer's gain above one grows geometrically; S7's input-dependent terms grow faster). ``generate``
    warns once per process when its output is not finite: on the CPU before it returns; on an accelerator, whose
    outputs it does not wait for, when the check's result is ready (at the latest in a later ``generate``, or at
    exit; :func:`watch_finite`).

    Args:
      model: any lrnnx_jax model, or a :class:`CapturedModel` of one: its module tree is then not walked at each call
        (the capture's Variables are read: in-place updates of their values are seen, structural changes are not).
      x: ``(B, H)`` input of the first step. A batch sharded over devices (``lrnnx_jax.parallel.shard_batch``)
        runs each device's rows there, and the outputs keep its sharding; with a ``graph_cache``, ``x`` is placed
        with the sharding it was captured for.
      num_steps: number of generated steps (>= 1).
      graph_cache: a :class:`CompiledGenerator` from :func:`capture_graph`; the call
        then never compiles. Without one, a generator is compiled on first use and
        cached per (model structure, batch size, dtype, event mode, config, batch sharding).
      integration_timesteps: event mode only; ``(B, 1)`` reused at every step (as in
        lrnnx) or ``(B, num_steps)``, a per-step schedule.
      config: a :class:`GenerationConfig`, only without ``graph_cache``.
      kernel_config: a ``pallas_kernels.KernelConfig`` (the default when None), only without
        ``graph_cache``.

    Returns:
      ``(B, num_steps, H)`` outputs, in ``x``'s dtype (the captured dtype with a ``graph_cache``).
    """
    if graph_cache is not None and (config is not None or kernel_config is not None):
        raise ValueError("config and kernel_config apply only without graph_cache; the graph_cache already fixes them")
    model, leaves, treedef = flatten_model(model)
    d_model = model.d_model if graph_cache is None else graph_cache.d_model
    x = validation.check_token(x, d_model, name="x")
    num_steps = validation.check_positive_int(num_steps, "num_steps")
    batch_size = x.shape[0]
    if graph_cache is None:
        _check_event_mode(model, integration_timesteps is not None)
        dtype = jax.dtypes.canonicalize_dtype(x.dtype)
        event_mode = integration_timesteps is not None
        sharding = _check_sharding(parallel.batch_sharding_of(x), batch_size)
        graph_cache = _cached_generator(_model_spec(model, leaves, treedef, batch_size, dtype, event_mode, 1, config,
                                                    kernel_config, sharding))
    else:
        if batch_size != graph_cache.batch_size:
            raise ValueError(
                f"Batch size {batch_size} != captured {graph_cache.batch_size}. "
                f"Re-capture with capture_graph(model, batch_size={batch_size})."
            )
        if graph_cache.event_mode and integration_timesteps is None:
            raise ValueError(
                "graph_cache was captured with event_mode=True: pass integration_timesteps of shape (B, 1) or "
                "(B, num_steps), or re-capture with capture_graph(model, batch_size, event_mode=False)"
            )
        if not graph_cache.event_mode and integration_timesteps is not None:
            raise ValueError(
                "integration_timesteps given but graph_cache was captured without event_mode; "
                f"re-capture with capture_graph(model, batch_size={batch_size}, event_mode=True)"
            )
        if graph_cache.sharding is None and parallel.batch_sharding_of(x) is not None:
            raise ValueError(
                f"x is sharded over {len(x.sharding.device_set)} devices but graph_cache was captured for one device; "
                "re-capture with capture_graph(model, batch_size, sharding=lrnnx_jax.parallel.batch_sharding_of(x))")
        if treedef != graph_cache.spec.treedef or _leaf_types(leaves) != graph_cache.spec.leaf_types:
            _check_eval_mode(model)  # a model put in training mode since the capture: say so
            raise ValueError(
                f"graph_cache was captured for a model of another structure or parameter shapes than this "
                f"{type(model).__name__}; re-capture with capture_graph(model, batch_size={batch_size})"
            )
    dtype = graph_cache.dtype
    taus = None
    if integration_timesteps is not None:
        taus = _check_timesteps(integration_timesteps, batch_size, num_steps, dtype)
    return graph_cache.rollout(leaves, _as_input(x, dtype), taus, num_steps)


# Token generation for the language model (lrnnx_jax.decoding), under the generation namespace users import.
from lrnnx_jax.decoding import CapturedModel, GenerationStats, Speculative, generate_tokens  # noqa: E402
