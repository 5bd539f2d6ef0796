"""Microseconds per eager call of the public per-token APIs, where the host's own work is most of the cost.

    python -m benchmarks.benchmark_host_overhead [--models LRU,Mamba,S4,LM] [--lm-layers 4] [--repeats 300]
        [--out result.json]

At B=1 and these small sizes a call's device work is a few microseconds on a GPU, so what an eager call costs is
mostly the host: argument checks, flattening the model, the dispatch. For each model (H=128, d_state 64, Mamba 16;
``LM``: the language model of ``--lm-layers`` Mamba layers, d_model 64, d_intermediate 128, vocabulary 256) it
times, as medians of ``--repeats`` calls after ``--warmup`` (each result waited for):

* ``step``: ``model.step(x_t, cache)`` (the language model: ``model.step(ids, cache)``);
* ``multi_step``: ``model.multi_step(x, cache)`` of 4 tokens;
* ``forward``: ``model(x)`` of 16 tokens;
* ``generate``: ``generate(model, x, 1, graph_cache=capture_graph(model, 1))``, one step from a captured program
  (the language model: ``generate_tokens(model, prompt, 1)`` of a 4-token prompt, its whole decoding program);
* ``captured`` (where the library has a ``decoding.CapturedModel`` of the model): ``generate`` (the language model:
  ``generate_tokens``) as above through a ``CapturedModel`` of it, made once (its module tree is not walked at each
  call);
* ``captured_step`` (where the library's capture has eager calls): ``step`` through the ``CapturedModel``;
* ``dispatch``: the floor, one dispatch of a jitted function that takes the model's parameter leaves and the input
  and returns the input (no work).

Run it against another tree to compare two versions of the library on the same machine: the library comes from
``sys.path`` (``PYTHONPATH=/path/to/other/tree``), this script from here. Needs only jax, flax and numpy.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import lrnnx_jax
from benchmarks.timing import median_seconds
from lrnnx_jax import decoding, generation
from lrnnx_jax.architectures.language_model import LRNNLMHeadModel
from lrnnx_jax.convert import model_class
from lrnnx_jax.decoding import generate_tokens

H, N = 128, 64
LAYERS = {
    "LRU": ("lti.LRU", dict(d_model=H, d_state=N)),
    "Mamba": ("ltv.Mamba", dict(d_model=H, d_state=16)),
    "S4": ("lti.S4", dict(d_model=H, d_state=N, transposed=False)),
}
CALLS = ("step", "multi_step", "forward", "generate", "captured", "captured_step", "dispatch")


def build(name: str, lm_layers: int = 4):
    if name == "LM":
        return LRNNLMHeadModel(d_model=64, d_state=16, n_layer=lm_layers, vocab_size=256,
                               mixer_types=["Mamba"] * lm_layers, d_intermediate=128, rngs=nnx.Rngs(0))
    lrnnx_name, kwargs = LAYERS[name]
    return model_class(lrnnx_name)(**kwargs, rngs=nnx.Rngs(0))


def captured_or_none(model):
    """A ``decoding.CapturedModel`` of ``model``, or None where the library timed has none for it (a tree from
    before it, or from before it took layer models)."""
    try:
        return decoding.CapturedModel(model)
    except (AttributeError, TypeError):
        return None


def calls(name: str, model) -> dict:
    """``{call: zero-argument function}`` of the APIs the model has (the language model has no ``multi_step``)."""
    rng = np.random.default_rng(0)
    leaves = jax.tree.leaves(model)
    identity = jax.jit(lambda leaves, x: x)
    cache = model.allocate_inference_cache(1)
    if name == "LM":
        ids = jnp.asarray(rng.integers(0, 256, (1,)), jnp.int32)
        sequence = jnp.asarray(rng.integers(0, 256, (1, 16)), jnp.int32)
        prompt = np.asarray(sequence[:, :4])
        decode = lambda model: generate_tokens(model, prompt, 1)  # noqa: E731
        step = lambda model: model.step(ids, cache)  # noqa: E731
        runs = {"step": lambda: step(model), "forward": lambda: model(sequence)}
        x_t = ids
    else:
        x = jnp.asarray(0.1 * rng.standard_normal((1, 16, model.d_model)), jnp.float32)
        x_t, x_4 = x[:, 0], x[:, :4]  # sliced here: a slice in the timed call would be a dispatch of its own
        graph = generation.capture_graph(model, 1)
        decode = lambda model: generation.generate(model, x_t, 1, graph_cache=graph)  # noqa: E731
        step = lambda model: model.step(x_t, cache)  # noqa: E731
        runs = {"step": lambda: step(model), "multi_step": lambda: model.multi_step(x_4, cache),
                "forward": lambda: model(x)}
    runs["generate"] = lambda: decode(model)
    captured = captured_or_none(model)
    if captured is not None:
        runs["captured"] = lambda: decode(captured)
        if hasattr(captured, "step"):  # (a library from before has no eager calls on a capture)
            runs["captured_step"] = lambda: step(captured)
    return {**runs, "dispatch": lambda: identity(leaves, x_t)}


def measure(names, warmup: int, repeats: int, lm_layers: int = 4) -> list[dict]:
    rows = []
    for name in names:
        model = build(name, lm_layers)
        model.eval()
        for call, run in calls(name, model).items():
            rows.append(dict(model=name, call=call, us=1e6 * median_seconds(run, warmup, repeats)))
            print(f"{name} {call}: {rows[-1]['us']:.0f} us", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    names = list(dict.fromkeys(r["model"] for r in rows))
    table = {(r["model"], r["call"]): r["us"] for r in rows}
    lines = ["| model | " + " | ".join(CALLS) + " |", "|---|" + "---|" * len(CALLS)]
    for name in names:
        cells = [f"{table[name, c]:.0f}" if (name, c) in table else "-" for c in CALLS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="LRU,Mamba,S4,LM", help="comma-separated, of LRU, Mamba, S4, LM")
    parser.add_argument("--lm-layers", type=int, default=4, help="Mamba layers of the language model")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--out", default=None, help="write every number as JSON to this file")
    args = parser.parse_args(argv)
    names = args.models.split(",")
    unknown = [n for n in names if n not in (*LAYERS, "LM")]
    if unknown:
        parser.error(f"--models: unknown {unknown}; expected names of {[*LAYERS, 'LM']}")
    device = jax.devices()[0]
    print(f"device: {getattr(device, 'device_kind', device)}, jax {jax.__version__}, library {lrnnx_jax.__file__}")
    rows = measure(names, args.warmup, args.repeats, args.lm_layers)
    print(markdown(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": str(getattr(device, "device_kind", device)), "jax": jax.__version__,
                       "library": lrnnx_jax.__file__, "argv": sys.argv, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
