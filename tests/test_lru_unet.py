"""LRUUnet against a float64 NumPy reference of its structure (the mixers as black boxes in float64, the convs,
resampling, delays, norms, skips and padding in NumPy, channels first as lrnnx); strict causality (every input moved
in turn), lrnnx's one-sample delay shown non-causal, ragged ``lengths``, finite-difference gradients under jit, dtypes
and clear errors."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import relative_error
from lrnnx_jax.architectures import LRUUnet
from lrnnx_jax.architectures import lru_unet


# ================================================================ the float64 NumPy reference (channels first)
def np_conv1d(x, weight, bias, stride):
    """torch ``Conv1d(padding=0)``: ``x (B, C_in, T)``, ``weight (C_out, C_in, k)``."""
    k = weight.shape[2]
    steps = (x.shape[2] - k) // stride + 1
    y = np.empty((x.shape[0], weight.shape[0], steps))
    for j in range(steps):
        y[:, :, j] = np.einsum("bck,ock->bo", x[:, :, j * stride:j * stride + k], weight) + bias
    return y


def np_conv_transpose1d(x, weight, bias, stride):
    """torch ``ConvTranspose1d(padding=0)``: ``x (B, C_in, S)``, ``weight (C_in, C_out, k)`` -> ``(B, C_out, (S-1) stride + k)``."""
    k = weight.shape[2]
    y = np.zeros((x.shape[0], weight.shape[1], (x.shape[2] - 1) * stride + k))
    for j in range(x.shape[2]):
        y[:, :, j * stride:j * stride + k] += np.einsum("bc,cok->bok", x[:, :, j], weight)
    return y + bias[None, :, None]


def np_block(block, h):
    """A block on ``h (B, C, T)``: the mixer in float64 (black box), LayerNorm over channels, SiLU."""
    if getattr(block.mixer, "transposed", False):  # S4's default layout (B, H, L)
        y = np.asarray(block.mixer(jnp.asarray(h)))
    else:
        y = np.asarray(block.mixer(jnp.asarray(h.transpose(0, 2, 1)))).transpose(0, 2, 1)
    if block.norm is not None:
        mean = y.mean(1, keepdims=True)
        var = ((y - mean) ** 2).mean(1, keepdims=True)
        scale, bias = (np.asarray(v[...], np.float64)[None, :, None] for v in (block.norm.scale, block.norm.bias))
        y = (y - mean) / np.sqrt(var + block.norm.epsilon) * scale + bias
    return y / (1 + np.exp(-y)) if block.activation else y


def np_unet(model, x, causal_shift=None):
    """The U-Net on ``x (B, C_in, T)`` float64; ``causal_shift(r)`` is the decoder's delay (default: ``r - 1``
    when causal, else 0)."""
    causal_shift = causal_shift or (lambda r: r - 1 if model.causal else 0)
    length = x.shape[2]
    total = int(np.prod(model.resample_factors))
    h = np.concatenate([x, np.zeros(x.shape[:2] + (-length % total,))], 2)
    as64 = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    skips = []
    for i, r in enumerate(model.resample_factors):
        skips.append(h)
        h = np_block(model.encoder[i], h)
        down = model.down[i]
        h = np_conv1d(h, as64(down.kernel).transpose(2, 1, 0), as64(down.bias), r)  # torch (C_out, C_in, k)
    for block in model.bottleneck:
        h = np_block(block, h)
    for i in reversed(range(len(model.resample_factors))):
        r, up = model.resample_factors[i], model.up[i]
        u = np_conv_transpose1d(h, as64(up.kernel).transpose(1, 2, 0), as64(up.bias), r)  # torch (C_in, C_out, k)
        s = causal_shift(r)
        if s:
            u = np.concatenate([np.zeros(u.shape[:2] + (s,)), u[:, :, :-s]], 2)
        h = np_block(model.decoder[i], u + skips[i])
    for block in model.head:
        h = np_block(block, h)
    if model.projection is not None:
        h = np.einsum("bct,cd->bdt", h, as64(model.projection))
    return h[:, :, :length]


def randomize(model, rng):
    """Nonzero LayerNorm biases and non-unit scales (the defaults hide layout errors)."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.LayerNorm):
            c = module.scale[...].shape[0]
            module.scale.set_value(jnp.asarray(1 + 0.3 * rng.standard_normal(c), module.scale[...].dtype))
            module.bias.set_value(jnp.asarray(0.3 * rng.standard_normal(c), module.bias[...].dtype))


