"""pallas_kernels.selective_scan: the training-scan kernels (forward and backward under ``jax.custom_vjp``)
against the pure-JAX reference, in Pallas interpret mode on the CPU.

* outputs ``(y, h_last)`` and the gradients of a random-weighted sum of both w.r.t. every input (``u``,
  ``delta``, ``A``, ``B``, ``C``, ``D``, ``z``, ``delta_A``, ``h0``), for every discretization with event
  mode, ``lengths`` (a mask) and ``h0``; without the optional inputs; with ``L`` not a multiple of the chunk;
  with bfloat16 sequences;
* the Mamba model's forward and parameter gradients with ``use_kernels="always"`` equal ``"never"`` (its XLA
  chunked scan), event mode and ``lengths`` included, and the final cache;
* the dispatch: ``"auto"`` keeps the reference even on a GPU (not measured yet), float64 takes the reference
  (with a warning under ``"always"``) and passes finite differences there;
* both kernels lower to Triton IR for an H100.

Shapes are tiny (batch 2, L = 12 in chunks of 4, D = 8, N = 4): interpret mode compiles every kernel body.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from conftest import relative_error
from lrnnx_jax.models.ltv.mamba import Mamba
from pallas_kernels import KernelConfig, dispatch
from pallas_kernels import kernel_math as km
from pallas_kernels import selective_scan as ss

ALWAYS = KernelConfig(use_kernels="always")  # interpret mode on the CPU (dispatch.interpret_mode)
NEVER = KernelConfig(use_kernels="never")
TRITON_DEPRECATION = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
BATCH, LENGTH, DIM, N, CHUNK = 2, 12, 8, 4, 4
#: both paths compute the same float32 operations in the same order per step; only the sums over time (dA, dD),
#: over the channel blocks (dB, dC) and XLA's fusions reorder roundings: measured below 3e-7
F32_TOL = 1e-5
#: bfloat16 sequences: both paths compute in float32 from the same bfloat16 values and round their bfloat16
#: outputs and gradients once, so they may differ by one bfloat16 ulp (2**-8 relative) at an element; twice that
#: relative to the largest element
BF16_TOL = 2.0**-7
INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_A", "h0")


def _arrays(seed, *, length=LENGTH, dtype=jnp.float32, event=True, optional=True, dim=DIM, n=N):
    """Random inputs at realistic scales: Mamba's delta (softplus of its projection) and A = -exp(A_log)."""
    rng = np.random.default_rng(seed)
    seq = lambda *shape: rng.standard_normal((BATCH, length, *shape))  # noqa: E731
    a = {"u": seq(dim), "delta": rng.uniform(0.01, 0.5, (BATCH, length, dim)), "A": -np.exp(rng.uniform(-1, 1.5, (dim, n))),
         "B": seq(n), "C": seq(n)}
    if optional:
        a.update(D=rng.standard_normal(dim), z=seq(dim), h0=rng.standard_normal((BATCH, dim, n)))
    if event:
        a["delta_A"] = rng.uniform(0.01, 1.0, (BATCH, length, dim))
    params = ("A", "D", "h0")  # parameters and the cached state stay float32
    return {k: jnp.asarray(v, jnp.float32 if k in params else dtype) for k, v in a.items()}


def _outputs_and_grads(fn, arrays, mask, discretization, seed=1):
    """``(y, h_last)`` and the gradients of ``sum(w_y y) + sum(w_h h_last)`` w.r.t. every array, in one program."""
    rng = np.random.default_rng(seed)

    @jax.jit
    def run(arrays):
        out, vjp = jax.vjp(lambda a: fn(**a, mask=mask, discretization=discretization), arrays)
        weights = jax.tree.map(lambda o: jnp.asarray(rng.standard_normal(o.shape), o.dtype), out)
        return out, vjp(weights)[0]

    return run(arrays)


def _kernels(**kwargs):
    return ss.selective_scan(**kwargs, chunk=CHUNK, config=ALWAYS)


def _close(ours, theirs, tol) -> bool:
    """``relative_error < tol``, or both exactly zero (an unused input: dirac's delta in event mode, dtA_proj's weight)."""
    if np.max(np.abs(np.asarray(theirs, np.float64))) == 0:
        return np.max(np.abs(np.asarray(ours, np.float64))) == 0
    return relative_error(ours, theirs) < tol


def _assert_close(ours, theirs, tol):
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype, name
        assert _close(ours[name], theirs[name], tol), (name, relative_error(ours[name], theirs[name]))


