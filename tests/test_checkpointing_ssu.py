"""pallas_kernels.checkpointing_ssu: the reference against a float64 NumPy loop, the closed-form replay
against the token loop, the kernel (interpret mode) against both over chains of calls, the property that
speculative calls equal single-token steps over the accepted tokens, the packed layout, 8-bit states,
Triton lowering, the in-place update, and bad inputs.

Interpret mode costs a few seconds of tracing and compiling per distinct kernel (shapes and options), so
the cases share shapes where they can (compiled programs are reused within the module) and each case
combines several features.
"""

from __future__ import annotations

import functools
import importlib
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch
from pallas_kernels.checkpointing_ssu import QMAX, SSUCaches, checkpointing_ssu, reference
from pallas_kernels.selective import selective_state_update

ssu = importlib.import_module("pallas_kernels.checkpointing_ssu")  # the module (the package's attribute is the function)

KERNEL = dispatch.KernelConfig(use_kernels="always", block_elems=32)  # dim 12 -> 3 channel blocks of 4 (the last masked)
REFERENCE = dispatch.KernelConfig(use_kernels="never")
TRITON_DEPRECATION = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
CACHE_KEYS = ("state", "old_x", "old_B", "old_dt", "old_cumAdt", "cache_buf_idx", "state_scale")
F8 = jnp.float8_e4m3fn


# ---------------------------------------------------------------------------------------------
# Cases


def _softplus_inverse(y):
    return (y + np.log(-np.expm1(-y))).astype(np.float32)


def make_case(rng, *, S=6, batch=4, H=4, G=2, P=12, N=6, Tc=4, T=None, per_channel=False, slots="permuted",
              state_dtype=jnp.float32):
    """Random arguments at realistic steps: delta = softplus(dt + dt_bias) around [1e-3, 0.1] (Mamba-2's dt range);
    A = -U(1, 8) per head, or Mamba-1's -(1..N) per channel; caches of a previous call with consistent running
    sums, a random buffer index and a random K in [0, Tc].

    ``slots``: None (row b is slot b; needs S == batch), ``"permuted"`` (distinct random slots) or ``"padded"``
    (the same with the second row padded).
    """
    T = Tc if T is None else T
    normal = lambda *s: rng.standard_normal(s).astype(np.float32)
    if per_channel:
        A = -np.broadcast_to(np.arange(1, N + 1, dtype=np.float32), (H, P, N)) * rng.uniform(0.5, 1.5, (H, P, 1)).astype(np.float32)
        lead = (H, P)
    else:
        A = -rng.uniform(1, 8, H).astype(np.float32)
        lead = (H,)
    old_dt = rng.uniform(1e-3, 0.1, (S, 2, *lead, Tc)).astype(np.float32)
    old_cumAdt = np.cumsum(old_dt if per_channel else A[:, None] * old_dt, axis=-1, dtype=np.float32)
    kw = dict(
        state=normal(S, H, P, N),
        old_x=normal(S, Tc, H, P), old_B=normal(S, 2, Tc, G, N), old_dt=old_dt, old_cumAdt=old_cumAdt,
        cache_buf_idx=rng.integers(0, 2, S).astype(np.int32), prev_num_accepted_tokens=rng.integers(0, Tc + 1, S).astype(np.int32),
        x=normal(batch, T, H, P), dt=0.5 * normal(batch, T, *lead), A=A, B=normal(batch, T, G, N), C=normal(batch, T, G, N),
        D=normal(*lead), z=normal(batch, T, H, P), dt_bias=_softplus_inverse(rng.uniform(1e-3, 0.1, lead).astype(np.float32)),
        dt_softplus=True,
    )
    if jnp.dtype(state_dtype) in QMAX:
        qmax = QMAX[jnp.dtype(state_dtype)]
        kw["state"] = np.clip(np.round(rng.uniform(-1, 1, (S, H, P, N)) * qmax), -qmax, qmax)
        kw["state_scale"] = rng.uniform(0.01, 0.05, (S, H, P)).astype(np.float32)
    kw["state"] = np.asarray(kw["state"]).astype(state_dtype)
    if slots is not None:
        sbi = rng.permutation(S)[:batch].astype(np.int32)
        if slots == "padded":
            sbi[1] = -1
        kw["state_batch_indices"] = sbi
    return {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}


def accept_randomly(rng, kw, caches, sbi=None, T=None):
    """The next call's arguments: ``caches`` in, a random K per slot in [0, T], fresh draft tokens."""
    nxt = dict(kw)
    nxt.update({k: v for k, v in caches._asdict().items() if v is not None})
    T = kw["x"].shape[1] if T is None else T
    nxt["prev_num_accepted_tokens"] = jnp.asarray(rng.integers(0, T + 1, kw["state"].shape[0]), jnp.int32)
    fresh = make_case(rng, S=kw["state"].shape[0], batch=kw["x"].shape[0], H=kw["state"].shape[1], G=kw["B"].shape[2],
                      P=kw["state"].shape[2], N=kw["state"].shape[3], Tc=kw["old_x"].shape[1], T=kw["x"].shape[1],
                      per_channel=kw["A"].ndim == 3)
    nxt.update({k: fresh[k] for k in ("x", "dt", "B", "C", "z")})
    return nxt


