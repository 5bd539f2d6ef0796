"""Classify synthetic event streams whose class is carried only by the timing of the events.

Every stream is a sequence of events with the same values for every class (a constant channel and a random
polarity); only the intervals between events differ:

* ``regular``: nearly constant intervals;
* ``poisson``: exponential intervals (a Poisson process);
* ``bursty``: mostly short intervals, sometimes a long pause;
* ``slowing``: intervals that grow along the stream.

All four have the same mean interval, and streams have random lengths (``lengths``). A
:class:`~lrnnx_jax.architectures.Classifier` over event-mode S5 layers (``discretization="async"``: the state
evolves by ``exp(Δ·τ·A)`` between events) reads the intervals as ``integration_timesteps``. The same classifier fed
constant timesteps sees only the values, which carry nothing, so it stays at chance (25 %). The script trains both
with optax, reports the test accuracies and plots the event model's confusion matrix.

Run ``python examples/event_classification.py`` (about a minute on a laptop CPU; ``--help`` lists the flags).
CI runs a tiny configuration (tests/test_examples.py). A tqdm progress bar is shown when tqdm is installed; the
plot needs matplotlib (``pip install lrnnx-jax[bench]``) and is skipped with a message otherwise.
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lrnnx_jax.architectures import Classifier

CLASSES = ("regular", "poisson", "bursty", "slowing")


# ------------------------------------------------------------------------------------------- the data
def make_streams(num: int, seq_len: int, rng: np.random.Generator, mean_interval: float = 1.0):
    """``num`` streams: ``(x (num, L, 2) float32, tau (num, L) float32, lengths (num,) int32, labels (num,))``.

    The values ``x`` have one distribution for every class; the intervals ``tau`` (time since the previous
    event, > 0) have a mean of ``mean_interval`` in every class. Steps at and after a stream's length are padding.
    """
    labels = rng.integers(0, len(CLASSES), num)
    lengths = rng.integers(seq_len // 2, seq_len + 1, num)
    position = np.arange(seq_len)[None, :] / np.maximum(lengths[:, None] - 1, 1)  # 0..1 along each stream
    jitter = rng.uniform(0.9, 1.1, (num, seq_len))
    candidates = {
        "regular": jitter,
        "poisson": rng.exponential(1.0, (num, seq_len)),
        "bursty": np.where(rng.random((num, seq_len)) < 0.8, 0.25, 4.0) * jitter,
        "slowing": (0.2 + 1.6 * position) * jitter,
    }
    tau = np.choose(labels[:, None], [candidates[name] for name in CLASSES]) * mean_interval
    tau = np.maximum(tau, 1e-3 * mean_interval)
    x = np.stack([np.ones((num, seq_len)), rng.choice([-1.0, 1.0], (num, seq_len))], -1)
    padding = np.arange(seq_len)[None, :] >= lengths[:, None]
    x[padding], tau[padding] = 0.0, mean_interval
    return x.astype(np.float32), tau.astype(np.float32), lengths.astype(np.int32), labels.astype(np.int32)


# ------------------------------------------------------------------------------------------- the model
def build(args, seed: int) -> Classifier:
    return Classifier(
        input_dim=2, num_classes=len(CLASSES), d_model=args.d_model, d_state=args.d_state, n_layers=args.n_layers,
        lrnn_cls="S5", lrnn_params={"discretization": "async"}, pooling="mean", dropout=args.dropout,
        intermediate_pooling=["mean"] * (args.n_layers - 1) + ["none"], pooling_factor=2, rngs=nnx.Rngs(seed),
    )


@nnx.jit
def train_step(model, optimizer, x, tau, lengths, labels):
    def loss_fn(model):
        logits = model(x, lengths=lengths, integration_timesteps=tau)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def predict(model, x, tau, lengths):
    return jnp.argmax(model(x, lengths=lengths, integration_timesteps=tau), -1)


def progress(total: int, desc: str):
    """A tqdm bar, or a plain counter that prints every tenth of the way when tqdm is missing."""
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=False)
    except ImportError:
        print("(tqdm is not installed: plain progress prints; pip install tqdm for a progress bar)")

        class Plain:
            def __init__(self):
                self.n, self.every, self.postfix = 0, max(total // 10, 1), ""

            def update(self, k=1):
                self.n += k
                if self.n % self.every == 0 or self.n == total:
                    print(f"{desc}: {self.n}/{total} {self.postfix}", flush=True)

            def set_postfix_str(self, text):
                self.postfix = text

            def close(self):
                pass

        return Plain()


@functools.lru_cache
def adamw(lr: float, steps: int):
    """One transformation per setting: the optimizer holds it as static data, so both models share one compiled
    training step."""
    return optax.adamw(optax.cosine_decay_schedule(lr, steps, alpha=0.1), weight_decay=1e-4)


def train(model, data, args, desc: str, constant_tau: bool):
    """AdamW with a cosine schedule on random batches; ``constant_tau``: feed every event the mean interval instead of its own."""
    x, tau, lengths, labels = data
    if constant_tau:
        tau = np.full_like(tau, args.mean_interval)
    optimizer = nnx.Optimizer(model, adamw(args.lr, args.steps), wrt=nnx.Param)
    rng = np.random.default_rng(args.seed + 1)
    model.train()
    bar = progress(args.steps, desc)
    for step in range(args.steps):
        batch = rng.integers(0, len(labels), args.batch_size)
        loss = train_step(model, optimizer, x[batch], tau[batch], lengths[batch], labels[batch])
        if step % 10 == 0 or step == args.steps - 1:
            bar.set_postfix_str(f"loss {float(loss):.3f}")
        bar.update(1)
    bar.close()
    model.eval()
    return model


def evaluate(model, data, args, constant_tau: bool):
    """``(accuracy, confusion (true, predicted) counts)`` on ``data``."""
    x, tau, lengths, labels = data
    if constant_tau:
        tau = np.full_like(tau, args.mean_interval)
    predictions = np.concatenate([
        np.asarray(predict(model, x[i : i + args.batch_size], tau[i : i + args.batch_size], lengths[i : i + args.batch_size]))
        for i in range(0, len(labels), args.batch_size)
    ])
    confusion = np.zeros((len(CLASSES), len(CLASSES)), np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    return float(np.mean(predictions == labels)), confusion


def plot_confusion(confusion, path: str, title: str) -> Optional[str]:
    """Save the confusion matrix as a PNG; returns the path, or None (with a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the confusion-matrix plot (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.imshow(confusion, cmap="Blues")
    for (i, j), count in np.ndenumerate(confusion):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if count > confusion.max() / 2 else "black")
    ax.set_xticks(range(len(CLASSES)), CLASSES)
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-size", type=int, default=4096)
    parser.add_argument("--test-size", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--mean-interval", type=float, default=1.0, help="mean time between events")
    parser.add_argument("--d-model", type=int, default=32)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2, help="peak learning rate (cosine decay to a tenth)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="event_classification_confusion.png", help="PNG of the confusion matrix")
    parser.add_argument("--no-plot", action="store_true")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Train and evaluate both models; returns ``{"accuracy", "baseline_accuracy", "confusion", "plot"}``."""
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    train_data = make_streams(args.train_size, args.seq_len, rng, args.mean_interval)
    test_data = make_streams(args.test_size, args.seq_len, rng, args.mean_interval)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {args.train_size} training and {args.test_size} test "
          f"streams of up to {args.seq_len} events, classes {', '.join(CLASSES)}")
    results = {}
    for name, constant_tau in (("event", False), ("baseline", True)):
        start = time.perf_counter()
        model = train(build(args, args.seed), train_data, args, f"{name} model", constant_tau)
        accuracy, confusion = evaluate(model, test_data, args, constant_tau)
        results[name] = (accuracy, confusion)
        what = "event timesteps" if not constant_tau else "constant timesteps (ignores the timing)"
        print(f"{name:<8} S5 classifier, {what}: test accuracy {accuracy:.3f} ({time.perf_counter() - start:.1f} s)")
    accuracy, confusion = results["event"]
    print(f"chance {1 / len(CLASSES):.3f}; the event model beats the timing-blind one by "
          f"{accuracy - results['baseline'][0]:+.3f}")
    print("confusion matrix of the event model (rows: true, columns: predicted; " + ", ".join(CLASSES) + "):")
    print(confusion)
    plot = None
    if not args.no_plot:
        plot = plot_confusion(confusion, args.plot, f"event-mode S5 classifier: accuracy {accuracy:.2f}")
        if plot:
            print(f"saved {plot}")
    return {"accuracy": accuracy, "baseline_accuracy": results["baseline"][0], "confusion": confusion, "plot": plot}


if __name__ == "__main__":
    main()
