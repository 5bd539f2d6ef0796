"""Probe (CPU, lowering for CUDA with jax.export; SEM=Lane or Warpgroup; softplus with log1p replaced, which Mosaic GPU lacks): does a cell's own step (mamba_cell_step) lower inside a Mosaic GPU plgpu.kernel cluster, one row per
cluster, each block holding a slice of d_inner, comm.psum through cluster shared memory? Lowered for CUDA (CPU) or run."""
import functools, sys, time, traceback
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.experimental.pallas import mosaic_gpu as plgpu
from lrnnx_jax.models import ltv
from pallas_kernels import cells
from pallas_kernels import kernel_math as km
def _log1p(e):
    u = 1.0 + e
    return jnp.where(u == 1.0, e, jnp.log(u) * (e / (u - 1.0)))
def _softplus(x, exp=jnp.exp):
    return jnp.where(x <= 20.0, _log1p(exp(jnp.minimum(x, 20.0))), x)
km.softplus = _softplus

P = int(sys.argv[1]) if len(sys.argv) > 1 else 4
STEPS = 8
import os; SEM = os.environ.get("SEM", "Lane")
model = ltv.Mamba(d_model=128, d_state=16, rngs=nnx.Rngs(0))
cell = model.cell()
pieces = cells.split_params(cell, P)
whole = {k: v for k, v in pieces.items() if k not in cell.split.params}
split = {k: v for k, v in pieces.items() if k in cell.split.params}
names = sorted(pieces)
flat = [pieces[k] for k in names]
B = 1
state0 = model.cell_state(model.allocate_inference_cache(B))
state_split = cells.split_state(cell, state0, P)
snames = sorted(state_split)
x0 = jax.random.normal(jax.random.key(1), (B, 128), jnp.float32)

def leaves_of_psum_shapes():
    # the exchanged vectors: r (R,), B (N,), C (N,) then out (H,)
    return [(cell.params["Wx_r"].shape[0],), (16,), (16,), (128,)]

def build():
    shapes = leaves_of_psum_shapes()
    scratch = [plgpu.SMEM(shp, jnp.float32) for s in range(2) for i, shp in enumerate(shapes)]
    scratch.append(plgpu.ClusterBarrier(collective_axes=("c",), num_barriers=2))

    @functools.partial(plgpu.kernel, out_type=jax.ShapeDtypeStruct((B, 128), jnp.float32),
                       scratch_types=tuple(scratch), grid=(B,), grid_names=("g",), cluster=(P,), cluster_names=("c",), compiler_params=plgpu.CompilerParams(lowering_semantics=getattr(plgpu.LoweringSemantics, SEM)))
    def kernel(*refs):
        n = len(names)
        prefs = dict(zip(names, refs[:n]))
        srefs = dict(zip(snames, refs[n:n + len(snames)]))
        x_ref = refs[n + len(snames)]
        out_ref = refs[n + len(snames) + 1]
        scratch_refs = refs[n + len(snames) + 2:]
        c = jax.lax.axis_index("c")
        g = jax.lax.axis_index("g")
        counter = [0]
        def params():
            return {k: (prefs[k].at[c][...] if k in split else prefs[k][...]) for k in names}
        def psum(tree):
            slot = counter[0] % 2; counter[0] += 1
            leaves, treedef = jax.tree.flatten(tree)
            first = 0 if len(leaves) > 1 else 3  # (r, B, C) or out
            bufs = [scratch_refs[slot * len(shapes) + first + i] for i in range(len(leaves))]
            met = scratch_refs[-1]
            for b, l in zip(bufs, leaves):
                b[...] = l
            plgpu.barrier_arrive(met.at[slot]); plgpu.barrier_wait(met.at[slot])
            outs = []
            for b in bufs:
                t = b[...]
                for j in range(1, P):
                    t = t + plgpu.cluster_ref(b, {"c": jax.lax.rem(c + j, P)})[...]
                outs.append(t)
            return jax.tree.unflatten(treedef, outs)
        comm = cells.Collectives(psum, None)
        st = {k: srefs[k].at[g, c][...] for k in snames}
        x = x_ref.at[g][...]
        def body(_, carry):
            st, x = carry
            y, st = cell.step(params(), st, x, {}, "multiply_add", comm=comm)
            return st, y
        st, x = jax.lax.fori_loop(0, STEPS, body, (st, x))
        out_ref.at[g][...] = x
    return kernel

kernel = build()
args = [*flat, *[state_split[k] for k in snames], x0]
run = jax.jit(kernel)
t0 = time.perf_counter()
try:
    if jax.default_backend() == "gpu":
        print(run(*args)); print("ran", time.perf_counter() - t0)
    else:
        text = jax.export.export(run, platforms=["cuda"])(*[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]).mlir_module()
        print("lowered", "mosaic_gpu" in text, time.perf_counter() - t0)
except Exception as e:
    traceback.print_exc(limit=-6)
