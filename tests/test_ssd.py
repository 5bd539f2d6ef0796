"""lrnnx_jax.core.ssd: the chunked SSD against a float64 NumPy loop of the recurrence, token by token (chunk sizes
that do and do not divide L, chunk 1, one chunk, groups, an entering state, frozen steps), its gradients against
float64 JAX of the same loop, and its argument errors. The Mamba2 model on this path: tests/test_mamba2.py."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import relative_error
from lrnnx_jax.core.ssd import ssd_chunked


def random_inputs(seed, batch=2, length=13, nheads=6, headdim=3, ngroups=3, N=4, dtype=np.float32):
    """Mamba-2's realistic ranges: dt log-uniform in [1e-3, 0.1] (its dt_min, dt_max), A = -U(1, 16) (its
    A_init_range), so that the per-step decay exp(dt A) spans 0.2 ... 1; an entering state and a random mask."""
    rng = np.random.default_rng(seed)
    return dict(
        x=rng.standard_normal((batch, length, nheads, headdim)).astype(dtype),
        dt=np.exp(rng.uniform(np.log(1e-3), np.log(0.1), (batch, length, nheads))).astype(dtype),
        A=-rng.uniform(1, 16, nheads).astype(dtype),
        B=rng.standard_normal((batch, length, ngroups, N)).astype(dtype),
        C=rng.standard_normal((batch, length, ngroups, N)).astype(dtype),
        h0=rng.standard_normal((batch, nheads, headdim, N)).astype(dtype),
        mask=rng.random((batch, length)) > 0.3,
    )


def numpy_recurrence(x, dt, A, B, C, h0=None, mask=None):
    """The recurrence in float64, one step at a time: ``S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T``,
    ``y_t = S_t C_t``, head h using group ``h // (nheads / ngroups)``; frozen (masked) steps keep the state."""
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    x, dt, A, B, C = map(f, (x, dt, A, B, C))
    batch, length, nheads, headdim = x.shape
    per_group = nheads // B.shape[2]
    S = np.zeros((batch, nheads, headdim, B.shape[-1])) if h0 is None else f(h0).copy()
    ys = []
    for t in range(length):
        step = dt[:, t] if mask is None else np.where(mask[:, t, None], dt[:, t], 0.0)
        B_t, C_t = np.repeat(B[:, t], per_group, axis=1), np.repeat(C[:, t], per_group, axis=1)  # (batch, nheads, N)
        S = np.exp(step * A)[..., None, None] * S + (step[..., None] * x[:, t])[..., None] * B_t[:, :, None, :]
        ys.append(np.einsum("bhpn,bhn->bhp", S, C_t))
    return np.stack(ys, 1), S


# chunk 1 (sequential), chunks that do (13 = 1 x 13) and do not (4, 5) divide L, larger than L, one chunk (None)
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 13, 32, None])
def test_matches_the_float64_loop(chunk_size):
    """float32 against float64: each output sums at most L = 13 products of float32-rounded factors, and the
    segment sums are differences of cumulative sums over at most 13 steps (|dt A| <= 1.6 each), so the error is a
    few float32 ulps times the sum's length: about 1e-7 relative measured, asserted below 2e-6."""
    inputs = random_inputs(seed=chunk_size or 0)
    for h0, mask in [(inputs["h0"], inputs["mask"]), (None, None)]:
        y, h_last = ssd_chunked(**{**inputs, "h0": h0, "mask": mask}, chunk_size=chunk_size)
        chex.assert_shape(y, (2, 13, 6, 3))
        chex.assert_shape(h_last, (2, 6, 3, 4))
        chex.assert_type([y, h_last], jnp.float32)
        y_ref, h_ref = numpy_recurrence(**{**inputs, "h0": h0, "mask": mask})
        assert relative_error(y, y_ref) < 2e-6
        assert relative_error(h_last, h_ref) < 2e-6


@pytest.mark.parametrize("ngroups", [1, 2])
def test_long_chunks_and_lengths_mask(ngroups):
    """L = 70 in chunks of 32 (the last one padded), dt up to 0.1 and A up to -16: a chunk's cumulative log-decay
    reaches about -50, whose float32 rounding (50 x 6e-8 = 3e-6 absolute) bounds the error of the segment sums
    (1e-7 relative measured; 2e-6 with a constant -1.6 per step over chunks of 256): asserted below 5e-6. A lengths
    mask (the model's): the final state is each row's state at its last valid step, the NumPy loop's on the
    truncated row."""
    inputs = random_inputs(seed=10 + ngroups, length=70, nheads=4, headdim=2, ngroups=ngroups, N=3)
    lengths = np.array([70, 41])
    inputs["mask"] = np.arange(70)[None] < lengths[:, None]
    y, h_last = ssd_chunked(**inputs, chunk_size=32)
    y_ref, h_ref = numpy_recurrence(**inputs)
    assert relative_error(y, y_ref) < 5e-6 and relative_error(h_last, h_ref) < 5e-6
    _, h_row = numpy_recurrence(*(inputs[k][1:, :41] for k in ("x", "dt")), inputs["A"],
                                *(inputs[k][1:, :41] for k in ("B", "C")), inputs["h0"][1:])
    assert relative_error(h_last[1:], h_row) < 5e-6


