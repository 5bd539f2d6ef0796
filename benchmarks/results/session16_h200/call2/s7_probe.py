"""S7's XLA generation program on the GPU: its device kernels per generated step (jax.profiler trace of one
generate call of 64 steps, aggregated by kernel name) and the optimized HLO of the program.

    python .gpu/s7_probe.py --out DIR [--batches 32 1] [--models S7]
"""
import argparse
import collections
import glob
import pathlib
import shutil

import jax
from flax import nnx

from benchmarks.benchmark_fused_generation import MODELS
from benchmarks.benchmark_inference import make_inputs
from lrnnx_jax import generation
from lrnnx_jax.convert import model_class

STEPS = 64


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="S7")
    p.add_argument("--batches", type=int, nargs="+", default=[32, 1])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from jax.profiler import ProfileData
    for name in args.models.split(","):
        spec = next(m for m in MODELS if m.name == name)
        for batch in args.batches:
            model = model_class(spec.lrnnx_name)(**spec.kwargs, rngs=nnx.Rngs(0))
            x0, _ = make_inputs(batch, model.d_model, False)
            graph = generation.capture_graph(model, batch)
            tag = f"{name}_B{batch}"
            (out / f"{tag}_hlo.txt").write_text(graph.compiled.as_text())
            fn = lambda: generation.generate(model, x0, STEPS, graph_cache=graph)  # noqa: E731
            for _ in range(3):
                jax.block_until_ready(fn())
            tmp = f"/tmp/trace_{tag}"
            shutil.rmtree(tmp, ignore_errors=True)
            with jax.profiler.trace(tmp):
                jax.block_until_ready(fn())
            xplane = sorted(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True))[-1]
            data = ProfileData.from_file(xplane)
            kernels = collections.defaultdict(lambda: [0, 0.0])
            first, last = None, None
            for plane in data.planes:
                if not plane.name.startswith("/device:GPU"):
                    continue
                for line in plane.lines:
                    for e in line.events:
                        k = kernels[(line.name, e.name)]
                        k[0] += 1
                        k[1] += e.duration_ns / 1e3
                        first = e.start_ns if first is None else min(first, e.start_ns)
                        last = e.start_ns + e.duration_ns if last is None else max(last, e.start_ns + e.duration_ns)
            if first is None:
                print(f"{tag}: no GPU plane in the trace")
                continue
            lines = [f"{tag}: {STEPS} steps, device span {(last - first) / 1e3:.1f} us = {(last - first) / 1e3 / STEPS:.2f} "
                     f"us per step"]
            for (line, kname), (count, total) in sorted(kernels.items(), key=lambda kv: -kv[1][1]):
                lines.append(f"{count:6d} {total:10.1f} us  {total / STEPS:7.3f} us/step  {line[:24]:24s} {kname[:140]}")
            text = "\n".join(lines)
            (out / f"{tag}_kernels.txt").write_text(text)
            print(text[:4000], flush=True)


if __name__ == "__main__":
    main()
