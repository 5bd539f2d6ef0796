"""``diagonal_scan``: the diagonal linear recurrence ``h_t = a_t * h_{t-1} + b_t`` over a sequence, forward and
backward, for training.

For every batch row and state lane ``s`` (shapes below)::

    h_t = a_t * h_{t-1} + b_t          h_{-1} = h0;   where mask_t is False: h_t = h_{t-1}

with real or complex ``a``, ``b``, ``h``; ``a`` per step ``(batch, L, S)`` (time-varying: RG-LRU, S7, event-mode S5)
or one ``(S,)`` for every step (time-invariant: LRU, S5, S4D, Centaurus). It returns every state ``h`` ``(batch, L,
S)`` and the last one: the models read their output from ``h`` in XLA (``Re(C h)``, ``C_t h``, ``g * h``), which
keeps each model's readout where it is written and the kernel one kernel.

**Why this design.** Every covered model's recurrence is elementwise once its coefficients are formed: RG-LRU's
``(B, L, D)``, S7's ``(B, L, N)`` (one state shared by the channels: no per-channel expansion), S5's and LRU's
``(B, L, N)`` complex, Centaurus' ``(B, L, N M)``; S4D's ``(H', N/2)`` per channel flattens to ``S = H' N / 2``. So one
kernel over ``S`` elementwise lanes serves all of them; Mamba's ``(BLOCK_D, N)`` kernel
(:mod:`pallas_kernels.selective_scan`) is kept for the selective SSM, whose input and readout contract ``N`` per token.

* **Forward kernel.** Grid ``(batch, cdiv(S, BLOCK))``: a program holds ``BLOCK`` lanes of the state on chip over
  the whole sequence and writes each ``h_t`` (float32), in chunks of :data:`CHUNK` unrolled steps whose loads are
  issued one chunk ahead (:func:`pallas_kernels.scan_common.pipelined_chunks`; the last chunk's steps past ``L``
  are frozen and not stored).
* **Backward kernel.** The same grid and chunks, time reversed: the adjoint ``g_t = dh_t + conj(a_{t+1}) g_{t+1}`` gives
  ``da_t = g_t conj(h_{t-1})``, ``db_t = g_t`` and ``dh0 = conj(a_0) g_0``. The states are the forward's output, so
  they are the residuals: nothing is recomputed and no checkpoint is stored (Mamba's kernel must checkpoint because
  its ``(D, N)`` states are never written). ``b`` is not read at all (the step is linear in it). For a
  time-invariant ``a`` each program sums ``da`` over time; the batch rows are summed outside.
* **The step is written once**, in :func:`step` (with the mask, :func:`masked`), on real arrays, complex arrays or
  :class:`~pallas_kernels.complex_lib.Planes`: :func:`reference` runs it on complex arrays in a ``lax.scan``, the
  forward kernel on planes, and the backward kernel differentiates it in its body with ``jax.vjp``, so no
  conjugation rule is written by hand.
* **Complex values** enter the kernels as float32 planes (Pallas GPU has no complex dtype):
  :func:`kernel_scan` splits and merges them (:mod:`pallas_kernels.complex_lib`), and JAX's autodiff through the
  split and the merge gives the complex cotangents their usual convention.

Memory: the forward writes ``h`` (``batch L S``, float32, two planes when complex), which the readout needs anyway;
the backward writes ``da`` (time-varying), ``db`` and the cotangent of ``h`` comes in. Both kernels compute in
float32 and take float32, bfloat16 or float16 (complex64 for complex values) inputs; the gradients come back in
each input's dtype. float64 (and complex128) never reaches a kernel: :func:`diagonal_scan` takes the reference.

Three tiers: :func:`reference` (the oracle, token by token in XLA); the models' XLA paths
(``lrnnx_jax.core.scan.chunked_scan``, and the FFT of ``lrnnx_jax.core.lti`` for time-invariant systems), their
fallback; and :func:`kernel_scan`, the Pallas pair under ``jax.custom_vjp``. :func:`diagonal_scan` is the dispatch
point (:func:`choose`: ``pallas_kernels.dispatch.choose_kernel`` with :data:`POLICY`); a model asks :func:`choose`
and keeps its own XLA path as the fallback.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels import complex_lib as cl
from pallas_kernels import dispatch
from pallas_kernels import scan_common
from pallas_kernels.scan_common import ScanPolicy

OP = "diagonal_scan"
#: state lanes per program of both kernels (untuned: to be measured on a GPU)
TILE = 256
#: steps per chunk of both kernels' time loops (:func:`pallas_kernels.scan_common.pipelined_chunks`): unrolled,
#: their loads issued one chunk ahead
CHUNK = 16

#: the default of the models that pass no policy of their own: ``"auto"`` keeps their XLA paths (the FFT for
#: time-invariant systems); ``use_kernels="always"`` opts in. A model measured faster on its kernels passes its own
#: :class:`ScanPolicy` to :func:`model_scan` (RG-LRU: ``lrnnx_jax.models.ltv.rglru.SCAN_POLICY``)
POLICY = ScanPolicy(
    auto=False,
    evidence="NVIDIA H200, jax 0.11.2, forward + backward at B=32, H=128, L=2048, d_state 64, float32 "
             "(benchmarks/results/training_point_h200.json): XLA path / kernels, LRU 1.47 / 1.57 ms, S5 1.68 / 1.60, "
             "S5 LTV 1.53 / 1.47, S4D 1.48 / 6.84, S7 35.3 / 35.3; the kernels compile in 7 s against 0.5-2 s. "
             "After the real-plane projections of lrnnx_jax.core.lti and S7's feature contractions (same point, "
             "training_point3_h200.json, training_s7_features_h200.json): LRU 1.34 / 1.00 ms, S5 1.28 / 1.09, S5 LTV "
             "1.32 / 1.08, S4D 1.36 / 6.78, S7 26.0 / 25.5, the kernels compiling in 7.6-14.6 s; S7 with its "
             "contractions at x_proj's (default) precision 17.7 / 17.2, compiling in 5.4 / 4.7 s "
             "(training_s7_point_h200.json). Again in one call with CHUNK 16 and 8 (benchmark_training --set; "
             "training_diagonal_chunk{16,8}_h200.json): LRU 1.14 / 0.95 (chunk 8: 1.22) ms, S5 1.32 / 1.11 (1.29), "
             "S5 LTV 1.28 / 1.06 (1.13), the kernels compiling in 13.0 / 11.2 / 8.0 s at chunk 16 and 10.7 / 7.1 / "
             "2.1 s at chunk 8. The sweeps with cuBLAS GEMMs (benchmark_training --compiler-options "
             "'{\"xla_gpu_enable_triton_gemm\": false}', training_sweeps_diagonal_cublas_h200.json, 25 points): "
             "kernels / XLA path, LRU at H=16 1.02 / 0.63 ms, B=16 1.13 / 0.92, L=8 0.39 / 0.32, B=128 2.82 / 4.04; "
             "S5 LTV at L=8..64 1.09-1.27x slower; S5 LTI and S4D, 23 more points "
             "(training_sweeps_s5_s4d_cublas_h200/): S5 at the point 1.62 / 1.47, L=64 0.66 / 0.41, H=32 1.04 / "
             "0.78, B=128 2.76 / 4.05; S4D at L=64 0.67 / 0.33, L=128 1.05 / 0.46; S4D's and S5 LTV's remaining "
             "points (training_sweeps_s4d_s5ltv_cublas_h200/): S4D 2.1-7.1x slower at all 11 (L=1024 3.85 / 1.05, "
             "B=128 25.6 / 3.63), S5 LTV at L=512 0.58 / 0.80, L=1024 0.83 / 1.16, H=256 1.48 / 1.70 but H=16 "
             "1.01 / 0.55, B=8 0.73 / 0.65: the kernels lose at short "
             "sequences, small widths and small batches. S7's sweeps (training_sweeps_rest_session13_h200/, "
             "training_s7_sweeps_session14_h200/; kernels / XLA path): 1-11 % faster at 13 of 15 points (L=1024 "
             "8.95 / 9.27, B=128 63.2 / 65.2, H=256 54.5 / 54.9), slower at L=32 0.82 / 0.74 and L=256 3.02 / 2.80. "
             "Not faster at every point, and the kernels of LRU and S5 "
             "compile over the 10 s budget, so 'auto' keeps the XLA paths",
)


# ----------------------------------------------------------------------------- the step, once
def masked(m, a, b):
    """``(a, b)`` of one step, with ``a = 1`` and ``b = 0`` where ``m`` is False (``m`` None: unchanged).

    ``a``, ``b``: real arrays, complex arrays or ``Planes``; ``m`` a boolean broadcastable against them.
    """
    if m is None:
        return a, b
    return cl.where(m, a, 1.0), cl.where(m, b, 0.0)


def step(a, h, b, m=None):
    """``h_t = a_t h_{t-1} + b_t`` (the state unchanged where ``m`` is False), any shapes that broadcast."""
    a, b = masked(m, a, b)
    return cl.add(cl.mul(a, h), b)


# ----------------------------------------------------------------------------- the reference
def reference(a, b, h0=None, mask=None):
    """The oracle: a ``lax.scan`` over time of :func:`step`.

    Computes in float32 (complex64; float64 or complex128 for such inputs). Returns ``(h (batch, L, S), h_last
    (batch, S))``. Differentiable by JAX's autodiff.
    """
    _check(a, b, h0, mask)
    dtype = jnp.result_type(a, b, jnp.float32) if h0 is None else jnp.result_type(a, b, h0, jnp.float32)
    batch, _, size = b.shape
    h = jnp.zeros((batch, size), dtype) if h0 is None else h0.astype(dtype)
    time_major = lambda x: jnp.moveaxis(x, 1, 0)  # noqa: E731
    invariant = a.ndim == 1
    xs = {"b": time_major(b.astype(dtype))}
    if not invariant:
        xs["a"] = time_major(a.astype(dtype))
    if mask is not None:
        xs["m"] = time_major(mask.astype(bool))[..., None]
    a_all = a.astype(dtype) if invariant else None

    def body(h, s):
        h = step(a_all if invariant else s["a"], h, s["b"], s.get("m"))
        return h, h

    h_last, hs = jax.lax.scan(body, h, xs)
    return time_major(hs), h_last


# ----------------------------------------------------------------------------- the kernels
def _parts(value) -> tuple:
    """A value as its real arrays: ``(re, im)`` for ``Planes``, ``(x,)`` for a real array."""
    return tuple(value) if cl.is_planes(value) else (value,)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """The shapes of one call and the program tiling shared by both kernels."""

    batch: int
    length: int
    size: int
    is_complex: bool
    invariant: bool  # a is (S,)
    masked: bool

    @classmethod
    def of(cls, a, b, mask):
        batch, length, size = b.shape
        return cls(batch, length, size, cl.is_planes(b), len(a.shape) == 1, mask is not None)

    @property
    def block(self) -> int:
        return min(dispatch.next_power_of_two(self.size), TILE)

    @property
    def grid(self) -> tuple[int, int]:
        return self.batch, -(-self.size // self.block)

    @property
    def suffixes(self) -> tuple[str, ...]:
        return (".re", ".im") if self.is_complex else ("",)

    def flatten(self, values: dict):
        """``(names, arrays)``: each value's real arrays, named ``name.re`` / ``name.im`` when complex (``mask``,
        real, keeps its name)."""
        names, arrays = [], []
        for name, value in values.items():
            if value is None:
                continue
            parts = _parts(value)
            names += [name] if len(parts) == 1 else [name + s for s in (".re", ".im")]
            arrays += list(parts)
        return names, arrays

    def out(self, shape, dtype) -> tuple:
        """The output shapes of one value: one array per part."""
        return tuple(jax.ShapeDtypeStruct(shape, dtype) for _ in self.suffixes)

    def value(self, parts):
        return cl.Planes(*parts) if self.is_complex else parts[0]

    @property
    def num_chunks(self) -> int:
        return -(-self.length // CHUNK)

    def program(self, ref: dict):
        """The program's row, and its loaders and storers of values (float32 in the body) at a time step ``t`` that
        may lie past the sequence (the last chunk's padding: loads give zeros, stores are skipped) or at no time
        step (``t=None``: ``h0``, ``a`` of a time-invariant system)."""
        pl, plgpu = dispatch.pallas_modules()
        row, blk = pl.program_id(0), pl.program_id(1)
        lanes_ok = blk * self.block + jnp.arange(self.block) < self.size
        lanes = pl.ds(blk * self.block, self.block)

        def at(t):
            """(index, mask) of lanes at step t (the index clamped into the sequence)."""
            if t is None:
                return (row, lanes), lanes_ok
            return (row, jnp.minimum(t, self.length - 1), lanes), lanes_ok & (t < self.length)

        def load(name, t=None, *, whole=False):
            index, ok = ((lanes,), lanes_ok) if whole else at(t)
            return self.value([plgpu.load(ref[name + s].at[index], mask=ok, other=0.0).astype(jnp.float32)
                               for s in self.suffixes])

        def store(refs, value, t=None):
            index, ok = at(t)
            for r, part in zip(refs, _parts(value)):
                plgpu.store(r.at[index], part.astype(r.dtype), mask=ok)

        def step_mask(t):
            """False where the step is frozen: masked, or past the sequence (None: every step runs)."""
            inside = t < self.length if self.length % CHUNK else None
            if not self.masked:
                return inside
            m = ref["mask"][row, jnp.minimum(t, self.length - 1)] > 0
            return m if inside is None else m & inside

        return load, store, step_mask


def forward_kernel(a, b, h0, mask=None, *, config: Optional[dispatch.KernelConfig] = None):
    """The forward kernel: every state.

    ``a`` ``(batch, L, S)`` or ``(S,)``, ``b`` ``(batch, L, S)``, ``h0`` ``(batch, S)``: all real arrays or all
    ``Planes``; ``mask`` None or float32 ``(batch, L)`` (1: a step, 0: frozen). Returns ``h`` ``(batch, L, S)``
    float32 (``Planes`` when complex).
    """
    config = dispatch.resolve(config)
    layout = _Layout.of(a, b, mask)
    names, arrays = layout.flatten({"a": a, "b": b, "h0": h0, "mask": mask})

    def body(*refs):
        ref = dict(zip(names, refs))
        h_refs = refs[len(names):]
        load, store, step_mask = layout.program(ref)
        a_all = load("a", whole=True) if layout.invariant else None

        def load_chunk(c):
            """Per step of chunk ``c``: ``a_t`` (None when time-invariant: ``a_all`` stays out of the loop's carry),
            ``b_t``, the step's mask."""
            steps = [c * CHUNK + i for i in range(CHUNK)]
            return [(None if layout.invariant else load("a", t), load("b", t), step_mask(t)) for t in steps]

        def one_chunk(c, inputs, h):
            states = []
            for a_t, b_t, m_t in inputs:  # unrolled
                h = step(a_all if a_t is None else a_t, h, b_t, m_t)
                states.append(h)
            for i, h_t in enumerate(states):  # the stores after the chunk's arithmetic
                store(h_refs, h_t, c * CHUNK + i)
            return h

        scan_common.pipelined_chunks(layout.num_chunks, load_chunk, one_chunk, load("h0"))

    call = scan_common.pallas_call(body, layout.out((layout.batch, layout.length, layout.size), jnp.float32),
                                   layout.grid, config, OP + "_fwd")
    return layout.value(call(*arrays))


def backward_kernel(a, h0, mask, h, dh, *, b_dtype, config: Optional[dispatch.KernelConfig] = None):
    """The backward kernel: the gradients from the cotangent ``dh`` ``(batch, L, S)`` of every state.

    ``a``, ``h0``, ``mask`` as in :func:`forward_kernel`; ``h`` its output. Returns ``(da, db, dh0)``: ``da``
    ``(batch, L, S)`` in ``a``'s dtype (time-varying) or the float32 per-row sums ``(batch, S)`` (time-invariant:
    :func:`kernel_scan` sums the rows); ``db`` ``(batch, L, S)`` in ``b_dtype``; ``dh0`` ``(batch, S)`` float32.
    Values are ``Planes`` when complex.
    """
    config = dispatch.resolve(config)
    layout = _Layout.of(a, h, mask)
    names, arrays = layout.flatten({"a": a, "h0": h0, "mask": mask, "h": h, "dh": dh})
    seq = (layout.batch, layout.length, layout.size)
    da_shape = layout.out((layout.batch, layout.size), jnp.float32) if layout.invariant else layout.out(seq, a.dtype)
    outs = {"da": da_shape, "db": layout.out(seq, b_dtype), "dh0": layout.out((layout.batch, layout.size), jnp.float32)}
    count = len(layout.suffixes)

    def body(*refs):
        ref = dict(zip(names, refs))
        flat = refs[len(names):]
        out = {name: flat[i * count:(i + 1) * count] for i, name in enumerate(outs)}
        load, store, step_mask = layout.program(ref)
        a_all = load("a", whole=True) if layout.invariant else None
        h_init = load("h0")
        zero = jax.tree.map(jnp.zeros_like, h_init)

        def load_chunk(c):
            """Per step of chunk ``c``: the cotangent of ``h_t`` (zero past the sequence), ``h_{t-1}`` (at ``t = 0`` a
            stand-in that :func:`one_chunk` replaces by ``h0``), ``a_t`` (None when time-invariant: ``a_all`` and
            ``h0`` stay out of the loop's carry), the step's mask."""
            steps = [c * CHUNK + i for i in range(CHUNK)]
            return [(load("dh", t), load("h", jnp.maximum(t - 1, 0)), None if layout.invariant else load("a", t),
                     step_mask(t)) for t in steps]

        def one_chunk(c, inputs, carry):
            g, da_sum = carry
            grads = [None] * CHUNK
            for i in reversed(range(CHUNK)):  # unrolled
                dh_t, h_prev, a_t, m_t = inputs[i]
                first = c * CHUNK + i == 0
                h_prev = jax.tree.map(lambda x, x0: jnp.where(first, x0, x), h_prev, h_init)
                a_t = a_all if a_t is None else a_t
                g = cl.add(g, dh_t)  # the adjoint of h_t
                # the step is linear in b: its vjp does not read b's value, so b is not a residual (zeros stand in)
                _, step_vjp = jax.vjp(lambda a_, h_, b_: step(a_, h_, b_, m_t), a_t, h_prev, zero)
                da, g, db = step_vjp(g)
                grads[i] = (da, db)
                if layout.invariant:
                    da_sum = cl.add(da_sum, da)
            for i, (da, db) in enumerate(grads):  # the stores after the chunk's arithmetic
                t = c * CHUNK + i
                store(out["db"], db, t)
                if not layout.invariant:
                    store(out["da"], da, t)
            return g, da_sum

        g, da_sum = scan_common.pipelined_chunks(layout.num_chunks, load_chunk, one_chunk, (zero, zero), reverse=True)
        store(out["dh0"], g)
        if layout.invariant:
            store(out["da"], da_sum)

    call = scan_common.pallas_call(body, sum(outs.values(), ()), layout.grid, config, OP + "_bwd")
    flat = call(*arrays)
    return tuple(layout.value(flat[i * count:(i + 1) * count]) for i in range(len(outs)))


# ----------------------------------------------------------------------------- custom_vjp
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(static, a, b, h0, mask):
    return forward_kernel(a, b, h0, mask, config=static[0])


def _scan_fwd(static, a, b, h0, mask):
    h = forward_kernel(a, b, h0, mask, config=static[0])
    return h, (a, h0, mask, h)


def _scan_bwd(static, residuals, dh):
    config, b_dtype = static
    a, h0, mask, h = residuals
    dh = jax.tree.map(lambda x: x.astype(jnp.float32), dh)
    da, db, dh0 = backward_kernel(a, h0, mask, h, dh, b_dtype=b_dtype, config=config)
    if len(jax.tree.leaves(a)[0].shape) == 1:  # time-invariant: the sum over the batch rows
        da = jax.tree.map(lambda x: jnp.sum(x, 0), da)
    like = lambda grad, primal: jax.tree.map(lambda g, p: g.astype(p.dtype), grad, primal)  # noqa: E731
    return like(da, a), db, like(dh0, h0), None if mask is None else jnp.zeros_like(mask)


_scan.defvjp(_scan_fwd, _scan_bwd)


def kernel_scan(a, b, h0=None, mask=None, *, config: Optional[dispatch.KernelConfig] = None):
    """The kernel pair under ``jax.custom_vjp``; the contract of :func:`diagonal_scan` (no dispatch).

    Under a data-parallel mesh the pair runs per shard (:func:`pallas_kernels.dispatch.per_shard`; a time-invariant
    ``a``'s gradient is summed over the devices). Complex inputs run as float32 planes; ``h`` comes back complex64 then (float32 for real inputs).
    """
    config = dispatch.resolve(config)
    is_complex = any(x is not None and jnp.iscomplexobj(x) for x in (a, b, h0))
    batch, _, size = b.shape
    if h0 is None:
        h0 = jnp.zeros((batch, size), jnp.complex64 if is_complex else jnp.float32)
    if is_complex:  # float32 planes; a real input keeps its dtype on its real plane
        planes = lambda z: cl.split(z, jnp.float32 if jnp.iscomplexobj(z) else z.dtype)  # noqa: E731
        a, b, h0 = planes(a), planes(b), planes(h0)
    if mask is not None:
        mask = mask.astype(jnp.float32)
    scan = functools.partial(_scan, (config, jnp.dtype(jax.tree.leaves(b)[0].dtype)))
    invariant = len(jax.tree.leaves(a)[0].shape) == 1
    h = dispatch.per_shard(scan, (a, b, h0, mask), (None if invariant else 0, 0, 0, 0), 0)  # forward and backward
    if is_complex:
        h = cl.merge(h)
    return h, h[:, -1]


# ----------------------------------------------------------------------------- dispatch
def unsupported_reason(a, b, h0=None) -> Optional[str]:
    """Why the kernels cannot take these arguments, or None."""
    reason = scan_common.unsupported_dtype({"a": a, "b": b, "h0": h0}, allow_complex=True)
    if reason is None:
        reason = scan_common.unsupported_size(b.shape[0] * b.shape[1] * b.shape[2])
    return reason


def choose(a, b, h0=None, *, config: Optional[dispatch.KernelConfig] = None, policy: ScanPolicy = POLICY) -> bool:
    """Whether :func:`diagonal_scan` (and a model's forward) runs the kernels for these arguments under ``config``."""
    return dispatch.choose_kernel(OP, unsupported_reason(a, b, h0), dispatch.resolve(config), policy.slower_reason(),
                                  batch=b.shape[0])


def model_scan(a, b, h0=None, mask=None, *, config: Optional[dispatch.KernelConfig] = None,
               policy: ScanPolicy = POLICY):
    """A model's kernel path: :func:`kernel_scan` where :func:`choose` selects it under ``config`` (None: the
    default, read when this is traced) and the model's ``policy``, else None (the model runs its own XLA path, its
    fallback)."""
    if not choose(a, b, h0, config=config, policy=policy):
        return None
    return kernel_scan(a, b, h0, mask, config=config)


def diagonal_scan(a, b, h0=None, mask=None, *, config: Optional[dispatch.KernelConfig] = None):
    """``h_t = a_t h_{t-1} + b_t`` over a sequence: the Pallas kernels (:func:`kernel_scan`) or :func:`reference`.

    Args:
      a: ``(batch, L, S)`` per step, or ``(S,)`` for every step; real or complex.
      b: ``(batch, L, S)``, real or complex.
      h0: optional ``(batch, S)`` initial state (zeros when None); differentiable.
      mask: optional ``(batch, L)`` bool: where False the step leaves the state unchanged.
      config: a :class:`~pallas_kernels.dispatch.KernelConfig`; the default when None. ``"auto"`` takes the
        kernels on an NVIDIA GPU only where :data:`POLICY` says they were measured faster.

    Returns:
      ``(h (batch, L, S), h_last (batch, S))``: float32 (complex64 when an input is complex) on the kernels;
      the reference computes float64 inputs in float64.
    """
    _check(a, b, h0, mask)
    config = dispatch.resolve(config)
    if choose(a, b, h0, config=config):
        return kernel_scan(a, b, h0, mask, config=config)
    return reference(a, b, h0, mask)


def _check(a, b, h0, mask):
    if b.ndim != 3 or b.shape[1] < 1:
        raise ValueError(f"b must have shape (batch, L, S) with L >= 1, got {tuple(b.shape)}")
    batch, length, size = b.shape
    if tuple(a.shape) not in ((batch, length, size), (size,)):
        raise ValueError(f"a must have shape (batch, L, S) = {(batch, length, size)} or (S,) = ({size},), "
                         f"got {tuple(a.shape)}")
    for name, x, shape in (("h0", h0, (batch, size)), ("mask", mask, (batch, length))):
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    for name, x in (("a", a), ("b", b), ("h0", h0)):
        if x is not None and not jnp.issubdtype(x.dtype, jnp.inexact):
            raise TypeError(f"{name} must have a floating or complex dtype, got {x.dtype}")