def _compare(arrays, mask, discretization, tol):
    (y_k, h_k), grads_k = _outputs_and_grads(_kernels, arrays, mask, discretization)
    (y_r, h_r), grads_r = _outputs_and_grads(ss.reference, arrays, mask, discretization)
    assert y_k.dtype == arrays["u"].dtype and h_k.dtype == jnp.float32
    _assert_close({"y": y_k, "h_last": h_k}, {"y": y_r, "h_last": h_r}, tol)
    assert set(grads_k) == set(arrays)
    _assert_close(grads_k, grads_r, tol)


LENGTHS_MASK = jnp.arange(LENGTH)[None, :] < jnp.asarray([LENGTH, 7])[:, None]


@pytest.mark.parametrize("discretization", ss.DISCRETIZATIONS)
def test_event_mode_lengths_and_h0_match_the_reference(discretization):
    """Every input and option at once: event mode (delta_A), a mask from lengths (12, 7), h0, D and z."""
    _compare(_arrays(0), LENGTHS_MASK, discretization, F32_TOL)


@pytest.mark.parametrize("discretization", ["mamba", "zoh"])
def test_ragged_tiles_mask_their_padded_lanes(discretization):
    """D = 40 and N = 5: tiles of 16 channels (the last one ragged) and 8 state lanes (3 padded), the masked loads,
    stores and state updates (DIM = 8, N = 4 elsewhere fill their tiles, where the kernels run without masks)."""
    assert ss._blocks(40, 5, ss.BACKWARD_TILE) == (16, 8) and ss._blocks(DIM, N, ss.BACKWARD_TILE) == (DIM, N)
    _compare(_arrays(5, dim=40, n=5), LENGTHS_MASK, discretization, F32_TOL)


@pytest.mark.parametrize("discretization", ["mamba", "zoh"])
def test_without_the_optional_inputs_and_a_ragged_last_chunk(discretization):
    """No delta_A, mask, h0, D or z; L = 10 is padded to 12 with masked steps inside the kernels."""
    _compare(_arrays(2, length=10, event=False, optional=False), None, discretization, F32_TOL)


@pytest.mark.parametrize("discretization,event", [("mamba", True), ("bilinear", False)])
def test_bfloat16_sequences(discretization, event):
    """bfloat16 u, delta, B, C, z, delta_A (float32 A, D, h0): bfloat16 y and gradients, float32 state."""
    arrays = _arrays(3, dtype=jnp.bfloat16, event=event)
    _compare(arrays, LENGTHS_MASK, discretization, BF16_TOL)