def build(seed=0, **kwargs):
    kwargs = {"channels": [3, 4], "resample_factors": [2, 3], **kwargs}
    model = LRUUnet(**kwargs, rngs=nnx.Rngs(seed))
    randomize(model, np.random.default_rng(seed))
    return model


@functools.cache
def shared(causal=True, factors=(4, 2)):
    """A model several tests read (never modify): 3 channels in (a LayerNorm over 2 channels is nearly a sign
    function, whose derivatives vanish), 1 out."""
    return build(in_channels=3, out_channels=1, channels=[3, 4], resample_factors=list(factors), causal=causal)


CONFIGS = {
    "lrnnx-doubling-causal": (dict(in_channels=1, out_channels=1, channels=[2, 4], resample_factors=[4, 2]), 13),
    "two-in-three-out-noncausal": (dict(in_channels=2, out_channels=3, channels=[4, 3], resample_factors=[3, 2],
                                        causal=False), 12),
    "one-level-S4D": (dict(in_channels=3, out_channels=1, channels=[3], resample_factors=[3], mixer="S4D",
                           mixer_kwargs=dict(dt_min=0.05, dt_max=0.5)), 7),
    "RGLRU-factor-1": (dict(in_channels=2, out_channels=2, channels=[3, 2], resample_factors=[1, 2], mixer="RGLRU"), 5),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_float64_numpy_reference(name):
    kwargs, length = CONFIGS[name]
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        model = build(**kwargs)
        x = rng.standard_normal((2, model.in_channels, length))
        y = model(jnp.asarray(x))
        chex.assert_shape(y, (2, model.out_channels, length))
        chex.assert_type(y, jnp.float64)
        assert relative_error(y, np_unet(model, x)) < 1e-12


def test_channels_set_each_level_and_doubling_is_lrnnx():
    with jax.enable_x64(True):  # the configurations of the reference test (their initialisers are compiled)
        model = build(**CONFIGS["two-in-three-out-noncausal"][0])
        lrnnx = build(**CONFIGS["lrnnx-doubling-causal"][0])
    assert model.widths == (2, 4, 3)
    chex.assert_shape([model.down[0].kernel[...], model.down[1].kernel[...]], [(3, 2, 4), (2, 4, 3)])
    chex.assert_shape([model.up[0].kernel[...], model.up[1].kernel[...]], [(3, 4, 2), (2, 3, 4)])
    assert [b.mixer.d_model for b in (*model.encoder, *model.bottleneck, *model.decoder, *model.head)] == [2, 4, 3, 3, 2, 4, 2, 2]
    assert model.head[0].norm is not None and model.head[1].norm is None and not model.head[1].activation
    assert [u.shift for u in model.up] == [0, 0]  # causal=False
    chex.assert_shape(model.projection[...], (2, 3))
    # lrnnx's widths double from in_channels: channels=[2 in, 4 in]; N = H = C; no LayerNorm on one channel
    assert lrnnx.widths == (1, 2, 4)
    assert [(b.mixer.d_model, b.mixer.d_state) for b in lrnnx.encoder] == [(1, 1), (2, 2)]
    assert lrnnx.encoder[0].norm is None and lrnnx.projection is None
    assert [u.shift for u in lrnnx.up] == [3, 1]


def dependence(model, x):
    """``dep[s, t] = max |y[:, t]|`` change when every channel of input ``s`` moves by 1 (``x (1, C, T)``),
    from one batched call."""
    length = x.shape[2]
    moved = np.repeat(x, length, 0)
    moved[np.arange(length), :, np.arange(length)] += 1.0
    y = np.asarray(model(jnp.asarray(np.concatenate([x, moved]))))
    return np.abs(y[1:] - y[:1]).max(axis=1)


@pytest.mark.parametrize("factors", [(4, 2), (3, 3)])
def test_causal_output_never_depends_on_later_inputs(factors):
    total = int(np.prod(factors))
    length = 2 * total + 3
    x = np.random.default_rng(2).standard_normal((1, 3, length))
    later = np.tril(np.ones((length, length), bool), -1)  # [s, t]: input s after output t
    with jax.enable_x64(True):
        dep = dependence(shared(True, factors), x)
        assert np.max(dep[later]) <= 1e-13 * np.max(dep)
        assert np.all(np.diagonal(dep) > 1e-6 * np.max(dep))  # each output sees its own input
        # causal=False looks ahead, at most to the end of the output's block of P samples
        dep = dependence(shared(False, factors), x)
        block_end = (np.arange(length) // total + 1) * total
        beyond = np.arange(length)[:, None] >= block_end[None, :]
        assert np.max(dep[beyond]) <= 1e-13 * np.max(dep)
        assert np.max(dep[later]) > 1e-6 * np.max(dep)


def test_decoder_delay_of_r_minus_1_is_the_least_causal_one():
    """A coarse sample summarizes r inputs; lrnnx's one-sample delay lets r >= 3 see up to r - 2 samples ahead."""
    rng = np.random.default_rng(3)
    kernel_down, kernel_up = rng.standard_normal((4, 2, 3)), rng.standard_normal((4, 3, 2))
    with jax.enable_x64(True):
        def resample(x, shift):
            coarse = lru_unet.strided_conv(x, jnp.asarray(kernel_down), jnp.zeros(3))
            return lru_unet.delay(lru_unet.transposed_conv(coarse, jnp.asarray(kernel_up), jnp.zeros(2)), shift)

        def lookahead(shift):
            jac = jax.jacrev(lambda v: resample(v, shift))(jnp.zeros((1, 16, 2)))[0, :, :, 0, :, :]
            dep = np.abs(np.asarray(jac)).sum(axis=(1, 3))  # (T_out, T_in)
            t, s = np.nonzero(dep > 1e-12)
            return int(np.max(s - t))

        assert lookahead(0) == 3  # causal=False
        assert lookahead(1) == 2  # lrnnx's causal=True at r = 4
        assert lookahead(2) == 1
        assert lookahead(lru_unet.causal_delay(4, True)) == 0
        # the whole network with lrnnx's delay at its default factors [4, 2]: the output at t = 4j + 1 moves with
        # the input at 4j + 3 (the NumPy reference with lrnnx's delay); with ours it does not
        model, x = shared(True, (4, 2)), rng.standard_normal((1, 3, 16))
        moved = x.copy()
        moved[:, :, 7] += 1.0
        for shift, changes in ((lambda r: 1, True), (None, False)):
            change = np.abs(np_unet(model, moved, shift) - np_unet(model, x, shift))[0].max(0)
            assert (change[5] > 1e-6 * change.max()) == changes
            assert np.all(change[:5] == 0)
    assert lru_unet.causal_delay(4, False) == 0


@pytest.mark.parametrize("causal", [True, False])
def test_lengths_rows_equal_the_row_cut_at_its_length(causal):
    rng = np.random.default_rng(4)
    lengths = np.resize([19, 9, 0, 13, 1, 8], 20)  # the shapes of the causality test's batch: its program runs `cut`
    with jax.enable_x64(True):
        model = shared(causal)
        x = rng.standard_normal((20, 3, 19))
        after = np.broadcast_to(np.arange(19)[None, None, :] >= lengths[:, None, None], x.shape)
        y = np.asarray(model(jnp.asarray(np.where(after, 1e3, x)), lengths=jnp.asarray(lengths)))
        np.testing.assert_array_equal(y, np.asarray(model(jnp.asarray(x), lengths=jnp.asarray(lengths))))
        assert np.all(y[after[:, :1]] == 0)
        # each row as if cut at its length: the network pads a cut row with zeros itself (as the reference test checks)
        cut = np.asarray(model(jnp.asarray(np.where(after, 0.0, x))))
        for row, n in enumerate(lengths):
            if n:
                assert relative_error(y[row, :, :n], cut[row, :, :n]) < 1e-12


def test_gradients_match_finite_differences_under_jit():
    rng = np.random.default_rng(5)
    with jax.enable_x64(True):
        model = build(in_channels=3, out_channels=1, channels=[3], resample_factors=[3])
        # float64 parameters, so that the finite differences see exactly the perturbed values
        nnx.update(model, jax.tree.map(lambda p: p.astype(jnp.float64), nnx.state(model, nnx.Param)))
        x = jnp.asarray(rng.standard_normal((2, 3, 8)))
        weights = jnp.asarray(rng.standard_normal((2, 1, 8)))
        lengths = jnp.array([8, 6])
        eps = 1e-6
        directions = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape)), nnx.state(model, nnx.Param))
        dx = jnp.asarray(rng.standard_normal(x.shape))

        def loss(m, v):
            return jnp.sum(weights * m(v, lengths=lengths))

        @nnx.jit
        def gradients_and_finite_difference(m, v):
            grads = nnx.grad(loss, argnums=(0, 1))(m, v)
            graphdef, params, rest = nnx.split(m, nnx.Param, ...)

            def moved(sign):
                p = jax.tree.map(lambda a, d: a + sign * eps * d, params, directions)
                return loss(nnx.merge(graphdef, p, rest), v + sign * eps * dx)

            return grads, (moved(1) - moved(-1)) / (2 * eps)

        (grad_m, grad_x), finite = gradients_and_finite_difference(model, x)
        grads = jax.tree.leaves(nnx.state(grad_m, nnx.Param))
        exact = sum(jnp.vdot(g, d) for g, d in zip(grads, jax.tree.leaves(directions))) + jnp.vdot(grad_x, dx)
        assert abs(finite - exact) <= 1e-7 * abs(exact)
        # the gradient reaches every parameter, and no input at or after a row's length
        assert len(grads) == len(jax.tree.leaves(directions)) and all(float(jnp.max(jnp.abs(g))) > 0 for g in grads)
        assert np.all(np.asarray(grad_x)[1, :, 6:] == 0)


