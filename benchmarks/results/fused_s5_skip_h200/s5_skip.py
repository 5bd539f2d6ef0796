"""Session 8 experiment (timing only): what S5 LTI's dense skip costs in the fused rollout.

PYTHONPATH=$PWD python benchmarks/results/fused_s5_skip_h200/s5_skip.py VARIANT OUT.json (from the repository root; kept beside its results as it ran), VARIANT one of: dense (as shipped, DT (H_out, H_in) along axis 1), axis0
(D (H_in, H_out) contracted along axis 0), diag (only D's diagonal: wrong math, timing only), none (no skip: timing only).
"""
import sys

import jax.numpy as jnp

from benchmarks import benchmark_fused_generation as bfg
from lrnnx_jax.models import diagonal
from lrnnx_jax.models.lti import s5
from pallas_kernels import kernel_math as km

variant, out = sys.argv[1], sys.argv[2]
shipped = diagonal.diagonal_step
if variant == "axis0":
    s5.S5.skip_params = lambda self: {"D0": self.D[...]}

    def step(p, s, x, inputs, precision):
        rest = {k: v for k, v in p.items() if k != "D0"}
        y, state = shipped(rest, s, x, inputs, precision)
        return y + km.project(x, p["D0"], 0, precision), state

    diagonal.diagonal_step = step
elif variant == "diag":
    s5.S5.skip_params = lambda self: {"D": jnp.diagonal(self.D[...])}
elif variant == "none":
    s5.S5.skip_params = lambda self: {}
bfg.main(["--models", "S5", "--batches", "1", "32", "--no-loop", "--no-xla", "--repeats", "10", "--warmup", "2",
          "--out", out, "--no-plot"])
