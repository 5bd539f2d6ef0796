"""The timeline of one call, host and device: jax.profiler's trace of a few calls, the last one printed.

    python .gpu/trace_probe.py --out DIR    (one text file per scenario)
"""
import argparse
import functools
import glob
import os
import pathlib
import shutil

import jax
import numpy as np
from flax import nnx

from benchmarks.benchmark_fused_generation import MODELS, fused_runner
from benchmarks.benchmark_inference import make_inputs
from lrnnx_jax import generation
from lrnnx_jax.convert import model_class
from pallas_kernels import dispatch

ALWAYS = dispatch.KernelConfig(use_kernels="always")


def build(name, batch):
    spec = next(m for m in MODELS if m.name == name)
    model = model_class(spec.lrnnx_name)(**spec.kwargs, rngs=nnx.Rngs(0))
    x0, _ = make_inputs(batch, model.d_model, False)
    return model, x0


def lm_scenarios(layers: int):
    from benchmarks.benchmark_host_overhead import build as build_layer
    from lrnnx_jax.decoding import generate_tokens
    model = build_layer("LM", layers)
    prompt = np.random.default_rng(0).integers(0, 256, (1, 4)).astype(np.int32)
    yield f"LM{layers}_generate_tokens1", lambda: generate_tokens(model, prompt, 1)
    yield f"LM{layers}_generate_tokens32", lambda: generate_tokens(model, prompt, 32)


def scenarios(names, batch):
    for name in names:
        if name.startswith("LM"):
            yield from lm_scenarios(int(name[2:]))
            continue
        model, x0 = build(name, batch)
        graph = generation.capture_graph(model, batch)
        yield f"{name}_B{batch}_generate512", lambda m=model, x=x0, g=graph: generation.generate(m, x, 512, graph_cache=g)
        yield f"{name}_B{batch}_generate1", lambda m=model, x=x0, g=graph: generation.generate(m, x, 1, graph_cache=g)
        yield f"{name}_B{batch}_fused512", fused_runner(model, x0, None, 512, ALWAYS)[0]
        cache = model.allocate_inference_cache(batch)
        yield f"{name}_B{batch}_step", lambda m=model, x=x0, c=cache: m.step(x, c)


def summarize(xplane: str, calls: int) -> str:
    from jax.profiler import ProfileData
    data = ProfileData.from_file(xplane)
    events = []  # (plane, line, name, start, duration)
    for plane in data.planes:
        for line in plane.lines:
            for e in line.events:
                events.append((plane.name, line.name, e.name, e.start_ns, e.duration_ns))
    marks = sorted((e for e in events if e[2].startswith("probe_call")), key=lambda e: e[3])
    if len(marks) < calls:
        return f"only {len(marks)} marks found\n" + "\n".join(str(e) for e in events[:200])
    last = marks[-1]
    begin, end = last[3], last[3] + last[4]
    lines = [f"last call: {last[4] / 1e3:.1f} us (host annotation)"]
    for plane, line, name, start, dur in sorted(events, key=lambda e: e[3]):
        if start >= begin - 2e3 and start <= end + 2e5 and dur >= 0 and not name.startswith("probe_call"):
            if plane.startswith("/host") and dur < 2e3:
                continue
            lines.append(f"{(start - begin) / 1e3:9.1f} {dur / 1e3:9.1f}  {plane[:16]:16s} {line[:28]:28s} {name[:110]}")
    gaps = [f"{m[4] / 1e3:.1f}" for m in marks]
    lines.append("every traced call (us): " + ", ".join(gaps))
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="LRU,Mamba")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--python-tracer", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, fn in scenarios(args.models.split(","), args.batch):
        for _ in range(3):
            jax.block_until_ready(fn())
        tmp = f"/tmp/trace_{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        from benchmarks.timing import median_seconds
        untraced = 1e6 * median_seconds(fn, 2, 20)
        options = jax.profiler.ProfileOptions()
        options.python_tracer_level = args.python_tracer
        with jax.profiler.trace(tmp, profiler_options=options):
            for i in range(args.calls):
                with jax.profiler.TraceAnnotation(f"probe_call{i}"):
                    jax.block_until_ready(fn())
        xplane = sorted(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True))[-1]
        text = f"untraced median: {untraced:.1f} us\n" + summarize(xplane, args.calls)
        (out / f"{name}.txt").write_text(text)
        head = text.splitlines()
        print(f"== {name}\n" + "\n".join(head[:2] + [l for l in head[2:] if "/device" in l][:25] + head[-1:]), flush=True)


if __name__ == "__main__":
    main()
