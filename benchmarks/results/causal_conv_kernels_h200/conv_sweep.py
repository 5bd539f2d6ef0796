"""Time causal_conv's forward and backward kernels alone over tiles, against XLA's conv + SiLU (the reference's
forward, and its forward + vjp) at Mamba's training point: x (32, 2048, 256), K = 4, float32. Writes the rows as
JSON to argv[1] and the fastest correct settings as --set arguments to argv[2]."""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from pallas_kernels import causal_conv as cc, KernelConfig
from benchmarks.timing import median_seconds

rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((32, 2048, 256)), jnp.float32)
w = jnp.asarray(rng.standard_normal((256, 4)) * 0.5, jnp.float32)
b = jnp.asarray(rng.standard_normal(256), jnp.float32)
du = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
cfg = KernelConfig(use_kernels="always")
rows = []

def timed(name, fn, *args):
    c = jax.jit(fn).lower(*args).compile()
    ms = 1e3 * median_seconds(lambda: c(*args), 3, 30)
    rows.append(dict(config=name, ms=ms)); print(f"{name}: {ms:.4f} ms", flush=True)
    return c(*args)

ref_u, vjp = jax.vjp(cc.reference, x, w, b)
timed("xla forward", cc.reference, x, w, b)
timed("xla forward+backward", lambda x, w, b, du: jax.vjp(cc.reference, x, w, b)[1](du), x, w, b, du)
ref_grads = vjp(du)
rel = lambda a, r: float(jnp.max(jnp.abs(a - r)) / jnp.max(jnp.abs(r)))
for spec in sys.argv[3:]:
    kind, t, d, warps = spec.split(":")
    prefix = "FORWARD" if kind == "fwd" else "BACKWARD"
    for name, v in (("_BLOCK_T", t), ("_BLOCK_D", d), ("_WARPS", warps)):
        setattr(cc, prefix + name, int(v))
    if kind == "fwd":
        out = timed(spec, lambda x, w, b: cc.forward_kernel(x, w.T, b, config=cfg), x, w, b)
        err = rel(out, ref_u)
    else:
        cc.BACKWARD_PASSES = 2 if kind == "bwd2" else 1
        dx, dw, db = timed(spec, lambda x, w, b, du: cc.backward_kernel(x, w.T, b, du, config=cfg), x, w, b, du)
        err = max(rel(dx, ref_grads[0]), rel(jnp.sum(dw, (0, 1)).T, ref_grads[1]), rel(jnp.sum(db, (0, 1)), ref_grads[2]))
    rows[-1]["rel_err"] = err
    print(f"   rel err {err:.2e}", flush=True)
json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, shape=[32, 2048, 256, 4], rows=rows),
          open(sys.argv[1], "w"), indent=1)
ok = [r for r in rows if r.get("rel_err", 1.0) < 1e-5]
best = {k: min((r for r in ok if r["config"].split(":")[0] in ks), key=lambda r: r["ms"])["config"]
        for k, ks in (("fwd", ("fwd",)), ("bwd", ("bwd", "bwd2")))}
args = []
for k, spec in best.items():
    kind, t, d, warps = spec.split(":")
    prefix = "FORWARD" if kind == "fwd" else "BACKWARD"
    args += [f"pallas_kernels.causal_conv.{prefix}{n}={v}" for n, v in (("_BLOCK_T", t), ("_BLOCK_D", d), ("_WARPS", warps))]
    if kind != "fwd":
        args.append(f"pallas_kernels.causal_conv.BACKWARD_PASSES={2 if kind == 'bwd2' else 1}")
open(sys.argv[2], "w").write(" ".join(args))
print("BEST", best, flush=True)