# ---------------------------------------------------------------------------------------------
# The independent float64 NumPy oracle


def _f64(a):
    return np.asarray(a).astype(np.float64)


def numpy_ssu(kw):
    """Float64 NumPy loops over rows, heads and tokens, written from the docstring's formulas.

    Returns ``(out, caches)``: ``caches`` a dict with the committed ``state`` in float64 (before any
    requantization) and the other caches.
    """
    state, scale = _f64(kw["state"]), kw.get("state_scale")
    if scale is not None:
        state = state * _f64(scale)[..., None]
    S, H, P, N = state.shape
    Tc = kw["old_x"].shape[1]
    G = kw["B"].shape[-2]
    rep = H // G
    A = _f64(kw["A"])
    per_channel = A.ndim == 3
    old = {k: _f64(kw[k]).copy() for k in ("old_x", "old_B", "old_dt", "old_cumAdt")}
    new = {k: v.copy() for k, v in old.items()}
    new["state"], new["cache_buf_idx"] = state.copy(), np.asarray(kw["cache_buf_idx"]).copy()
    x, dt, B, C = (_f64(kw[k]) for k in ("x", "dt", "B", "C"))
    z = None if kw.get("z") is None else _f64(kw["z"])
    D = None if kw.get("D") is None else _f64(kw["D"])
    bias = 0.0 if kw.get("dt_bias") is None else _f64(kw["dt_bias"])
    cu = kw.get("cu_seqlens")
    if cu is None:
        batch = x.shape[0]
        tokens = [[(b, t) for t in range(x.shape[1])] for b in range(batch)]
    else:
        cu = np.asarray(cu)
        batch = len(cu) - 1
        tokens = [[(0, i) for i in range(cu[b], cu[b + 1])] for b in range(batch)]
    sbi = kw.get("state_batch_indices")
    out = np.zeros(x.shape)
    for b in range(batch):
        s = b if sbi is None else int(sbi[b])
        if s == kw.get("pad_slot_id", -1):
            continue
        r, K = int(kw["cache_buf_idx"][s]), int(kw["prev_num_accepted_tokens"][s])
        for h in range(H):
            g = h // rep
            st = state[s, h].copy()
            for j in range(K):
                d = old["old_dt"][s, r, h, ..., j]
                decay = np.exp(A[h] * d[:, None]) if per_channel else np.exp(A[h] * d)
                st = decay * st + np.outer(d * old["old_x"][s, j, h], old["old_B"][s, r, j, g])
            new["state"][s, h] = st
            cum = 0.0
            for t in range(Tc):
                if t < len(tokens[b]):
                    tok = tokens[b][t]
                    d = dt[tok][h] + (bias[h] if np.ndim(bias) else 0.0)
                    if kw["dt_softplus"]:
                        d = np.log1p(np.exp(d))
                    decay = np.exp(A[h] * d[:, None]) if per_channel else np.exp(A[h] * d)
                    st = decay * st + np.outer(d * x[tok][h], B[tok][g])
                    y = st @ C[tok][g]
                    if D is not None:
                        y = y + D[h] * x[tok][h]
                    if z is not None:
                        y = y * z[tok][h] / (1 + np.exp(-z[tok][h]))
                    out[tok][h] = y
                    cum = cum + (d if per_channel else A[h] * d)
                    x_t, B_t = x[tok][h], B[tok][g]
                else:  # neutral entry
                    d, x_t, B_t = 0.0, 0.0, 0.0
                new["old_x"][s, t, h] = x_t
                new["old_B"][s, 1 - r, t, g] = B_t
                new["old_dt"][s, 1 - r, h, ..., t] = d
                new["old_cumAdt"][s, 1 - r, h, ..., t] = cum
        new["cache_buf_idx"][s] = 1 - r
    return out, new


def rel(ours, theirs) -> float:
    """``max|ours - theirs| / max|theirs|`` in float64."""
    ours, theirs = _f64(ours), _f64(theirs)
    return float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-30))


def dequantized(caches):
    state = _f64(caches.state)
    return state if caches.state_scale is None else state * _f64(caches.state_scale)[..., None]


def assert_matches_numpy(out, caches, kw, tol):
    expected_out, expected = numpy_ssu(kw)
    assert rel(out, expected_out) < tol
    assert rel(dequantized(caches), expected["state"]) < tol
    for k in ("old_x", "old_B", "old_dt", "old_cumAdt"):
        assert rel(getattr(caches, k), expected[k]) < tol, k
    np.testing.assert_array_equal(caches.cache_buf_idx, expected["cache_buf_idx"])


def assert_close(a, b, tol):
    """Two ``(out, caches)`` results agree (every cache array, the state dequantized)."""
    assert rel(a[0], b[0]) < tol
    assert rel(dequantized(a[1]), dequantized(b[1])) < tol
    for k in ("old_x", "old_B", "old_dt", "old_cumAdt"):
        assert rel(getattr(a[1], k), getattr(b[1], k)) < tol, k
    np.testing.assert_array_equal(a[1].cache_buf_idx, b[1].cache_buf_idx)


def untouched_slots(kw):
    sbi = np.asarray(kw["state_batch_indices"])
    return np.setdiff1d(np.arange(kw["state"].shape[0]), sbi[sbi >= 0])