def test_states_checkpointed_per_chunk():
    """The forward kernel stores the state before each chunk (h0 first), and the last state: never (B, L, D, N).
    It loads two chunks at a time (8 steps): the checkpoints inside a load and between loads."""
    length = 16
    assert ss.load_group(CHUNK, ss.FORWARD_LOAD_STEPS) == 2 and ss.padded_length(length, CHUNK) == length
    a = _arrays(4, length=length, event=False)
    mask = jnp.ones((BATCH, length), jnp.float32)
    y, h_last, checkpoints = ss.forward_kernel(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], None, mask,
                                               a["h0"], discretization="zoh", chunk=CHUNK, config=ALWAYS)
    chex.assert_shape(checkpoints, (BATCH, length // CHUNK, DIM, N))
    np.testing.assert_array_equal(checkpoints[:, 0], a["h0"])
    for c in range(1, length // CHUNK):  # within the first load (c = 1) and after it (c = 2, 3)
        steps = c * CHUNK
        _, h_c = ss.reference(**{k: (v[:, :steps] if v.ndim == 3 and k != "h0" else v) for k, v in a.items()},
                              discretization="zoh")
        assert relative_error(checkpoints[:, c], h_c) < F32_TOL
    y_r, h_r = ss.reference(**a, discretization="zoh")
    assert relative_error(y, y_r) < F32_TOL and relative_error(h_last, h_r) < F32_TOL


def test_backward_loading_two_chunks_at_a_time(monkeypatch):
    """``BACKWARD_LOAD_STEPS`` of two chunks (measured slower on an H200, so not the default): the same gradients,
    with event mode, lengths and h0; L = 12 is padded to 16 for whole loads."""
    monkeypatch.setattr(ss, "BACKWARD_LOAD_STEPS", 2 * CHUNK)
    assert ss.load_group(CHUNK, ss.BACKWARD_LOAD_STEPS) == 2 and ss.padded_length(LENGTH, CHUNK) == 16
    _compare(_arrays(0), LENGTHS_MASK, "zoh", F32_TOL)


def test_kernels_take_the_hardware_exponential_only_where_they_compile_for_the_gpu():
    """kernel_exp: interpret mode (every CPU run of these tests) cannot run inline assembly, so it keeps jnp.exp; a
    compiled kernel takes hardware_exp (its lowering: test_kernels_lower_to_triton)."""
    assert ss.kernel_exp(KernelConfig(use_kernels="always", interpret=True)) is jnp.exp
    assert ss.kernel_exp(KernelConfig(use_kernels="always", interpret=False)) is km.hardware_exp
    assert ss.kernel_exp(ALWAYS) is (jnp.exp if dispatch.interpret_mode(ALWAYS) else km.hardware_exp)


def test_kernels_refuse_a_length_that_is_not_whole_loads():
    a = _arrays(4, event=False)  # L = 12: three chunks of 4, not a whole number of loads of 8 steps
    with pytest.raises(ValueError, match="forward kernel takes L a multiple of 8 .* got L=12"):
        ss.forward_kernel(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], None, None, a["h0"],
                          chunk=CHUNK, config=ALWAYS)
    a = _arrays(4, length=10, event=False)  # L = 10: not a whole number of the backward's loads of 4 steps
    checkpoints, dy = jnp.zeros((BATCH, 3, DIM, N)), jnp.ones((BATCH, 10, DIM))
    with pytest.raises(ValueError, match="backward kernel takes L a multiple of 4 .* got L=10"):
        ss.backward_kernel(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], None, None, checkpoints, dy,
                           a["h0"], chunk=CHUNK, config=ALWAYS)


@pytest.mark.parametrize("discretization", ["zoh"])
def test_mamba_forward_and_gradients_on_kernels_equal_xla(discretization):
    """Mamba(use_kernels="always") against "never" (the chunked associative scan): outputs, the cache, and the
    gradients of every parameter and of the input, in event mode with lengths, from a cache."""
    kwargs = dict(d_model=4, d_state=N, d_conv=3, expand=2, discretization=discretization, chunk_size=CHUNK)
    kernels = Mamba(**kwargs, kernel_config=ALWAYS, rngs=nnx.Rngs(0))
    xla = Mamba(**kwargs, kernel_config=NEVER, rngs=nnx.Rngs(0))  # the same parameters
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((BATCH, LENGTH, 4)), jnp.float32)
    tau = jnp.asarray(rng.uniform(0.1, 2.0, (BATCH, LENGTH)), jnp.float32)
    lengths = jnp.asarray([LENGTH, 9])
    cache = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), xla.allocate_inference_cache(BATCH))
    w = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def grads(model):  # one compiled program: the forward, the cache and every gradient
        graphdef, params = nnx.split(model)

        def loss(params, x, cache):
            y, new_cache = nnx.merge(graphdef, params)(x, tau, lengths, cache=cache, return_cache=True)
            return jnp.sum(w * y) + jnp.sum(new_cache["lrnn_state"]), (y, new_cache)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(params, x, cache)

    (g_k, aux_k), (g_x, aux_x) = grads(kernels), grads(xla)
    # the paths differ in their order of operations (the associative scan): a few float32 roundings
    for ours, theirs in zip(jax.tree.leaves((aux_k, g_k)), jax.tree.leaves((aux_x, g_x))):
        assert _close(ours, theirs, F32_TOL)


