"""Language-model token decoding: ``generate_tokens`` (one program) against a Python loop over a jitted step.

    python -m benchmarks.benchmark_lm_decode [--stacks a,b,c] [--batches 1,32,256] [--new-tokens 512]
                                             [--parts generate,loop,floor,speculative] [--out result.json]

Stacks (d_model 512, d_state 16, vocabulary 32000, float32; S5 with zoh):

* ``a``: ``["Mamba", "S5", "LRU", "RGLRU"]`` (PyTorch lrnnx numbers on an H200 in
  ``benchmarks/results/lrnnx_anchors.json``: an eager step loop and one CUDA graph of the whole step, at batch 1
  and 32);
* ``b``: ``["Mamba", "S5", "attn", "RGLRU"]`` (attention: 8 heads, causal);
* ``c``: ``b`` with Mamba2 in place of Mamba.

Parts, each timed as the median of ``--repeats`` runs after ``--warmup`` (compilation excluded):

* ``generate``: ``generate_tokens(model, prompt, new_tokens)``, greedy; µs per token = time / new_tokens;
* ``loop``: a Python loop over a jitted ``step + argmax`` (the argmax on the device), one call per token;
* ``floor``: the sum over layers of one layer's step (a jitted ``lax.scan`` of ``new_tokens`` steps of that
  mixer alone, divided by ``new_tokens``), plus the head (final norm, LM head and argmax, scanned the same way);
* ``speculative``: ``generate_tokens`` with prompt lookup (4 drafts) on a repetitive prompt, with its acceptance rate.

Prints a line per row and writes every number, with the device and versions, to ``--out``. PyTorch lrnnx's
numbers come from a results file (``--anchors PATH``, default ``benchmarks/results/lrnnx_anchors.json``) and fill
``lrnnx_eager_us`` / ``lrnnx_cuda_graph_us`` (and the speed-ups of ``generate`` over them) only where this run's
device kind names the anchor's device (an H200 for the default file) and the row has the anchor's stack, batch and
sizes; the report lists every skipped anchor with why. A progress bar (tqdm) is shown, and a plot of µs per token
against the batch size (``generate``, the loop, the floor, and lrnnx where compared) is written to ``--plot``
(default: next to ``--out``, else ``benchmark_results/lm_decode.png``; ``--no-plot`` for none). Without tqdm or
matplotlib (the ``bench`` extra) it prints plain progress lines and writes no plot.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import sys
from typing import Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import anchors as anchors_lib
from benchmarks.reporting import Progress, add_plot_and_anchor_arguments, batch_axes, pyplot, save, write_plot
from benchmarks.timing import median_seconds
from lrnnx_jax.architectures import LRNNLMHeadModel
from lrnnx_jax.generation import Speculative, generate_tokens
from pallas_kernels import dispatch

D_MODEL, D_STATE, VOCAB = 512, 16, 32000
STACKS = {
    "a": ["Mamba", "S5", "LRU", "RGLRU"],
    "b": ["Mamba", "S5", "attn", "RGLRU"],
    "c": ["Mamba2", "S5", "attn", "RGLRU"],
}
MIXER_KWARGS = {"S5": {"discretization": "zoh"}, "attn": {"num_heads": 8, "causal": True}, "Mamba2": {"headdim": 64}}
#: the ``measured.method`` of the PyTorch lrnnx anchors (benchmarks/results/lrnnx_anchors.json) by column name
LRNNX_METHODS = {"eager": "eager step loop", "cuda_graph": "one CUDA graph of the whole LM step"}
PROMPT_LENGTH = 16


def build(stack: str, seed: int = 0) -> LRNNLMHeadModel:
    types = STACKS[stack]
    return LRNNLMHeadModel(D_MODEL, D_STATE, len(types), VOCAB, types,
                           mixer_kwargs={k: v for k, v in MIXER_KWARGS.items() if k in types}, rngs=nnx.Rngs(seed))


def time_generate(model, prompt, new_tokens, warmup, repeats, **kwargs) -> float:
    return median_seconds(lambda: generate_tokens(model, prompt, new_tokens, **kwargs), warmup, repeats)


def time_loop(model, prompt, new_tokens, warmup, repeats) -> float:
    """Prefill once (untimed), then ``new_tokens`` calls of a jitted step + argmax, timed per run."""
    graphdef, _ = nnx.split(model)

    @jax.jit
    def step(state, token, cache):
        logits, cache = nnx.merge(graphdef, state).step_logits(token, cache)
        return jnp.argmax(logits[:, :VOCAB], -1).astype(jnp.int32), cache

    state = nnx.state(model)
    logits, cache0 = model(jnp.asarray(prompt), return_cache=True, max_seqlen=prompt.shape[1] + new_tokens + 1)
    token0 = jnp.argmax(logits[:, -1, :VOCAB], -1).astype(jnp.int32)

    def run():
        token, cache = token0, cache0
        for _ in range(new_tokens):
            token, cache = step(state, token, cache)
        return token

    return median_seconds(run, warmup, repeats)


def time_floor(model, batch, new_tokens, warmup, repeats) -> dict:
    """Per-layer step times and the head's, each a jitted scan of ``new_tokens`` steps (seconds per token)."""
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((new_tokens, batch, D_MODEL)).astype(np.float32))
    cache = model.allocate_inference_cache(batch, new_tokens + 1)
    out = {}
    for index, layer_type in enumerate(model.mixer_types):
        @jax.jit
        def layer_scan(state, cache, index=index):
            mixer = nnx.merge(graphdef, state).layers[index].mixer

            def body(c, x_t):
                if layer_type == "attn":
                    y, c = mixer(x_t[:, None], c)
                    return c, y[:, 0]
                return tuple(reversed(mixer._step(x_t, c, None, dispatch.resolve(None))))

            return jax.lax.scan(body, cache, x)[1]

        out[f"{index}:{layer_type}"] = median_seconds(lambda: layer_scan(state, cache[index]), warmup, repeats) / new_tokens

    @jax.jit
    def head_scan(state):
        m = nnx.merge(graphdef, state)
        return jax.lax.map(lambda h: jnp.argmax(m.logits(h, jnp.zeros_like(h))[:, :VOCAB], -1), x)

    out["head"] = median_seconds(lambda: head_scan(state), warmup, repeats) / new_tokens
    return out