def test_nnx_jit_matches_eager():
    rng = np.random.default_rng(6)
    with jax.enable_x64(True):
        model = build(**CONFIGS["two-in-three-out-noncausal"][0])
        x = jnp.asarray(rng.standard_normal((3, 2, 10)))
        lengths = jnp.array([10, 7, 3])
        y = nnx.jit(lambda m, v, n: m(v, lengths=n))(model, x, lengths)
        chex.assert_shape(y, (3, 3, 10))
        assert relative_error(y, model(x, lengths=lengths)) < 1e-12


def test_dtypes():
    with jax.enable_x64(True):  # built like the reference test's models (compiled initialisers), then float32
        model = build(**CONFIGS["lrnnx-doubling-causal"][0])
        nnx.update(model, jax.tree.map(lambda p: p.astype(jnp.float32), nnx.state(model, nnx.Param)))
        bf16 = build(channels=[2], resample_factors=[2], dtype=jnp.bfloat16)
        # d_state: one state size for every mixer (default: each block's width)
        assert [b.mixer.d_state for b in build(channels=[2], resample_factors=[2], d_state=3).bottleneck] == [3, 3]
    chex.assert_type(bf16.down[0].kernel[...], jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(7).standard_normal((1, 1, 5)), jnp.float32)
    y32 = model(x)
    chex.assert_type(y32, jnp.float32)
    y16 = model(x.astype(jnp.bfloat16))
    chex.assert_type(y16, jnp.bfloat16)  # computed in float32, returned in the input's dtype
    assert relative_error(y16.astype(jnp.float32), y32) < 2e-2


