"""Where capture_graph's time goes: JAX's compile events (trace, MLIR lowering, backend compile) for one model."""
import collections, json, sys, time
start = time.perf_counter()
import jax
from flax import nnx
from jax import monitoring

events = collections.defaultdict(float)
monitoring.register_event_duration_secs_listener(lambda name, secs, **kw: events.__setitem__(name, events[name] + secs))
from benchmarks.benchmark_fused_generation import MODELS
from lrnnx_jax import generation
from lrnnx_jax.convert import model_class

name, batch = sys.argv[1], int(sys.argv[2])
options = json.loads(sys.argv[3]) if len(sys.argv) > 3 else None
bench = next(m for m in MODELS if m.name == name)
model = model_class(bench.lrnnx_name)(**bench.kwargs, rngs=nnx.Rngs(0))
model.eval()
jax.block_until_ready(jax.tree.leaves(model))
events.clear()
t0 = time.perf_counter()
graph = generation.capture_graph(model, batch, event_mode=bench.event,
                                 config=generation.GenerationConfig(compiler_options=options))
total = time.perf_counter() - t0
print("PROBE", json.dumps({"model": name, "batch": batch, "options": options, "capture_s": total,
                           "fused": bool(graph.spec.fused), "events": {k.rsplit('/', 1)[-1]: v for k, v in events.items()}}))