def lrnnx_columns(stack: str, batch: int, generate_us: Optional[float], anchors: anchors_lib.Anchors) -> dict:
    """``lrnnx_<method>_us`` (and the speed-up of ``generate`` over it) for each anchor of this device kind with the
    row's stack, batch and sizes; nothing for the others."""
    row = {}
    for name, method in LRNNX_METHODS.items():
        anchor = anchors.find(stack=STACKS[stack], B=batch, d_model=D_MODEL, d_state=D_STATE, vocab=VOCAB,
                              method=method)
        if anchor is None:
            continue
        row[f"lrnnx_{name}_us"] = anchor.value
        row["lrnnx_device"] = anchor.device
        if generate_us is not None:
            row[f"speedup_vs_lrnnx_{name}"] = anchor.value / generate_us
    return row


def plot(path: pathlib.Path, rows: list[dict]) -> Optional[str]:
    """µs per token against the batch size: per stack ``generate`` (solid), the loop (dashed), the floor (dotted),
    and PyTorch lrnnx's anchors where compared (squares: whole-step CUDA graph, triangles: eager loop)."""
    series = [("generate_us_per_token", "generate", dict(marker="o")), ("loop_us_per_token", "loop", dict(ls="--")),
              ("floor_us_per_token", "floor", dict(ls=":")),
              ("lrnnx_cuda_graph_us", "PyTorch lrnnx CUDA graph", dict(ls="none", marker="s", mfc="none", ms=7)),
              ("lrnnx_eager_us", "PyTorch lrnnx eager", dict(ls="none", marker="^", mfc="none", ms=7))]
    if not any(key in row for row in rows for key, _, _ in series):
        return None
    plt = pyplot("plot")
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for stack in dict.fromkeys(row["stack"] for row in rows):
        color = None
        for key, label, style in series:
            points = sorted((row["batch"], row[key]) for row in rows if row["stack"] == stack and key in row)
            if points:
                color = ax.plot(*zip(*points), color=color, label=f"{stack}: {label}", **style)[0].get_color()
    devices = sorted({row["lrnnx_device"] for row in rows if "lrnnx_device" in row})
    title = f"{rows[0]['new_tokens']} new tokens, d_model {D_MODEL}"
    if devices:
        title += f"; PyTorch lrnnx measured on {', '.join(devices)}"
    batch_axes(ax, {row["batch"] for row in rows}, "µs per token", title)
    return save(fig, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stacks", default="a,b,c")
    parser.add_argument("--batches", default="1,32,256")
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--parts", default="generate,loop,floor,speculative")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    add_plot_and_anchor_arguments(parser, "lm_decode.png")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    anchors = anchors_lib.anchors(anchors_lib.device_kind(), args.anchors, benchmark="lm_decode")
    stacks, batches = args.stacks.split(","), [int(b) for b in args.batches.split(",")]
    progress = Progress(len(stacks) * len(batches), unit="row")
    rows = []
    for stack in stacks:
        model = build(stack)
        for batch in batches:
            rng = np.random.default_rng(batch)
            prompt = rng.integers(0, VOCAB, (batch, PROMPT_LENGTH)).astype(np.int32)
            row = {"stack": stack, "mixers": STACKS[stack], "batch": batch, "new_tokens": args.new_tokens}
            n = args.new_tokens
            if "generate" in parts:
                row["generate_us_per_token"] = 1e6 * time_generate(model, prompt, n, args.warmup, args.repeats) / n
                row["tokens_per_s"] = batch * 1e6 / row["generate_us_per_token"]
            if "loop" in parts:
                row["loop_us_per_token"] = 1e6 * time_loop(model, prompt, n, 1, max(1, args.repeats // 2)) / n
            if "floor" in parts:
                floor = time_floor(model, batch, n, args.warmup, args.repeats)
                row["floor_parts_us"] = {k: 1e6 * v for k, v in floor.items()}
                row["floor_us_per_token"] = sum(row["floor_parts_us"].values())
            if "speculative" in parts:
                repetitive = np.tile(prompt[:, :4], (1, PROMPT_LENGTH // 4))
                spec = Speculative(num_draft_tokens=4)
                _, stats = generate_tokens(model, repetitive, n, speculative=spec, return_stats=True)
                seconds = time_generate(model, repetitive, n, args.warmup, args.repeats, speculative=spec)
                row["speculative_us_per_token"] = 1e6 * seconds / n
                row["speculative_acceptance_rate"] = stats.acceptance_rate
                row["plain_on_repetitive_us_per_token"] = 1e6 * time_generate(model, repetitive, n, args.warmup, args.repeats) / n
            if "generate_us_per_token" in row and "loop_us_per_token" in row:
                row["speedup_vs_loop"] = row["loop_us_per_token"] / row["generate_us_per_token"]
            if "generate_us_per_token" in row and "floor_us_per_token" in row:
                row["ratio_to_floor"] = row["generate_us_per_token"] / row["floor_us_per_token"]
            row.update(lrnnx_columns(stack, batch, row.get("generate_us_per_token"), anchors))
            rows.append(row)
            progress.write(json.dumps(row))
            progress.update(f"stack {stack} B={batch}")
    progress.close()
    print("PyTorch lrnnx (lrnnx_*_us):")
    print("\n".join(f"- {line}" for line in anchors.summary()))
    result = {
        "rows": rows,
        "environment": {
            "device": str(jax.devices()[0].device_kind), "platform": jax.default_backend(), "jax": jax.__version__,
            "flax": flax.__version__, "python": platform.python_version(),
            "date": datetime.date.today().isoformat(),
            "command": "python -m benchmarks.benchmark_lm_decode " + " ".join(sys.argv[1:] if argv is None else argv),
        },
        "anchors": anchors.to_json(),
    }
    write_plot(args, "lm_decode.png", plot, rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