def test_float64_is_exact_to_rounding():
    """In float64 the algorithm is the recurrence up to float64 rounding: 1e-12."""
    inputs = random_inputs(seed=3, dtype=np.float64)
    y_ref, h_ref = numpy_recurrence(**inputs)
    with jax.enable_x64(True):
        y, h_last = ssd_chunked(**inputs, chunk_size=5)
        assert y.dtype == jnp.float64
        assert relative_error(y, y_ref) < 1e-12 and relative_error(h_last, h_ref) < 1e-12


def test_gradients_match_the_sequential_recurrence_in_float64():
    """The gradients w.r.t. x, dt, A, B, C and h0 (through frozen steps and the -inf above the diagonal) equal
    those of the recurrence run step by step by ``lax.scan``, both in float64: 1e-10."""
    inputs = random_inputs(seed=4, length=11, dtype=np.float64)
    mask = inputs.pop("mask")
    rng = np.random.default_rng(5)
    w_y, w_h = rng.standard_normal((2, 11, 6, 3)), rng.standard_normal((2, 6, 3, 4))

    def sequential(x, dt, A, B, C, h0):
        per_group = x.shape[2] // B.shape[2]
        dt = jnp.where(mask[..., None], dt, 0)

        def step(S, t):
            B_t, C_t = jnp.repeat(B[:, t], per_group, axis=1), jnp.repeat(C[:, t], per_group, axis=1)
            S = jnp.exp(dt[:, t] * A)[..., None, None] * S + (dt[:, t, :, None] * x[:, t])[..., None] * B_t[:, :, None]
            return S, jnp.einsum("bhpn,bhn->bhp", S, C_t)

        S, ys = jax.lax.scan(step, h0, jnp.arange(x.shape[1]))
        return jnp.moveaxis(ys, 0, 1), S

    def loss(fn):
        def value(*args):
            y, h = fn(*args)
            return jnp.sum(y * w_y) + jnp.sum(h * w_h)
        return jax.grad(value, argnums=tuple(range(6)))

    with jax.enable_x64(True):
        args = [jnp.asarray(inputs[k]) for k in ("x", "dt", "A", "B", "C", "h0")]
        ours = loss(lambda *a: ssd_chunked(*a, mask=jnp.asarray(mask), chunk_size=4))(*args)
        theirs = loss(sequential)(*args)
        for name, g, g_ref in zip(("x", "dt", "A", "B", "C", "h0"), ours, theirs):
            assert np.all(np.isfinite(g)), name
            assert relative_error(g, g_ref) < 1e-10, name


@pytest.mark.parametrize("change,error,message", [
    (dict(chunk_size=0), ValueError, r"^chunk_size must be a positive integer or None, got 0$"),
    (dict(chunk_size=2.5), ValueError, r"^chunk_size must be a positive integer or None, got 2.5$"),
    (dict(chunk_size=True), ValueError, r"^chunk_size must be a positive integer or None, got True$"),
    (dict(x=np.zeros((2, 13, 18))), ValueError, r"^x must have shape \(batch, length, nheads, headdim\), got \(2, 13, 18\)$"),
    (dict(dt=np.zeros((2, 13, 5))), ValueError, r"^dt must have shape \(batch, length, nheads\) = \(2, 13, 6\), got \(2, 13, 5\)$"),
    (dict(A=np.zeros((6, 1))), ValueError, r"^A must have shape \(nheads,\) = \(6,\), got \(6, 1\)$"),
    (dict(B=np.zeros((2, 12, 3, 4))), ValueError, r"^B must have shape \(batch, length, ngroups, N\) .* got \(2, 12, 3, 4\)$"),
    (dict(B=np.zeros((2, 13, 4, 4)), C=np.zeros((2, 13, 4, 4))), ValueError, r"^B's ngroups=4 must divide nheads=6"),
    (dict(C=np.zeros((2, 13, 3, 5))), ValueError, r"^C must have shape .* = \(2, 13, 3, 4\), got \(2, 13, 3, 5\)$"),
    (dict(h0=np.zeros((2, 6, 4, 3))), ValueError, r"^h0 must have shape \(batch, nheads, headdim, N\) = \(2, 6, 3, 4\)"),
    (dict(mask=np.ones((2, 12), bool)), ValueError, r"^mask must have shape \(batch, length\) = \(2, 13\), got \(2, 12\)$"),
    (dict(mask=np.ones((2, 13), np.int32)), TypeError, r"^mask must be a bool array, got dtype int32$"),
])
def test_argument_errors(change, error, message):
    inputs = {**random_inputs(seed=6), "chunk_size": 4, **change}
    with pytest.raises(error, match=message):
        ssd_chunked(**inputs)
