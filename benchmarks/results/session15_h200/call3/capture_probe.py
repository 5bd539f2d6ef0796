"""Where capture_graph's seconds go, in a fresh process: JAX's compile-duration events during one capture.

    python .gpu/capture_probe.py MODEL BATCH OUT.json
"""
import collections
import json
import sys
import time

import jax
from flax import nnx

from benchmarks.benchmark_fused_generation import MODELS
from lrnnx_jax import generation
from lrnnx_jax.convert import model_class

name, batch, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
events = collections.defaultdict(float)
jax.monitoring.register_event_duration_secs_listener(lambda event, seconds, **kw: events.__setitem__(event, events[event] + seconds))
bench = next(m for m in MODELS if m.name == name)
model = model_class(bench.lrnnx_name)(**bench.kwargs, rngs=nnx.Rngs(0))
model.eval()
jax.block_until_ready(jax.tree.leaves(model))
events.clear()
start = time.perf_counter()
graph = generation.capture_graph(model, batch, event_mode=bench.event)
total = time.perf_counter() - start
row = dict(model=name, batch=batch, capture_s=total, fused=bool(graph.spec.fused), events=dict(events))
print(json.dumps(row))
json.dump(row, open(out, "w"), indent=1)
