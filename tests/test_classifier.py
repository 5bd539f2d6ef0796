"""Classifier (lrnnx's structure over any zoo model) against a float64 NumPy reference of that structure, with the
layers' own forwards as black boxes; lengths (padding never matters), event timesteps through every pooling,
gradients against finite differences, jit and training mode, the embeddings, and clear errors."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import relative_error
from lrnnx_jax.architectures import Classifier, ClassifierBlock, PositionEmbedding, SequencePooling, TokenEmbedding
from lrnnx_jax.architectures.classifier import final_pool, intermediate_pool
from lrnnx_jax.architectures.language_model import MIXERS
from lrnnx_jax.models import ltv

B, L, IN, H, N = 3, 9, 3, 6, 4
LENGTHS = np.array([9, 5, 2])

#: configurations of the NumPy comparison; together they cover every pooling mode, per-layer lists, the
#: regression head, token inputs and event mode
CONFIGS = {
    "LRU-stride-last-regression": dict(lrnn_cls="LRU", n_layers=2, intermediate_pooling=["none", "stride"],
                                       pooling_factor=2, pooling="last", num_classes=0, output_dim=2,
                                       lrnn_params=dict(r_min=0.4, r_max=0.9)),
    "LRU-S5-mean-max-lists": dict(lrnn_cls=["LRU", "S5"], n_layers=2, intermediate_pooling=["mean", "max"],
                                  pooling_factor=[2, 3], pooling="mean", num_classes=4,
                                  lrnn_params=[dict(r_min=0.4, r_max=0.9), dict(discretization="zoh")]),
    "event-S5-ltvS5-stride-mean-max": dict(lrnn_cls=["S5", ltv.S5], n_layers=2, intermediate_pooling=["stride", "mean"],
                                           pooling_factor=[2, 2], pooling="max", num_classes=3,
                                           lrnn_params=[dict(discretization="async"), dict(step_rescale=2.0)]),
    "tokens-position-LRU-max": dict(lrnn_cls="LRU", n_layers=1, intermediate_pooling="max", pooling_factor=4,
                                    pooling="last", num_classes=3, vocab_size=11, embedding_dim=5,
                                    max_position_embeddings=12, padding_idx=0),
}


def build(seed=0, **overrides):
    kwargs = dict(input_dim=IN, d_model=H, d_state=N, dropout=0.1)
    return Classifier(**{**kwargs, **overrides}, rngs=nnx.Rngs(seed))


def event(config) -> bool:
    return "event" in config


def inputs(config, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    if CONFIGS[config].get("vocab_size"):
        x = rng.integers(0, 11, (B, L)).astype(np.int32)
        x[:, -2:] = 0  # padding tokens
    else:
        x = rng.standard_normal((B, L, IN)).astype(dtype)
    tau = rng.uniform(0.2, 2.0, (B, L)).astype(dtype) if event(config) else None
    return x, tau


def randomize(model, seed):
    """Nonzero norm scales/biases and head biases (they start at 1 and 0)."""
    rng = np.random.default_rng(seed)
    for block in model.layers:
        for var in (block.norm.scale, block.norm.bias):
            var.set_value(jnp.asarray(1 + 0.3 * rng.standard_normal(var.get_value().shape), var.get_value().dtype))
    return model


def to_float64(model):
    def cast(a):
        if jnp.issubdtype(a.dtype, jnp.complexfloating):
            return a.astype(jnp.complex128)
        return a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a

    nnx.update(model, jax.tree.map(cast, nnx.state(model, nnx.Param)))
    return model


# ------------------------------------------------------------------------------- float64 NumPy reference
def np_param(variable):
    return np.asarray(variable.get_value(), np.float64)


def np_intermediate(x, tau, lengths, mode, f):
    if mode == "none" or f == 1:
        return x, tau, lengths
    batch, length, width = x.shape
    windows = -(-length // f)
    out, tau_out = np.zeros((batch, windows, width)), np.ones((batch, windows))
    for b in range(batch):
        for i in range(windows):
            if mode == "stride":
                out[b, i] = x[b, i * f]
                if tau is not None:  # the time since the previous kept step
                    tau_out[b, i] = tau[b, max(0, (i - 1) * f + 1): i * f + 1].sum()
                continue
            steps = [t for t in range(i * f, min((i + 1) * f, length)) if t < lengths[b]]
            if steps:
                out[b, i] = x[b, steps].mean(0) if mode == "mean" else x[b, steps].max(0)
                if tau is not None:
                    tau_out[b, i] = tau[b, steps].sum()
    return out, (None if tau is None else tau_out), -(-lengths // f)


def np_final(x, lengths, mode):
    rows = [x[b, : lengths[b]] for b in range(x.shape[0])]
    return np.stack([row[-1] if mode == "last" else row.mean(0) if mode == "mean" else row.max(0) for row in rows])


def np_layernorm(x, scale, bias, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * scale + bias


def reference(model, x, lengths, tau):
    """The classifier's structure in float64 NumPy; each layer's model (float64) is a black box."""
    x = np.asarray(x)
    lengths = np.full(x.shape[0], x.shape[1]) if lengths is None else np.asarray(lengths)
    tau = None if tau is None else np.asarray(tau, np.float64)
    if model.embedding is not None:
        table = np_param(model.embedding.token_embedding.embedding)
        h = table[x]
        if model.embedding.position_embedding is not None:
            h = h + np_param(model.embedding.position_embedding.position_embedding.embedding)[: x.shape[1]][None]
        proj = model.embed_proj
    else:
        h, proj = x.astype(np.float64), model.input_proj
    if proj is not None:
        h = h @ np_param(proj.kernel) + np_param(proj.bias)
    for block in model.layers:
        y = np.asarray(block.lrnn(jnp.asarray(h), integration_timesteps=None if tau is None else jnp.asarray(tau),
                                  lengths=jnp.asarray(lengths)))
        h = np_layernorm(y + h, np_param(block.norm.scale), np_param(block.norm.bias))
        h, tau, lengths = np_intermediate(h, tau, lengths, block.intermediate_pooling, block.pooling_factor)
    head = model.final_block.output_proj
    return np_final(h, lengths, model.pooling) @ np_param(head.kernel) + np_param(head.bias)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_numpy_float64(config):
    model = randomize(build(seed=1, **CONFIGS[config]), seed=2)
    x, tau = inputs(config, seed=3, dtype=np.float64)
    with jax.enable_x64(True):
        to_float64(model)
        xj = jnp.asarray(x)
        for lengths in ((None, LENGTHS) if config == "LRU-stride-last-regression" else (LENGTHS,)):
            out = model(xj, lengths=None if lengths is None else jnp.asarray(lengths),
                        integration_timesteps=None if tau is None else jnp.asarray(tau))
            chex.assert_shape(out, (B, model.num_outputs))
            chex.assert_type(out, jnp.float64)
            assert relative_error(out, reference(model, x, lengths, tau)) < 1e-10


# ------------------------------------------------------------------------------------------------ pooling
def test_pooling_sums_timesteps_per_window_and_recomputes_lengths():
    x = jnp.arange(1.0, 6.0)[None, :, None] * jnp.ones((2, 1, 2))  # (2, 5, 2): steps 1..5
    tau = jnp.asarray([[1.0, 2, 3, 4, 5]] * 2)
    lengths = jnp.asarray([5, 3])
    xm, tm, lm = intermediate_pool(x, tau, lengths, "mean", 2)
    np.testing.assert_allclose(xm[:, :, 0], [[1.5, 3.5, 5], [1.5, 3, 0]])
    np.testing.assert_allclose(tm, [[3, 7, 5], [3, 3, 1]])  # window sums of the valid steps (1: past the end)
    np.testing.assert_array_equal(lm, [3, 2])
    xx, tx, _ = intermediate_pool(x, tau, lengths, "max", 3)
    np.testing.assert_allclose(xx[:, :, 0], [[3, 5], [3, 0]])
    np.testing.assert_allclose(tx, [[6, 9], [6, 1]])
    xs, ts, ls = intermediate_pool(x, tau, lengths, "stride", 2)
    np.testing.assert_allclose(xs[:, :, 0], [[1, 3, 5], [1, 3, 5]])
    np.testing.assert_allclose(ts, [[1, 5, 9], [1, 5, 9]])  # time since the previous kept step
    np.testing.assert_array_equal(ls, [3, 2])
    assert intermediate_pool(x, tau, None, "mean", 2)[2] is None
    assert intermediate_pool(x, tau, lengths, "none", 2)[0] is x
    for mode, expected in (("last", [5, 3]), ("mean", [3, 2]), ("max", [5, 3])):
        np.testing.assert_allclose(final_pool(x, lengths, mode)[:, 0], expected)
        pooled, _, _ = SequencePooling(mode)(x, lengths)
        np.testing.assert_allclose(pooled[:, 0], expected)
    pooled, t2, l2 = SequencePooling("mean", stride=2)(x, lengths, tau)
    np.testing.assert_allclose(t2, tm)
    np.testing.assert_array_equal(l2, lm)
    # masked max: a window past a row's end (all -inf inside) gives 0 and finite gradients
    short = jnp.asarray([5, 1])
    grad = jax.grad(lambda a: jnp.sum(final_pool(intermediate_pool(a, None, short, "max", 2)[0], -(-short // 2), "max")))(x)
    np.testing.assert_array_equal(grad[:, :, 0], [[0, 0, 0, 0, 1], [1, 0, 0, 0, 0]])


def test_padding_beyond_lengths_does_not_change_the_result():
    config = "event-S5-ltvS5-stride-mean-max"
    model = build(seed=4, **CONFIGS[config])
    x, tau = inputs(config, seed=5)
    lengths = jnp.asarray(LENGTHS)
    out = model(jnp.asarray(x), lengths=lengths, integration_timesteps=jnp.asarray(tau))
    rng = np.random.default_rng(6)
    x2, tau2 = x.copy(), tau.copy()
    for b, n in enumerate(LENGTHS):
        x2[b, n:] = 100 * rng.standard_normal(x2[b, n:].shape)
        tau2[b, n:] = rng.uniform(5, 50, tau2[b, n:].shape)
    np.testing.assert_array_equal(out, model(jnp.asarray(x2), lengths=lengths, integration_timesteps=jnp.asarray(tau2)))
    alone = model(jnp.asarray(x[1:2, :5]), integration_timesteps=jnp.asarray(tau[1:2, :5]))
    assert relative_error(out[1:2], alone) < 1e-5


def test_timesteps_change_the_result_of_an_event_model():
    config = "event-S5-ltvS5-stride-mean-max"
    model = build(seed=7, **CONFIGS[config])
    assert model.supports_integration_timesteps
    x, tau = inputs(config, seed=8)
    out = model(jnp.asarray(x), integration_timesteps=jnp.asarray(tau))
    slower = model(jnp.asarray(x), integration_timesteps=jnp.asarray(3 * tau))
    assert relative_error(slower, out) > 1e-2


# ---------------------------------------------------------------------------------- gradients, jit, training
def test_gradients_match_finite_differences():
    config = "event-S5-ltvS5-stride-mean-max"
    model = randomize(build(seed=9, **{**CONFIGS[config], "pooling": "mean"}), seed=10)
    x, tau = inputs(config, seed=11, dtype=np.float64)
    rng = np.random.default_rng(12)
    with jax.enable_x64(True):
        to_float64(model)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        weights = jnp.asarray(rng.standard_normal((B, model.num_outputs)))
        lengths = jnp.asarray(LENGTHS)

        @jax.jit
        def loss(p, xx, tt):
            return jnp.sum(nnx.merge(graphdef, p, rest)(xx, lengths=lengths, integration_timesteps=tt) * weights)

        args = (params, jnp.asarray(x), jnp.asarray(tau))
        grads = jax.grad(loss, argnums=(0, 1, 2))(*args)
        assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
        assert float(jnp.max(jnp.abs(grads[2]))) > 0  # the timesteps get a gradient through the pooling
        direction = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), args)
        analytic = sum(float(jnp.sum(g * v)) for g, v in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
        eps = 1e-6
        shift = lambda s: jax.tree.map(lambda a, v: a + s * v, args, direction)  # noqa: E731
        numeric = (loss(*shift(eps)) - loss(*shift(-eps))) / (2 * eps)
        assert abs(analytic - float(numeric)) <= 1e-6 * max(1.0, abs(analytic)), (analytic, float(numeric))


def test_jit_and_a_training_step():
    model = build(seed=13, lrnn_cls="LRU", n_layers=1, intermediate_pooling="mean", pooling="mean", num_classes=4)
    x, _ = inputs("LRU-S5-mean-max-lists", seed=14)
    x, lengths = jnp.asarray(x), jnp.asarray(LENGTHS)
    eager = model(x, lengths=lengths)
    forward = nnx.jit(lambda m, xx, ll: m(xx, lengths=ll))
    np.testing.assert_allclose(forward(model, x, lengths), eager, rtol=1e-6, atol=1e-6)

    labels = jnp.asarray([0, 1, 3])
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(m, opt, xx, ll):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(xx, lengths=ll), labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss

    model.train()
    losses = [float(train_step(model, optimizer, x, lengths)) for _ in range(8)]
    assert losses[-1] < losses[0]
    # training mode: dropout draws fresh masks (the random state advances); eval mode is deterministic
    assert relative_error(model(x, lengths=lengths), model(x, lengths=lengths)) > 0
    model.eval()
    np.testing.assert_array_equal(model(x, lengths=lengths), model(x, lengths=lengths))


# ---------------------------------------------------------------------------------- structure and embeddings
def test_structure_shapes_and_every_zoo_model():
    needs = {"S5": dict(discretization="zoh"), "Centaurus": dict(sub_state_dim=2), "Mamba2": dict(headdim=3)}
    names = list(MIXERS)
    model = build(lrnn_cls=names, n_layers=len(names), num_classes=5, lrnn_params=[needs.get(n, {}) for n in names])
    assert all(type(b.lrnn).__name__.startswith(n) for b, n in zip(model.layers, names))  # Centaurus: CentaurusNeck
    for block in model.layers:
        assert isinstance(block, ClassifierBlock) and block.lrnn.d_model == H
        if hasattr(block.lrnn, "d_state") and type(block.lrnn).__name__ != "RGLRU":
            assert block.lrnn.d_state == N
        assert not getattr(block.lrnn, "transposed", False)
    assert len(model.blocks) == len(names) - 1 and model.final_block.is_final
    assert model.final_block.output_proj.kernel.get_value().shape == (H, 5)
    override = build(lrnn_cls="LRU", n_layers=1, lrnn_params=dict(d_state=7))
    assert override.final_block.lrnn.d_state == 7
    # no weak-typed parameter (LTI S5's B is one): an optimizer update would change the types and recompile
    assert not any(a.weak_type for a in jax.tree.leaves(nnx.state(model, nnx.Param)))

    small = build(lrnn_cls="LRU", n_layers=1, num_classes=3)
    out = small(jnp.zeros((2, 4, IN), jnp.bfloat16))
    chex.assert_shape(out, (2, 3))
    chex.assert_type(out, jnp.float32)
    tokens = build(lrnn_cls="LRU", n_layers=1, num_classes=3, vocab_size=11)  # embedding_dim = d_model: no projection
    assert tokens.embed_proj is None and tokens.embedding.position_embedding is None
    ids = jnp.asarray([[1, 2, 0, 0], [3, 4, 5, 6]])
    embedded = tokens.embedding(ids)
    np.testing.assert_allclose(tokens(ids), tokens(embedded), rtol=1e-6)  # (B, L, embedding_dim) inputs too


def test_token_and_position_embeddings():
    emb = TokenEmbedding(7, 4, padding_idx=-1, max_position_embeddings=5, use_position=True, dropout=0.5,
                         rngs=nnx.Rngs(0))
    assert emb.padding_idx == 6
    table = emb.token_embedding.embedding.get_value()
    np.testing.assert_array_equal(table[6], 0)
    positions = emb.position_embedding.position_embedding.embedding.get_value()
    ids = jnp.asarray([[1, 6, 3], [0, 2, 6]])
    np.testing.assert_allclose(emb(ids), table[np.asarray(ids)] + positions[:3][None], rtol=1e-6)
    grad = nnx.grad(lambda e: jnp.sum(e(ids) ** 2))(emb)
    np.testing.assert_array_equal(grad["token_embedding"]["embedding"][...][6], 0)  # the padding row
    assert float(jnp.abs(grad["token_embedding"]["embedding"][...][1]).sum()) > 0
    emb.train()
    dropped = emb(ids)
    assert 0 < int(jnp.sum(dropped == 0)) < dropped.size
    pos = PositionEmbedding(5, 3, rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(pos(jnp.asarray([4, 0])), np.asarray(pos.position_embedding.embedding.get_value())[[4, 0]])
    with pytest.raises(ValueError, match="max_position_embeddings must be set when use_position=True"):
        TokenEmbedding(7, 4, use_position=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"token_ids must lie in \[0, 7\), got min 0 and max 7"):
        emb(jnp.asarray([[0, 7]]))
    with pytest.raises(ValueError, match="length 6, more than max_position_embeddings=5"):
        emb(jnp.zeros((1, 6), jnp.int32))
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 5\)"):
        pos(jnp.asarray([5]))


def test_bad_arguments_are_refused_clearly():
    with pytest.raises(ValueError, match=r"unknown pooling 'first'; expected one of \['last', 'mean', 'max'\]"):
        build(pooling="first")
    with pytest.raises(ValueError, match=r"unknown intermediate_pooling 'sum'"):
        build(n_layers=2, intermediate_pooling=["none", "sum"])
    with pytest.raises(ValueError, match=r"unknown lrnn_cls 'GRU'; expected one of \['LRU', 'S4'"):
        build(lrnn_cls="GRU")
    with pytest.raises(ValueError, match=r"lrnn_cls must be one value or a list of n_layers=2 values"):
        build(n_layers=2, lrnn_cls=["LRU"])
    with pytest.raises(ValueError, match="pooling_factor must be one value or a list of n_layers=2"):
        build(n_layers=2, pooling_factor=[2, 2, 2])
    with pytest.raises(ValueError, match="pooling_factor must be a positive integer, got 0"):
        build(pooling_factor=0)
    with pytest.raises(ValueError, match="give num_classes .classification. or output_dim .regression., not both"):
        build(num_classes=3, output_dim=2)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 0"):
        build(num_classes=-1)
    with pytest.raises(ValueError, match="output_dim must be a positive integer, got 0"):
        build(num_classes=0, output_dim=0)
    with pytest.raises(TypeError, match="lrnn_params must not contain d_model"):
        build(lrnn_params=dict(d_model=4))
    with pytest.raises(TypeError, match=r"could not build S5\(d_model=6, \*\*\{'d_state': 4\}\): S5 needs a discretization"):
        build(lrnn_cls="S5", lrnn_params=None)
    with pytest.raises(TypeError, match=r"could not build LRU.*unexpected keyword argument 'discretization'"):
        build(n_layers=2, lrnn_cls=["LRU", "S5"], lrnn_params=dict(discretization="zoh"))
    with pytest.raises(ValueError, match="transposed=True takes .B, H, L.; the classifier's blocks need transposed=False"):
        build(lrnn_cls="S4D", lrnn_params=dict(transposed=True))
    with pytest.raises(TypeError, match="lrnn_cls must build an lrnnx_jax LRNN model"):
        build(lrnn_cls=lambda d_model, d_state, rngs: nnx.Linear(d_model, d_model, rngs=rngs))
    with pytest.raises(ValueError, match="embedding_dim and max_position_embeddings need vocab_size"):
        build(embedding_dim=4)
    with pytest.raises(ValueError, match=r"unknown intermediate pooling 'last' for stride=2"):
        SequencePooling("last", stride=2)

    model = build(lrnn_cls="LRU", n_layers=1, num_classes=2)
    x = jnp.zeros((2, 4, IN))
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, L=4\] .a row needs a step to classify., got min 0"):
        model(x, lengths=jnp.asarray([0, 4]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, L=4\], got min 4 and max 5"):
        model(x, lengths=jnp.asarray([5, 4]))
    with pytest.raises(TypeError, match="lengths must be integers"):
        model(x, lengths=jnp.asarray([1.0, 4.0]))
    with pytest.raises(ValueError, match=r"x must have shape \(B, L, input_dim\) with H=3, got shape \(2, 4, 5\)"):
        model(jnp.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match=r"integration_timesteps needs every layer to have an event mode; layers \['0: LRU'\]"):
        model(x, integration_timesteps=jnp.ones((2, 4)))
    event_model = build(lrnn_cls="S5", n_layers=1, num_classes=2, lrnn_params=dict(discretization="async"))
    with pytest.raises(ValueError, match="integration_timesteps must be > 0"):
        event_model(x, integration_timesteps=jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"integration_timesteps must have shape \(2, 4\), got \(2, 3\)"):
        event_model(x, integration_timesteps=jnp.ones((2, 3)))
