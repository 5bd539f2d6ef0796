"""Train a small character-level ``LRNNLMHeadModel`` on Shakespeare, save it, reload it and sample from it.

The model is a mixed stack: LRU layers (linear recurrences, computed over the whole sequence at once) around a
causal attention layer with rotary embeddings, each block followed by a gated MLP. The text is
``examples/data/shakespeare.txt`` (public domain; see ``examples/data/README.md``); the last tenth of each tenth of
it is held out.

    python examples/train_char_lm.py                   # the default run: about 4 minutes on a 2-core CPU
    python examples/train_char_lm.py --steps 50 --d-model 64 --out /tmp/char_lm   # a quick check

The default run reaches a held-out loss of about 1.45 nats per character (from 4.14), where the samples are
mostly English words in the shape of the plays' speeches.

What it does:

1. builds the character vocabulary of the text and trains on random windows of ``--seq-len + 1`` characters
   (cross-entropy over the real vocabulary: the model pads its vocabulary to a multiple of 8, and the padding
   logits are sliced off), with optax's AdamW under a warmup-cosine schedule and one jitted train step;
2. prints the held-out loss before and after training (and every ``--eval-every`` steps), with a tqdm progress
   bar showing the training loss (plain prints when tqdm is not installed);
3. writes ``<out>/checkpoint`` with ``save_pretrained`` (plus ``vocab.json``), reloads it with
   ``LRNNLMHeadModel.from_pretrained`` and checks that the reloaded model gives the same logits;
4. samples ``--sample-tokens`` characters from the reloaded model with ``generate_tokens``, greedily and with
   top-p sampling;
5. writes ``<out>/loss.png`` (the training and held-out losses) when matplotlib is installed.

``main(argv)`` returns what it measured (losses, samples, paths, the trained model); the tests call it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import time
from typing import Optional, Sequence

# XLA's multi-threaded CPU FFT can deadlock on 2-core machines (README); the LRU layers' FFT path runs here
if "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lrnnx_jax.architectures import LRNNLMHeadModel
from lrnnx_jax.generation import generate_tokens

DATA = pathlib.Path(__file__).resolve().parent / "data" / "shakespeare.txt"
VOCAB_NAME = "vocab.json"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=32, help="windows per batch")
    parser.add_argument("--seq-len", type=int, default=128, help="characters per training window")
    parser.add_argument("--d-model", type=int, default=128, help="model width")
    parser.add_argument("--d-state", type=int, default=32, help="LRU state size (complex)")
    parser.add_argument("--d-intermediate", type=int, default=128, help="gated MLP width per block (0: no MLP)")
    parser.add_argument("--layers", default="LRU,attn,LRU",
                        help="comma-separated mixers, e.g. LRU,attn,LRU or Mamba,attn,RGLRU (slower on a CPU)")
    parser.add_argument("--num-heads", type=int, default=4, help="attention heads")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 5%% of --steps)")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    parser.add_argument("--eval-every", type=int, default=100, help="steps between held-out evaluations")
    parser.add_argument("--eval-windows", type=int, default=64, help="held-out windows per evaluation")
    parser.add_argument("--log-every", type=int, default=10, help="steps between loss updates of the progress output")
    parser.add_argument("--sample-tokens", type=int, default=300, help="characters to sample")
    parser.add_argument("--prompt", default="First Citizen:\n", help="the sampling prompt")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (top-p sample)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus mass (top-p sample)")
    parser.add_argument("--data", type=pathlib.Path, default=DATA, help="training text (UTF-8)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("char_lm_out"),
                        help="output directory (checkpoint/ and loss.png)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation, the batches and sampling")
    parser.add_argument("--no-progress", action="store_true", help="plain prints instead of a tqdm progress bar")
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "seq_len", "d_model", "d_state", "num_heads", "eval_every", "eval_windows",
                 "log_every", "sample_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.prompt:
        parser.error("--prompt must not be empty")
    if args.d_model % args.num_heads:
        parser.error(f"--d-model={args.d_model} must be a multiple of --num-heads={args.num_heads}")
    return args


# ====================================================================== data


class CharVocab:
    """The sorted characters of a text; ``encode(str) -> int32 ids``, ``decode(ids) -> str``."""

    def __init__(self, chars: Sequence[str]):
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharVocab":
        return cls(sorted(set(text)))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        missing = sorted(set(text) - set(self.index))
        if missing:
            raise ValueError(f"characters {missing!r} are not in the vocabulary of the training text")
        return np.fromiter((self.index[c] for c in text), np.int32, len(text))

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in np.asarray(ids).reshape(-1))


def split_heldout(ids: np.ndarray, parts: int = 10, fraction: float = 0.1):
    """``(train ids, [held-out segments])``: the last ``fraction`` of each of ``parts`` equal parts is held out, so
    the held-out text comes from the whole file (both plays), not from its end only. The training parts are
    concatenated (a few windows span one of their ``parts - 1`` joins)."""
    bounds = np.linspace(0, len(ids), parts + 1).astype(np.int64)
    train, heldout = [], []
    for begin, end in zip(bounds[:-1], bounds[1:]):
        cut = end - int(round((end - begin) * fraction))
        train.append(ids[begin:cut])
        heldout.append(ids[cut:end])
    return np.concatenate(train), heldout


def random_windows(rng: np.random.Generator, data: np.ndarray, batch: int, seq_len: int):
    """``batch`` random windows of ``seq_len + 1`` ids: ``(inputs (B, L), targets (B, L))``, targets shifted by one."""
    starts = rng.integers(0, len(data) - seq_len - 1, batch)
    windows = data[starts[:, None] + np.arange(seq_len + 1)]
    return windows[:, :-1], windows[:, 1:]


def heldout_windows(segments: Sequence[np.ndarray], count: int, seq_len: int):
    """``count`` fixed windows (the same at every evaluation), spread evenly over the held-out segments and inside
    each one: ``(inputs (count, L), targets (count, L))``."""
    windows = []
    for segment, k in zip(segments, map(len, np.array_split(np.arange(count), len(segments)))):
        if len(segment) < seq_len + 1:
            raise ValueError(f"held-out segments of {len(segment)} characters are shorter than --seq-len + 1 = {seq_len + 1}")
        starts = np.linspace(0, len(segment) - seq_len - 1, k).astype(np.int64)
        windows.append(segment[starts[:, None] + np.arange(seq_len + 1)])
    windows = np.concatenate(windows)
    return windows[:, :-1], windows[:, 1:]


# ====================================================================== model and training


def build_model(vocab_size: int, args: argparse.Namespace) -> LRNNLMHeadModel:
    mixer_types = [name.strip() for name in args.layers.split(",") if name.strip()]
    mixer_kwargs = {
        "attn": {"num_heads": args.num_heads, "causal": True, "rotary_emb_dim": args.d_model // args.num_heads},
        "LRU": {"r_min": 0.5, "r_max": 0.999},
    }
    return LRNNLMHeadModel(d_model=args.d_model, d_state=args.d_state, n_layer=len(mixer_types), vocab_size=vocab_size,
                           mixer_types=mixer_types, d_intermediate=args.d_intermediate,
                           mixer_kwargs={k: v for k, v in mixer_kwargs.items() if k in mixer_types},
                           rngs=nnx.Rngs(args.seed))


def loss_fn(model: LRNNLMHeadModel, inputs, targets):
    """Mean cross-entropy (nats per character) over the real vocabulary (the padding logits are sliced off)."""
    logits, _ = model.forward_logits(inputs)
    logits = logits[..., : model.vocab_size]
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def make_optimizer(model: LRNNLMHeadModel, args: argparse.Namespace) -> nnx.Optimizer:
    warmup = max(1, args.steps // 20) if args.warmup is None else args.warmup
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(warmup, args.steps - 1), args.steps, args.lr / 10)
    # weight decay on the matrices (projections, embedding, LRU's B and C), not on norms, biases or LRU's eigenvalues
    def decay_mask(params):
        return jax.tree.map(lambda p: p.ndim >= 2, params)

    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b2=0.99, weight_decay=args.weight_decay, mask=decay_mask))
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def train_step(model: LRNNLMHeadModel, optimizer: nnx.Optimizer, inputs, targets):
    loss, grads = nnx.value_and_grad(loss_fn)(model, inputs, targets)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def eval_loss(model: LRNNLMHeadModel, inputs, targets):
    return loss_fn(model, inputs, targets)


class Progress:
    """A tqdm bar with the loss as its postfix, or plain prints every ``log_every`` steps without tqdm."""

    def __init__(self, total: int, log_every: int, plain: bool):
        self.total, self.log_every, self.bar = total, log_every, None
        if not plain:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                print("tqdm is not installed: printing the loss every", log_every, "steps (pip install tqdm for a bar)")
            else:
                self.bar = tqdm(total=total, desc="training", unit="step", dynamic_ncols=True)
        self.start = time.perf_counter()

    def update(self, step: int, loss: Optional[float]):
        """After ``step`` (1-based) steps; ``loss`` is the latest training loss, or None between log points."""
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.3f}")
        elif loss is not None:
            print(f"step {step:>6}/{self.total}  loss {loss:.4f}  {time.perf_counter() - self.start:7.1f}s", flush=True)

    def write(self, message: str):
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def plot_losses(path: pathlib.Path, train_steps, train_losses, eval_steps, eval_losses) -> Optional[pathlib.Path]:
    """The loss curve as a PNG; None (with a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no loss curve written to {path} (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(train_steps, train_losses, lw=1, alpha=0.8, label="training batch")
    ax.plot(eval_steps, eval_losses, "o-", label="held out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / character)")
    ax.set_title("character-level LRNNLMHeadModel on Shakespeare")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_checkpoint(model: LRNNLMHeadModel, vocab: CharVocab, directory: pathlib.Path):
    model.save_pretrained(str(directory))
    (directory / VOCAB_NAME).write_text(json.dumps(vocab.chars))


def load_checkpoint(directory: pathlib.Path) -> tuple[LRNNLMHeadModel, CharVocab]:
    return LRNNLMHeadModel.from_pretrained(str(directory)), CharVocab(json.loads((directory / VOCAB_NAME).read_text()))


# ====================================================================== main


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    run_start = time.perf_counter()
    text = args.data.read_text(encoding="utf-8")
    vocab = CharVocab.from_text(text)
    ids = vocab.encode(text)
    prompt = vocab.encode(args.prompt)[None]  # checked before training: its characters must be in the vocabulary
    train_ids, heldout_segments = split_heldout(ids)
    rng = np.random.default_rng(args.seed)
    heldout = tuple(jnp.asarray(a) for a in heldout_windows(heldout_segments, args.eval_windows, args.seq_len))

    model = build_model(len(vocab), args)
    optimizer = make_optimizer(model, args)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"{args.data.name}: {len(text):,} characters, vocabulary {len(vocab)}; held out: the last tenth of each tenth, "
          f"{sum(map(len, heldout_segments)):,} characters")
    print(f"model: {list(model.mixer_types)}, d_model={args.d_model}, d_state={args.d_state}, "
          f"d_intermediate={args.d_intermediate}, {num_params:,} parameters; jax {jax.__version__} on "
          f"{jax.default_backend()}")

    initial_loss = float(eval_loss(model, *heldout))
    print(f"held-out loss before training: {initial_loss:.4f} (uniform over the vocabulary: {math.log(len(vocab)):.4f})")
    train_steps, train_losses, eval_steps, eval_losses = [], [], [0], [initial_loss]
    progress = Progress(args.steps, args.log_every, args.no_progress)
    start = time.perf_counter()
    pending = []  # losses still on the device: reading each one would stall the pipeline
    for step in range(1, args.steps + 1):
        inputs, targets = random_windows(rng, train_ids, args.batch, args.seq_len)
        pending.append((step, train_step(model, optimizer, jnp.asarray(inputs), jnp.asarray(targets))))
        latest = None
        if step % args.log_every == 0 or step == args.steps:
            for s, loss in pending:
                train_steps.append(s)
                train_losses.append(float(loss))
            pending, latest = [], train_losses[-1]
        progress.update(step, latest)
        if step % args.eval_every == 0 and step != args.steps:
            eval_steps.append(step)
            eval_losses.append(float(eval_loss(model, *heldout)))
            progress.write(f"step {step}: held-out loss {eval_losses[-1]:.4f}")
    progress.close()
    train_seconds = time.perf_counter() - start
    final_loss = float(eval_loss(model, *heldout))
    eval_steps.append(args.steps)
    eval_losses.append(final_loss)
    print(f"held-out loss after {args.steps} steps: {final_loss:.4f} (before: {initial_loss:.4f}); "
          f"training took {train_seconds:.1f}s")

    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.out / "checkpoint"
    save_checkpoint(model, vocab, checkpoint)
    reloaded, reloaded_vocab = load_checkpoint(checkpoint)
    difference = float(jnp.max(jnp.abs(reloaded(heldout[0]) - model(heldout[0]))))
    if reloaded_vocab.chars != vocab.chars or difference != 0.0:
        raise RuntimeError(f"the reloaded checkpoint differs from the trained model (max |logit difference| {difference})")
    print(f"saved {checkpoint} and reloaded it with LRNNLMHeadModel.from_pretrained (identical logits)")

    greedy = generate_tokens(reloaded, prompt, args.sample_tokens)
    sampled = generate_tokens(reloaded, prompt, args.sample_tokens, temperature=args.temperature, top_p=args.top_p,
                              key=jax.random.key(args.seed))
    samples = {"greedy": reloaded_vocab.decode(greedy[0]), "top_p": reloaded_vocab.decode(sampled[0])}
    print(f"\n--- greedy sample ---\n{args.prompt}{samples['greedy']}")
    print(f"\n--- top-p sample (temperature {args.temperature}, top_p {args.top_p}) ---\n{args.prompt}{samples['top_p']}\n")

    plot = plot_losses(args.out / "loss.png", train_steps, train_losses, eval_steps, eval_losses)
    if plot is not None:
        print(f"loss curve: {plot}")
    print(f"done in {time.perf_counter() - run_start:.1f}s")
    return {
        "initial_loss": initial_loss,
        "final_loss": final_loss,
        "train_losses": train_losses,
        "eval_steps": eval_steps,
        "eval_losses": eval_losses,
        "train_seconds": train_seconds,
        "samples": samples,
        "vocab": vocab.chars,
        "checkpoint": checkpoint,
        "plot": plot,
        "model": model,
    }


if __name__ == "__main__":
    main()