def test_clear_errors():
    rngs = nnx.Rngs(0)
    bad = [
        (dict(channels=[8, 16], resample_factors=[4]), ValueError, "same nonzero length"),
        (dict(channels=[], resample_factors=[]), ValueError, "same nonzero length"),
        (dict(channels=[8, 0], resample_factors=[4, 2]), ValueError, r"channels\[1\]"),
        (dict(resample_factors=[4, 2.0]), ValueError, r"resample_factors\[1\]"),
        (dict(channels=8), TypeError, "lists of integers"),
        (dict(in_channels=0), ValueError, "in_channels"),
        (dict(pre_conv=True), ValueError, "pre_conv"),
        (dict(causal="yes"), TypeError, "causal"),
        (dict(dtype=jnp.int32), TypeError, "dtype"),
        (dict(mixer="attn"), ValueError, "unknown mixer"),
        (dict(mixer="RGLRU", d_state=4), ValueError, "no d_state"),
        (dict(mixer_kwargs={"d_model": 3}), ValueError, "d_model"),
    ]
    for kwargs, error, match in bad:
        with pytest.raises(error, match=match):
            LRUUnet(**kwargs, rngs=rngs)
    model = build(in_channels=2, channels=[2], resample_factors=[2])
    x = jnp.zeros((2, 2, 6))
    for value, error, match in [
        (jnp.zeros((2, 6)), ValueError, r"\(B, C_in, T\) with C_in=2"),
        (jnp.zeros((2, 6, 2)), ValueError, "channels first"),
        (jnp.zeros((2, 2, 0)), ValueError, "at least one time step"),
        (jnp.zeros((2, 2, 6), jnp.int32), TypeError, "floating"),
    ]:
        with pytest.raises(error, match=match):
            model(value)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, L=6\]"):
        model(x, lengths=jnp.array([7, 1]))
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        model(x, lengths=jnp.array([6]))
    with pytest.raises(TypeError, match="integers"):
        model(x, lengths=jnp.array([6.0, 1.0]))
    with pytest.raises(ValueError, match="multiple of 3"):
        lru_unet.strided_conv(jnp.zeros((1, 7, 2)), jnp.zeros((3, 2, 2)), jnp.zeros(2))
