"""Denoise synthetic signals with a causal LRUUnet trained with optax; print the SNR before and after, save a plot.

Run ``python examples/unet_denoise.py`` inside the virtual environment (about a minute on a laptop CPU;
``--help`` lists the options, e.g. ``--steps 100 --length 128`` for a quick run).

Each signal is a sum of sinusoids and a linear chirp (random frequencies, amplitudes and phases), with Gaussian
noise added. The network (``LRUUnet``, strictly causal: each output sample sees only the noisy samples up to it)
learns to map the noisy signal to the clean one with a mean-squared-error loss. The SNR is measured on a held-out
batch: ``10 log10(sum clean^2 / sum (estimate - clean)^2)``. The plot (``--plot``, needs matplotlib) shows one
held-out signal: clean, noisy and denoised.
"""

from __future__ import annotations

import argparse
import os
import time

# XLA's multi-threaded CPU FFT can deadlock on 2-core machines (README); the LRU's FFT path runs here
if "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lrnnx_jax.architectures import LRUUnet


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps")
    parser.add_argument("--batch", type=int, default=16, help="signals per step")
    parser.add_argument("--length", type=int, default=512, help="samples per signal")
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32], help="width after each level")
    parser.add_argument("--factors", type=int, nargs="+", default=[4, 4], help="resampling factor of each level")
    parser.add_argument("--d-state", type=int, default=16, help="LRU state size of every block")
    parser.add_argument("--noise", type=float, default=0.5, help="noise standard deviation (the clean signal has unit RMS)")
    parser.add_argument("--lr", type=float, default=1e-2, help="peak learning rate (Adam, cosine decay)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="unet_denoise.png", help="PNG to write ('' for none)")
    return parser.parse_args(argv)


def make_batch(rng: np.random.Generator, batch: int, length: int, noise: float):
    """``(clean, noisy)``, each ``(batch, 1, length)`` float32: sinusoids plus a chirp, unit RMS; Gaussian noise."""
    t = np.arange(length)[None, :]
    clean = np.zeros((batch, length))
    for _ in range(3):
        freq = rng.uniform(0.004, 0.04, (batch, 1))  # cycles per sample
        clean += rng.uniform(0.3, 1.0, (batch, 1)) * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi, (batch, 1)))
    f0, f1 = rng.uniform(0.002, 0.02, (batch, 1)), rng.uniform(0.02, 0.06, (batch, 1))
    clean += rng.uniform(0.3, 1.0, (batch, 1)) * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * length)))
    clean /= np.sqrt(np.mean(clean**2, axis=1, keepdims=True))
    noisy = clean + noise * rng.standard_normal(clean.shape)
    return clean[:, None].astype(np.float32), noisy[:, None].astype(np.float32)


def snr_db(estimate, clean) -> float:
    return float(10 * np.log10(np.sum(np.square(clean)) / np.sum(np.square(np.asarray(estimate) - clean))))


def progress(steps: int):
    """A tqdm bar over the steps, or plain prints (``None`` bar) when tqdm is missing."""
    try:
        from tqdm import tqdm
    except ImportError:
        print("(tqdm is not installed: plain progress prints; pip install tqdm for a progress bar)")
        return range(steps), None
    bar = tqdm(range(steps), desc="training", unit="step")
    return bar, bar


def save_plot(path: str, clean, noisy, denoised, snr_before: float, snr_after: float) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path} (pip install matplotlib)")
        return False
    fig, axes = plt.subplots(3, 1, figsize=(10, 7), sharex=True, sharey=True)
    for ax, signal, title, color in zip(
        axes, (clean, noisy, denoised),
        ("clean", f"noisy (SNR {snr_before:.1f} dB)", f"denoised by LRUUnet (SNR {snr_after:.1f} dB)"),
        ("black", "tab:red", "tab:blue"),
    ):
        ax.plot(signal, color=color, linewidth=0.9)
        if signal is not clean:
            ax.plot(clean, color="black", linewidth=0.6, alpha=0.5)
        ax.set_title(title)
    axes[-1].set_xlabel("sample")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot written to {path}")
    return True


def main(argv=None) -> dict:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    model = LRUUnet(in_channels=1, out_channels=1, channels=args.channels, resample_factors=args.factors, causal=True,
                    d_state=args.d_state, mixer_kwargs=dict(r_min=0.5, r_max=0.999), rngs=nnx.Rngs(args.seed))
    params = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"LRUUnet channels={args.channels} factors={args.factors} d_state={args.d_state}: {params} parameters; "
          f"{args.steps} steps of {args.batch} signals x {args.length} samples on {jax.devices()[0].platform}")
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, args.steps // 20), max(2, args.steps), args.lr / 20)
    optimizer = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule)), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, noisy, clean):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(noisy) - clean) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    denoise = nnx.jit(lambda m, x: m(x))
    clean_eval, noisy_eval = make_batch(np.random.default_rng(10_000 + args.seed), 32, args.length, args.noise)
    snr_before = snr_db(noisy_eval, clean_eval)

    start = time.perf_counter()
    steps, bar = progress(args.steps)
    report_every = max(1, args.steps // 10)
    for step in steps:
        clean, noisy = make_batch(rng, args.batch, args.length, args.noise)
        loss = train_step(model, optimizer, jnp.asarray(noisy), jnp.asarray(clean))
        if bar is not None and (step % 10 == 0 or step == args.steps - 1):
            bar.set_postfix(loss=f"{float(loss):.4f}")
        elif bar is None and (step % report_every == 0 or step == args.steps - 1):
            print(f"step {step + 1}/{args.steps}  loss {float(loss):.4f}  ({time.perf_counter() - start:.1f} s)")
    if bar is not None:
        bar.close()

    denoised = np.asarray(denoise(model, jnp.asarray(noisy_eval)))
    snr_after = snr_db(denoised, clean_eval)
    print(f"trained in {time.perf_counter() - start:.1f} s")
    print(f"SNR before: {snr_before:.2f} dB")
    print(f"SNR after:  {snr_after:.2f} dB  ({snr_after - snr_before:+.2f} dB)")
    plotted = bool(args.plot) and save_plot(args.plot, clean_eval[0, 0], noisy_eval[0, 0], denoised[0, 0], snr_before, snr_after)
    return {"snr_before": snr_before, "snr_after": snr_after, "plot": args.plot if plotted else None}


if __name__ == "__main__":
    main()
