"""Probe (CPU, lowering for CUDA with jax.export): which single operations of the cells' steps lower in a Mosaic GPU
kernel (plgpu.kernel), under SEM=Warpgroup (the default, layout inference) or SEM=Lane."""
import functools, os, sys, traceback
import jax, jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu
from pallas_kernels import kernel_math as km

def check(name, fn, in_shapes, out_shape):
    @functools.partial(plgpu.kernel, out_type=jax.ShapeDtypeStruct(out_shape, jnp.float32),
                       compiler_params=plgpu.CompilerParams(lowering_semantics=getattr(plgpu.LoweringSemantics, os.environ.get("SEM", "Warpgroup"))))
    def kernel(*refs):
        *ins, out = refs
        out[...] = fn(*[r[...] for r in ins])
    try:
        text = jax.export.export(jax.jit(kernel), platforms=["cuda"])(*[jax.ShapeDtypeStruct(s, jnp.float32) for s in in_shapes]).mlir_module()
        print(name, "OK")
    except Exception as e:
        print(name, "FAIL", type(e).__name__, str(e).splitlines()[0][:160])

check("project axis1 (128)x(64,128)", lambda v, W: km.project(v, W, 1, "multiply_add"), [(128,), (64, 128)], (64,))
check("project axis1 (128)x(128,128)", lambda v, W: km.project(v, W, 1, "multiply_add"), [(128,), (128, 128)], (128,))
check("project axis0 (64)x(64,128)", lambda v, W: km.project(v, W, 0, "multiply_add"), [(64,), (64, 128)], (128,))
check("project axis0 (128)x(128,128)", lambda v, W: km.project(v, W, 0, "multiply_add"), [(128,), (128, 128)], (128,))
check("outer (64,16)", lambda u, b: u[:, None] * b[None, :], [(64,), (16,)], (64, 16))
check("outer (128,16)", lambda u, b: u[:, None] * b[None, :], [(128,), (16,)], (128, 16))
check("rowsum (128,16)", lambda h: jnp.sum(h, axis=-1), [(128, 16)], (128,))
check("exp (64,)", lambda v: jnp.exp(v), [(64,)], (64,))
check("exp (128,)", lambda v: jnp.exp(v), [(128,)], (128,))
check("dot (64,128)x(128,128)", lambda a, b: jax.lax.dot(a, b, precision="highest"), [(64, 128), (128, 128)], (64, 128))