def test_auto_follows_the_measured_policy_on_a_gpu(monkeypatch):
    """POLICY: measured faster on an H200, so "auto" takes the kernels on an NVIDIA GPU (and the reference off it,
    or under a policy that says slower); "always" takes the kernels, "never" the reference."""
    a = _arrays(6)
    args = [a[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_A", "h0")]
    assert ss.POLICY.auto and ss.POLICY.slower_reason() is None and "H200" in ss.POLICY.evidence
    monkeypatch.setattr(dispatch, "on_nvidia_gpu", lambda: False)
    assert not ss.choose(*args, config=KernelConfig(use_kernels="auto"))
    monkeypatch.setattr(dispatch, "on_nvidia_gpu", lambda: True)
    assert ss.choose(*args, config=KernelConfig(use_kernels="auto"))
    assert not ss.choose(*args, config=KernelConfig(use_kernels="auto"), policy=ss.ScanPolicy(auto=False, evidence="test"))
    assert ss.choose(*args, config=ALWAYS)
    assert not ss.choose(*args, config=NEVER)


def test_float64_takes_the_reference_and_passes_finite_differences():
    """float64 never reaches a kernel (a warning under "always"); the reference's gradients match finite differences."""
    with jax.enable_x64(True):
        a = {k: v.astype(jnp.float64) for k, v in _arrays(7, length=5).items()}
        mask = jnp.arange(5)[None, :] < jnp.asarray([5, 3])[:, None]
        with pytest.warns(RuntimeWarning, match="float64"):
            y, h = ss.selective_scan(**a, mask=mask, discretization="bilinear", config=ALWAYS)
        y_r, h_r = ss.reference(**a, mask=mask, discretization="bilinear")
        np.testing.assert_array_equal(y, y_r)
        assert y.dtype == jnp.float64 and h.dtype == jnp.float64
        loss = lambda *v: jnp.sum(jnp.sin(ss.selective_scan(**dict(zip(a, v)), mask=mask, discretization="bilinear",  # noqa: E731
                                                            config=NEVER)[0]))
        check_grads(loss, tuple(a.values()), order=1, modes=("rev",))


def test_bad_arguments():
    a = _arrays(8)
    with pytest.raises(ValueError, match="discretization"):
        ss.selective_scan(**a, discretization="async")
    with pytest.raises(ValueError, match="chunk"):
        ss.selective_scan(**a, chunk=0)
    with pytest.raises(ValueError, match="B must have shape"):
        ss.selective_scan(**{**a, "B": a["B"][:, :, :2]})


@pytest.mark.parametrize("discretization,event", [("mamba", False), ("zoh", True)])
def test_softplus_of_the_step_inside_the_kernels(discretization, event):
    """``delta_softplus``: the kernels take the step before its softplus (raw values from -5 to 2, and one above the
    threshold of 20 where softplus returns its input) and give the gradient with respect to it; the reference applies
    ``jax.nn.softplus`` outside, and both match within float32 rounding."""
    arrays = _arrays(5, event=event)
    rng = np.random.default_rng(6)
    raw = rng.uniform(-5.0, 2.0, arrays["delta"].shape)
    raw[0, 3, 1] = 21.0
    arrays["delta"] = jnp.asarray(raw, jnp.float32)

    def kernels(**a):
        return _kernels(**a, delta_softplus=True)

    def reference(delta, **a):
        return ss.reference(delta=jax.nn.softplus(delta), **a)

    (y_k, h_k), grads_k = _outputs_and_grads(kernels, arrays, LENGTHS_MASK, discretization)
    (y_r, h_r), grads_r = _outputs_and_grads(reference, arrays, LENGTHS_MASK, discretization)
    chex.assert_trees_all_equal_shapes_and_dtypes(grads_k, grads_r)
    _assert_close({"y": y_k, "h_last": h_k}, {"y": y_r, "h_last": h_r}, F32_TOL)
    _assert_close(grads_k, grads_r, F32_TOL)


@TRITON_DEPRECATION
@pytest.mark.parametrize("discretization", ss.DISCRETIZATIONS)
def test_kernels_lower_to_triton(lower_for_h100, discretization):
    """The forward and backward kernels (bfloat16 sequences, event mode, a mask, a ragged D = 40 and N = 5; the
    softplus of the step inside them for "mamba"), their exponentials by inline ex2.approx.ftz."""
    config = KernelConfig(use_kernels="always", interpret=False)
    bf = jnp.bfloat16
    seq = jnp.ones((2, 12, 40), bf)
    mask = jnp.ones((2, 12), bool)

    def loss(u, delta, A, B, C, D, z, delta_A, h0):
        y, h = ss.kernel_scan(u, delta, A, B, C, D, z, delta_A, mask, h0, discretization=discretization, chunk=CHUNK,
                              config=config, delta_softplus=discretization == "mamba")
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h)

    text = lower_for_h100(jax.grad(loss, argnums=tuple(range(9))), seq, seq, -jnp.ones((40, 5)),
                          jnp.ones((2, 12, 5), bf), jnp.ones((2, 12, 5), bf), jnp.ones((40,)), seq, seq,
                          jnp.zeros((2, 40, 5)), kernels=2)
    # the exponentials on the GPU's ex2.approx.ftz (kernel_exp), none on libdevice's expf
    assert "ex2.approx.ftz.f32" in text and "__nv_expf" not in text
