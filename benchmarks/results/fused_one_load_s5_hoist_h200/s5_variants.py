"""Session 12: S5 LTI's fused rollout under a hoisting rule and a skip orientation (timing only; one process each).

PYTHONPATH=$PWD python .gpu/s5_variants.py HOIST SKIP OUT.json: HOIST "smallest" or "largest" (S5's KernelPolicy.hoist),
SKIP "dense" (as shipped: DT (H_out, H_in) contracted along axis 1) or "axis0" (D (H_in, H_out) along axis 0).
"""
import dataclasses
import sys

from benchmarks import benchmark_fused_generation as bfg
from lrnnx_jax.models import diagonal
from lrnnx_jax.models.lti import s5
from pallas_kernels import kernel_math as km

hoist, skip, out = sys.argv[1:4]
s5.S5.kernel_policy = dataclasses.replace(s5.S5.kernel_policy, hoist=hoist)
if skip == "axis0":
    shipped = diagonal.diagonal_step
    s5.S5.skip_params = lambda self: {"D0": self.D[...]}

    def step(p, s, x, inputs, precision):
        y, state = shipped({k: v for k, v in p.items() if k != "D0"}, s, x, inputs, precision)
        return y + km.project(x, p["D0"], 0, precision), state

    diagonal.diagonal_step = step
bfg.main(["--models", "S5,S5-event", "--batches", "1", "32", "--no-loop", "--no-xla", "--repeats", "10", "--warmup",
          "2", "--out", out, "--no-plot"])