# ---------------------------------------------------------------------------------------------
# Reference


# Float32 against float64: states of size O(1-10) through at most 2 * Tc = 8 updates and a readout over
# dstate = 6 terms lose a few float32 ulps (~1e-6 relative); 1e-5 leaves a margin, and a wrong term
# (a missed token, a wrong buffer or group) is an O(1) error.
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-head", "per-channel"])
def test_reference_matches_numpy_float64(per_channel):
    # every K from 0 to Tc (one slot each), padded and permuted rows, and T < Tc (neutral cache entries)
    kw = make_case(np.random.default_rng(0), S=5, batch=5, T=3, per_channel=per_channel, slots="padded")
    kw["prev_num_accepted_tokens"] = jnp.arange(5, dtype=jnp.int32)
    out, caches = checkpointing_ssu(**kw, config=REFERENCE)
    chex.assert_shape(out, kw["x"].shape)
    chex.assert_type(out, jnp.float32)
    assert isinstance(caches, SSUCaches) and caches.state_scale is None
    for k in CACHE_KEYS[:-1]:
        chex.assert_shape(getattr(caches, k), kw[k].shape)
        chex.assert_type(getattr(caches, k), kw[k].dtype)
    assert_matches_numpy(out, caches, kw, 1e-5)
    assert not np.any(np.asarray(out)[1])  # the padded row
    for k in CACHE_KEYS[:-1]:  # the padded row's slot is untouched
        np.testing.assert_array_equal(np.asarray(getattr(caches, k))[untouched_slots(kw)], np.asarray(kw[k])[untouched_slots(kw)])


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-head", "per-channel"])
def test_closed_form_replay_matches_the_loop(per_channel):
    """h_K = exp(cum[K-1]) h_0 + sum_{j<K} exp(cum[K-1] - cum[j]) dt_j x_j (x) B_j, from the cached running sums,
    equals K single steps, for every K in [0, Tc]. In float64 the two agree to rounding (1e-12), which shows the
    algebra; in float32 within 1e-5 (reassociated sums of a few O(1) terms)."""
    kw = make_case(np.random.default_rng(1), S=5, batch=5, per_channel=per_channel, slots=None)
    kw["prev_num_accepted_tokens"] = jnp.arange(5, dtype=jnp.int32)
    kw.pop("dt_softplus")
    run = jax.jit(functools.partial(reference, dt_softplus=True), static_argnames="closed_form")
    loop, closed = run(**kw), run(**kw, closed_form=True)
    assert rel(closed[1].state, loop[1].state) < 1e-5 and rel(closed[0], loop[0]) < 1e-5
    with jax.enable_x64(True):
        kw64 = {k: v.astype(jnp.float64) if jnp.issubdtype(v.dtype, jnp.floating) else v for k, v in kw.items()}
        A, old_dt = _f64(kw["A"]), _f64(kw["old_dt"])  # running sums in float64 (the cache's are float32)
        kw64["old_cumAdt"] = jnp.asarray(np.cumsum(old_dt if per_channel else A[:, None] * old_dt, axis=-1))
        loop, closed = run(**kw64), run(**kw64, closed_form=True)
        chex.assert_type(closed[1].state, jnp.float64)
        assert rel(closed[1].state, loop[1].state) < 1e-12
        assert rel(loop[1].state, numpy_ssu(dict(kw64, dt_softplus=True))[1]["state"]) < 1e-12


def test_float64_runs_the_reference_and_matches_numpy():
    """The kernel takes 16/32-bit arrays: float64 falls back to the reference (with a warning under "always")."""
    with jax.enable_x64(True):
        kw = make_case(np.random.default_rng(2), per_channel=False)
        kw = {k: v.astype(jnp.float64) if hasattr(v, "dtype") and jnp.issubdtype(v.dtype, jnp.floating) else v for k, v in kw.items()}
        with pytest.warns(RuntimeWarning, match="checkpointing_ssu: using the pure-JAX reference.*float64"):
            out, caches = checkpointing_ssu(**kw, config=KERNEL)
        chex.assert_type([out, caches.state], jnp.float64)
        assert_matches_numpy(out, caches, kw, 1e-12)


# ---------------------------------------------------------------------------------------------
# Kernel (interpret mode) against the reference and NumPy


# Kernel and reference both compute in float32 but in different orders (sequential running sums against
# cumsum, the readout's reduction order): ~1e-7 relative per call; 1e-5 over a chain of calls.
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-head", "per-channel"])
def test_kernel_matches_reference_over_calls(per_channel):
    rng = np.random.default_rng(3)
    kw = make_case(rng, per_channel=per_channel, slots="padded")
    kw["prev_num_accepted_tokens"] = jnp.asarray([0, 1, 2, 3, 4, 2], jnp.int32)  # every K in [0, Tc] (6 slots)
    kw_k = kw_r = kw
    for call in range(3):
        got = checkpointing_ssu(**kw_k, config=KERNEL)
        want = checkpointing_ssu(**kw_r, config=REFERENCE)
        assert_close(got, want, 1e-5)
        if call == 0:
            assert_matches_numpy(*got, kw, 1e-5)
        assert not np.any(np.asarray(got[0])[1])  # the padded row: zero output, its slot byte-identical
        for k in CACHE_KEYS[:-1]:
            np.testing.assert_array_equal(np.asarray(getattr(got[1], k))[untouched_slots(kw)],
                                          np.asarray(kw_k[k])[untouched_slots(kw)])
        step_rng = np.random.default_rng(100 + call)  # the same acceptance and drafts for both chains
        kw_k = accept_randomly(step_rng, kw_k, got[1])
        step_rng = np.random.default_rng(100 + call)
        kw_r = accept_randomly(step_rng, kw_r, want[1])


def test_kernel_matches_reference_in_bfloat16():
    """A bfloat16 state, caches and inputs (A, D, dt_bias, old_dt and old_cumAdt stay float32). Both compute in
    float32 from the same bfloat16 values and round their results to bfloat16 (2^-8 relative): 1e-2 leaves room
    for one rounding step on either side."""
    kw = make_case(np.random.default_rng(12), per_channel=False, slots="padded")
    kw.update({k: kw[k].astype(jnp.bfloat16) for k in ("state", "old_x", "old_B", "x", "dt", "B", "C", "z")})
    got = checkpointing_ssu(**kw, config=KERNEL)
    chex.assert_type([got[0], got[1].state, got[1].old_x, got[1].old_B], jnp.bfloat16)
    chex.assert_type([got[1].old_dt, got[1].old_cumAdt], jnp.float32)
    assert_close(got, checkpointing_ssu(**kw, config=REFERENCE), 1e-2)


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-head", "per-channel"])
def test_calls_equal_single_token_steps_over_the_accepted_tokens(per_channel):
    """THE property: calls with random acceptance give the outputs and the committed state of single-token
    steps (selective_state_update's reference) over exactly the accepted tokens. The last call accepts every
    draft of the previous one (K = T); others accept 0..T. Float32 within 1e-5 (single steps against the
    replay and the verify step: the same updates, reordered only in the readout's reduction)."""
    rng = np.random.default_rng(4)
    kw = make_case(rng, per_channel=per_channel, slots="permuted")
    kw["prev_num_accepted_tokens"] = jnp.zeros_like(kw["prev_num_accepted_tokens"])  # a fresh checkpoint
    S, H, P, N = kw["state"].shape
    sbi = np.asarray(kw["state_batch_indices"])
    truth = np.asarray(kw["state"])[sbi]  # each row's state after its accepted tokens
    A, bias, D = (np.asarray(kw[k]) for k in ("A", "dt_bias", "D"))
    if not per_channel:  # the single-token op's layout: per channel
        A, bias, D = (np.broadcast_to(A[:, None, None], (H, P, N)), np.broadcast_to(bias[:, None], (H, P)),
                      np.broadcast_to(D[:, None], (H, P)))

    def single_step(h, t, kw):
        dt = kw["dt"][:, t] if per_channel else jnp.broadcast_to(kw["dt"][:, t, :, None], (len(sbi), H, P))
        B, C = (jnp.repeat(kw[k][:, t], H // kw["B"].shape[2], axis=1) for k in ("B", "C"))
        return selective_state_update(h, kw["x"][:, t], dt, A, B, C, D, kw["z"][:, t], bias, True, config=REFERENCE)

    for call in range(5):
        for path, config in (("kernel", KERNEL), ("reference", REFERENCE)):
            out, caches = checkpointing_ssu(**kw, config=config)
            assert rel(np.asarray(caches.state)[sbi], truth) < 1e-5, (call, path)
            h = jnp.asarray(truth)
            for t in range(kw["x"].shape[1]):
                y, h = single_step(h, t, kw)
                assert rel(out[:, t], y) < 1e-5, (call, path, t)
            if path == "kernel":
                kernel_caches = caches
        accepted = rng.integers(0, kw["x"].shape[1] + 1, len(sbi)) if call < 3 else np.full(len(sbi), kw["x"].shape[1])
        h = jnp.asarray(truth)
        for t in range(kw["x"].shape[1]):  # advance each row's truth by its accepted drafts
            _, stepped = single_step(h, t, kw)
            h = jnp.where(jnp.asarray(t < accepted)[:, None, None, None], stepped, h)
        truth = np.asarray(h)
        pnat = np.zeros(S, np.int32)
        pnat[sbi] = accepted
        kw = accept_randomly(rng, kw, kernel_caches)
        kw["prev_num_accepted_tokens"] = jnp.asarray(pnat)


# ---------------------------------------------------------------------------------------------
# Packed layout


def _pack(kw, lengths):
    """The padded rows' first ``lengths[i]`` tokens packed as (1, total, ...), with cu_seqlens."""
    packed = dict(kw)
    for k in ("x", "dt", "B", "C", "z"):
        packed[k] = jnp.concatenate([kw[k][i, :n] for i, n in enumerate(lengths)])[None]
    packed["cu_seqlens"] = jnp.asarray(np.concatenate([[0], np.cumsum(lengths)]), jnp.int32)
    packed["max_seqlen"] = kw["x"].shape[1]
    return packed


def test_packed_layout_matches_the_same_sequences_padded():
    """Sequences of T_i = 3, 1, 0, 4 tokens: packed equals padded on the outputs of the real tokens, the
    committed state and the real tokens' cache entries; the entries past T_i are neutral, so a next call
    with K = Tc replays exactly T_i tokens, as K = T_i does. Kernel against reference and NumPy too."""
    lengths = [3, 1, 0, 4]
    kw = make_case(np.random.default_rng(5), slots="padded")
    packed = _pack(kw, lengths)
    got = checkpointing_ssu(**packed, config=KERNEL)
    chex.assert_shape(got[0], packed["x"].shape)
    assert_close(got, checkpointing_ssu(**packed, config=REFERENCE), 1e-5)
    assert_matches_numpy(*got, packed, 1e-5)
    padded = checkpointing_ssu(**kw, config=KERNEL)
    starts = np.asarray(packed["cu_seqlens"])
    sbi = np.asarray(kw["state_batch_indices"])
    for i, n in enumerate(lengths):
        if n and sbi[i] >= 0:  # the same float32 operations on the same tokens
            assert rel(got[0][0, starts[i]:starts[i] + n], padded[0][i, :n]) < 1e-6
    assert rel(got[1].state, padded[1].state) == 0  # the replay does not depend on the new tokens
    w = 1 - np.asarray(kw["cache_buf_idx"])
    for i, n in enumerate(lengths):
        s = sbi[i]
        if s < 0:
            continue
        g, p = got[1], padded[1]
        np.testing.assert_array_equal(g.old_x[s, :n], p.old_x[s, :n])
        np.testing.assert_array_equal(g.old_B[s, w[s], :n], p.old_B[s, w[s], :n])
        np.testing.assert_allclose(g.old_cumAdt[s, w[s], :, :n], p.old_cumAdt[s, w[s], :, :n], rtol=1e-6)
        assert not np.any(g.old_x[s, n:]) and not np.any(g.old_B[s, w[s], n:]) and not np.any(g.old_dt[s, w[s], :, n:])
        held = g.old_cumAdt[s, w[s], :, n - 1] if n else np.zeros(kw["state"].shape[1])
        np.testing.assert_array_equal(g.old_cumAdt[s, w[s], :, n:], np.broadcast_to(np.asarray(held)[:, None], (len(held), 4 - n)))
    # the next call: K = T_i against K = Tc (the neutral entries replay as the identity)
    nxt = dict(packed, **{k: v for k, v in got[1]._asdict().items() if v is not None})
    pnat = np.zeros(kw["state"].shape[0], np.int32)
    pnat[sbi[sbi >= 0]] = np.asarray(lengths)[sbi >= 0]
    exact = checkpointing_ssu(**dict(nxt, prev_num_accepted_tokens=jnp.asarray(pnat)), config=KERNEL)
    full = checkpointing_ssu(**dict(nxt, prev_num_accepted_tokens=jnp.full_like(jnp.asarray(pnat), 4)), config=KERNEL)
    assert rel(full[1].state, exact[1].state) == 0


# ---------------------------------------------------------------------------------------------
# 8-bit states


@pytest.mark.parametrize("dtype", [jnp.int8, F8], ids=["int8", "float8_e4m3fn"])
def test_8bit_state_round_to_nearest(dtype):
    """The outputs equal a float32 run from the dequantized state (1e-5: the same float32 math); the committed
    state is the float32 one within half a quantization step (int8: scale / 2; float8: 2^-4 relative, or half
    the subnormal step 2^-10 in units of the scale), plus float32 rounding of the scale. Kernel and reference
    may differ by one step where float32 rounding puts a value on the other side of a rounding boundary."""
    rng = np.random.default_rng(6)
    kw = make_case(rng, state_dtype=dtype, slots="padded")
    if dtype == F8:  # also the bare options: no D, z or dt_bias, steps used as is
        kw.update(D=None, z=None, dt_bias=None, dt_softplus=False,
                  dt=jnp.asarray(np.exp(rng.uniform(np.log(1e-3), np.log(0.1), kw["dt"].shape)), jnp.float32))
    got = checkpointing_ssu(**kw, config=KERNEL)
    want = checkpointing_ssu(**kw, config=REFERENCE)
    chex.assert_type([got[1].state, want[1].state], dtype)
    chex.assert_type([got[1].state_scale, want[1].state_scale], jnp.float32)
    as_float = dict(kw, state=jnp.asarray(dequantized(SSUCaches(kw["state"], *[None] * 5, kw["state_scale"])), jnp.float32))
    as_float.pop("state_scale")
    exact = checkpointing_ssu(**as_float, config=REFERENCE)
    sbi = np.asarray(kw["state_batch_indices"])
    slots = sbi[sbi >= 0]
    h = _f64(exact[1].state)[slots]
    scale = _f64(want[1].state_scale)[slots][..., None]
    if dtype == jnp.int8:
        step_size = scale
        bound = 0.5 * scale + 1e-5 * np.abs(h)
    else:
        step_size = np.maximum(2.0 ** (np.floor(np.log2(np.maximum(np.abs(h) / np.maximum(scale, 1e-30), 2.0**-6))) - 3), 2.0**-9) * scale
        bound = 0.5 * step_size + 1e-5 * np.abs(h)
    for result in (got, want):
        assert rel(result[0], exact[0]) < 1e-5
        assert np.all(np.abs(dequantized(result[1])[slots] - h) <= bound)
        np.testing.assert_allclose(_f64(result[1].state_scale)[slots], np.abs(h).max(-1) / QMAX[jnp.dtype(dtype)], rtol=1e-5)
    assert np.all(np.abs(dequantized(got[1])[slots] - dequantized(want[1])[slots]) <= step_size * 1.0001)
    np.testing.assert_array_equal(_f64(got[1].state)[untouched_slots(kw)], _f64(kw["state"])[untouched_slots(kw)])


@pytest.mark.parametrize("dtype", [jnp.int8, F8], ids=["int8", "float8_e4m3fn"])
def test_8bit_stochastic_rounding_is_unbiased(dtype):
    """Over 200 seeds, the mean residual (dequantized state minus the float32 state) is about 0: within 5
    standard errors per element (a residual lies within one step, so its standard deviation is at most half a
    step), and the overall mean within 5 standard errors of the mean. Round to nearest is not: on a state
    whose values sit a quarter step above the grid, its residual is -1/4 step, and the stochastic mean is ~0.
    The kernel draws the same noise as the reference (a hash of the seed and the element's position)."""
    rng = np.random.default_rng(7)
    kw = make_case(rng, S=2, batch=2, H=2, G=1, P=4, N=8, state_dtype=dtype, slots=None)
    kw["prev_num_accepted_tokens"] = jnp.full((2,), 4, jnp.int32)  # replay: a committed state off the 8-bit grid
    float_kw = dict(kw, state=jnp.asarray(dequantized(SSUCaches(kw["state"], *[None] * 5, kw["state_scale"])), jnp.float32))
    float_kw.pop("state_scale")
    h = _f64(checkpointing_ssu(**float_kw, config=REFERENCE)[1].state)
    seeds = 200
    residuals = np.stack([dequantized(checkpointing_ssu(**kw, rand_seed=jax.random.key(i), config=REFERENCE)[1]) - h
                          for i in range(seeds)])
    scale = _f64(checkpointing_ssu(**kw, config=REFERENCE)[1].state_scale)[..., None]
    v = np.abs(h) / scale
    step = scale if dtype == jnp.int8 else np.maximum(2.0 ** (np.floor(np.log2(np.maximum(v, 2.0**-6))) - 3), 2.0**-9) * scale
    assert np.all(np.abs(residuals) <= step * 1.0001)
    assert np.any(residuals != 0)  # rounding happened
    mean = residuals.mean(0) / step
    assert np.all(np.abs(mean) <= 5 * 0.5 / math.sqrt(seeds))
    assert abs(mean.mean()) <= 5 * 0.5 / math.sqrt(seeds * mean.size)
    # values a quarter step above the grid (one at full scale, so the factor is 1): nearest rounds every one
    # down by 1/4 step; stochastic rounding with the op's noise is unbiased (per value +3/4 with p = 1/4, -1/4
    # with p = 3/4: standard deviation 0.433 steps)
    qmax = QMAX[jnp.dtype(dtype)]
    grid = np.asarray(jnp.asarray(rng.uniform(1, qmax / 2, (64, 32)).astype(np.float32)).astype(dtype), np.float32)
    grid[:, 0] = qmax
    ulp = np.ones_like(grid) if dtype == jnp.int8 else 2.0 ** (np.floor(np.log2(grid)) - 3)
    v = jnp.asarray(grid + 0.25 * ulp).at[:, 0].set(qmax)
    near = (_f64(ssu.quantize(v, dtype)[0]) - _f64(v)) / ulp
    np.testing.assert_allclose(near[:, 1:], -0.25)
    index = jnp.arange(v.size, dtype=jnp.uint32).reshape(v.shape)
    quantize = jax.jit(lambda v, seed: ssu.quantize(v, dtype, ssu.uniform_noise(seed[0], seed[1], index))[0])
    stoch = np.stack([(_f64(quantize(v, jax.random.bits(jax.random.key(1000 + i), (2,), jnp.uint32))) - _f64(v)) / ulp
                      for i in range(seeds)])[:, :, 1:]
    assert set(np.unique(stoch)) <= {-0.25, 0.75}
    assert abs(stoch.mean()) <= 5 * 0.433 / math.sqrt(stoch.size)
    # the kernel draws the same noise: identical 8-bit states up to float32 rounding at a boundary
    key = jax.random.key(3)
    got = checkpointing_ssu(**kw, rand_seed=key, config=KERNEL)
    want = checkpointing_ssu(**kw, rand_seed=key, config=REFERENCE)
    assert np.mean(_f64(got[1].state) == _f64(want[1].state)) > 0.99
    assert np.all(np.abs(dequantized(got[1]) - dequantized(want[1])) <= step * 1.0001)


# ---------------------------------------------------------------------------------------------
# Triton lowering, in place, dispatch


def _lowerable(kw):
    """``(fn, arrays)`` for ``lower_for_h100``: the op over its array arguments, kernel compiled (not interpreted)."""
    names = [k for k, v in kw.items() if isinstance(v, jax.Array)]
    static = {k: v for k, v in kw.items() if k not in names}
    config = dispatch.KernelConfig(use_kernels="always", interpret=False)
    return (lambda *arrays: checkpointing_ssu(**static, **dict(zip(names, arrays)), config=config)), [kw[k] for k in names]


@TRITON_DEPRECATION
@pytest.mark.parametrize("name", ["per-head-f32", "per-channel-bf16-packed", "int8-stochastic", "float8-nearest",
                                  "float8-stochastic-per-channel"])
def test_kernel_lowers_to_triton(lower_for_h100, name):
    rng = np.random.default_rng(8)
    state_dtype = {"int8": jnp.int8, "float8": F8}.get(name.split("-")[0], jnp.float32)
    kw = make_case(rng, S=4, batch=3, P=32, N=16, per_channel="per-channel" in name, state_dtype=state_dtype, slots="padded")
    if "bf16" in name:
        kw.update({k: kw[k].astype(jnp.bfloat16) for k in ("state", "old_x", "old_B", "x", "B", "C", "z")})
    if "packed" in name:
        kw = _pack(kw, [4, 2, 3])
    if "stochastic" in name:
        kw["rand_seed"] = jax.random.key(0)
    fn, arrays = _lowerable(kw)
    lower_for_h100(fn, *arrays)  # one Triton kernel in the module


def test_in_place_update_is_aliased():
    """Under a jit that donates the caches, the compiled program aliases every one of them to its output (alias
    bytes = their total), needs no more temporary memory than without donation (no copy of the state is made),
    and returns the new state in the donated buffer. (In interpret mode the temporaries are the interpreter's
    own, about 10x the state here; benchmarks/benchmark_ssu.py reports the GPU program's.)"""
    kw = make_case(np.random.default_rng(9), S=8, batch=6, H=2, G=1, P=16, N=16, slots="padded")
    donated = ("state", "old_x", "old_B", "old_dt", "old_cumAdt", "cache_buf_idx")
    rest = {k: v for k, v in kw.items() if k not in donated}
    static = {k: v for k, v in rest.items() if not isinstance(v, jax.Array)}
    dynamic = {k: v for k, v in rest.items() if isinstance(v, jax.Array)}

    def verify(state, old_x, old_B, old_dt, old_cumAdt, cache_buf_idx, inputs):
        return checkpointing_ssu(state, old_x, old_B, old_dt, old_cumAdt, cache_buf_idx, **inputs, **static, config=KERNEL)

    caches = [kw[k] for k in donated]
    plain = jax.jit(verify).lower(*caches, dynamic).compile().memory_analysis()
    compiled = jax.jit(verify, donate_argnums=tuple(range(6))).lower(*caches, dynamic).compile()
    analysis = compiled.memory_analysis()
    assert plain.alias_size_in_bytes == 0
    assert analysis.alias_size_in_bytes == sum(a.nbytes for a in caches)
    assert analysis.temp_size_in_bytes <= plain.temp_size_in_bytes
    copies = [jnp.copy(a) for a in caches]
    pointer = copies[0].unsafe_buffer_pointer()
    out, new = compiled(*copies, dynamic)
    assert new.state.unsafe_buffer_pointer() == pointer
    assert_close((out, new), checkpointing_ssu(**kw, config=REFERENCE), 1e-5)


def test_auto_runs_the_reference_off_gpu_and_config_reaches_the_kernel(monkeypatch):
    """Off an NVIDIA GPU (forced here, so that the test means the same on the GPU machine) "auto" runs the
    reference; "always" reaches the kernel with the config's knobs."""
    monkeypatch.setattr(dispatch, "on_nvidia_gpu", lambda: False)
    kw = make_case(np.random.default_rng(10), slots=None, S=4)
    auto = str(jax.make_jaxpr(lambda: checkpointing_ssu(**kw, config=dispatch.KernelConfig()))())
    assert "pallas_call" not in auto
    text = str(jax.make_jaxpr(lambda: checkpointing_ssu(**kw, config=dispatch.KernelConfig(use_kernels="always", num_warps=8)))())
    assert "pallas_call" in text and "num_warps=8" in text


# ---------------------------------------------------------------------------------------------
# Bad inputs


def _good(**changes):
    kw = make_case(np.random.default_rng(11), S=4, batch=3, H=4, G=2, P=5, N=3, Tc=4, slots="permuted")
    kw.update(changes)
    return kw


BAD = [
    (dict(x=jnp.zeros((3, 4, 3, 5))), ValueError, r"x must have shape \(batch, T, nheads, dim\) = \(batch, T, 4, 5\), got \(3, 4, 3, 5\)"),
    (dict(B=jnp.zeros((3, 4, 3, 3)), C=jnp.zeros((3, 4, 3, 3))), ValueError, r"nheads=4 .* must be a multiple of ngroups=3"),
    (dict(C=jnp.zeros((3, 4, 1, 3))), ValueError, r"C must have shape \(batch, T, ngroups, dstate\) = \(3, 4, 2, 3\), got \(3, 4, 1, 3\)"),
    (dict(old_B=jnp.zeros((4, 2, 4, 1, 3))), ValueError, r"old_B must have shape \(S, 2, T, ngroups, dstate\) = \(4, 2, 4, 2, 3\)"),
    (dict(x=jnp.zeros((3, 5, 4, 5))), ValueError, r"x has T=5 tokens per row, more than the caches hold.*T <= 4.*got \(3, 5, 4, 5\)"),
    (dict(prev_num_accepted_tokens=jnp.asarray([5, 5, 5, 5], jnp.int32)), ValueError,
     r"prev_num_accepted_tokens\[\d\] = 5 must be 0 <= K <= T=4"),
    (dict(cache_buf_idx=jnp.asarray([2, 2, 2, 2], jnp.int32)), ValueError, r"cache_buf_idx\[\d\] = 2 must be 0 or 1"),
    (dict(state_batch_indices=jnp.asarray([0, 4, 1], jnp.int32)), ValueError,
     r"state_batch_indices must hold slots 0 <= s < 4 .* got 4 in \[0, 4, 1\]"),
    (dict(state_batch_indices=jnp.asarray([0, 1, 1], jnp.int32)), ValueError, "must not repeat a slot"),
    (dict(state_batch_indices=jnp.asarray([0, 1], jnp.int32)), ValueError, r"state_batch_indices must have shape \(batch,\) = \(3,\), got \(2,\)"),
    (dict(state_batch_indices=None), ValueError, r"state has 4 slots .* but there are 3 rows"),
    (dict(dt=jnp.zeros((3, 4, 4, 5))), ValueError, r"dt must have shape \(batch, T, nheads\) .* = \(3, 4, 4\), got \(3, 4, 4, 5\)"),
    (dict(A=jnp.zeros((4, 5))), ValueError, r"A must have shape \(nheads,\) = \(4,\) or \(nheads, dim, dstate\) = \(4, 5, 3\), got \(4, 5\)"),
    (dict(A=-jnp.ones((4, 5, 3))), ValueError, r"dt must have shape \(batch, T, nheads, dim\) with a per-channel A = \(3, 4, 4, 5\)"),
    (dict(old_dt=jnp.zeros((4, 2, 4, 3))), ValueError, r"old_dt must have shape \(S, 2, nheads, T\) = \(4, 2, 4, 4\), got \(4, 2, 4, 3\)"),
    (dict(D=jnp.zeros((3,))), ValueError, r"D must have shape \(nheads,\) = \(4,\) or \(nheads, dim\) = \(4, 5\), got \(3,\)"),
    (dict(state=jnp.zeros((4, 4, 5, 3), jnp.int16)), TypeError, "state must be float32, bfloat16, float16, float64, int8 or float8_e4m3fn, got int16"),
    (dict(x=jnp.zeros((3, 4, 4, 5), jnp.int32)), TypeError, "x must have a real floating dtype, got int32"),
    (dict(old_dt=jnp.zeros((4, 2, 4, 4), jnp.bfloat16)), TypeError, "old_dt must be float32, got bfloat16"),
    (dict(cache_buf_idx=jnp.zeros((4,))), TypeError, "cache_buf_idx must have an integer dtype"),
    (dict(state=jnp.zeros((4, 4, 5, 3), jnp.int8)), ValueError, r"an int8 state needs state_scale of shape \(S, nheads, dim\) = \(4, 4, 5\)"),
    (dict(state_scale=jnp.ones((4, 4, 5))), ValueError, "state_scale is for an int8 or float8_e4m3fn state"),
]


@pytest.mark.parametrize("changes,error,message", BAD)
def test_bad_inputs_raise(changes, error, message):
    with pytest.raises(error, match=message):
        checkpointing_ssu(**_good(**changes), config=REFERENCE)


def _good_packed(cu, max_seqlen=None):
    kw = _good()
    for k in ("x", "dt", "B", "C", "z"):
        kw[k] = kw[k].reshape((1, 12) + kw[k].shape[2:])
    return dict(kw, cu_seqlens=jnp.asarray(cu, jnp.int32), max_seqlen=max_seqlen)


@pytest.mark.parametrize("cu,max_seqlen,message", [
    ([0, 4, 3, 7], None, r"cu_seqlens must start at 0 and be non-decreasing .* got \[0, 4, 3, 7\]"),
    ([1, 4, 6, 7], None, "cu_seqlens must start at 0"),
    ([0, 4, 8, 13], None, r"up to at most total_tokens=12"),
    ([0, 4, 7, 10], 2, r"cu_seqlens: sequence 0 has T_0=4 tokens, more than max_seqlen=2"),
    ([0, 5, 7, 10], None, r"max_seqlen=5 must be in \[1, T\] with the caches' T=4"),
    ([0, 4, 8], None, r"state_batch_indices must have shape \(batch,\) = \(2,\), got \(3,\)"),
])
def test_bad_packed_inputs_raise(cu, max_seqlen, message):
    with pytest.raises(ValueError, match=message):
        checkpointing_ssu(**_good_packed(cu, max_seqlen), config=REFERENCE)


def test_values_are_clipped_under_jit():
    """Under jit the values cannot be checked: K is clipped to [0, T] (K = 9 replays T = 4 tokens)."""
    kw = _good(prev_num_accepted_tokens=jnp.full((4,), 9, jnp.int32))
    arrays = {k: v for k, v in kw.items() if isinstance(v, jax.Array)}
    static = {k: v for k, v in kw.items() if k not in arrays}
    jitted = jax.jit(lambda a: checkpointing_ssu(**a, **static, config=REFERENCE))(arrays)
    clipped = checkpointing_ssu(**dict(kw, prev_num_accepted_tokens=jnp.full((4,), 4, jnp.int32)), config=REFERENCE)
    assert rel(jitted[1].state, clipped[1].state) == 0
