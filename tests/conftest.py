"""Shared test helpers: the lrnnx parity fixtures and float64 mode."""

from __future__ import annotations

import faulthandler
import functools
import contextlib
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys

# The CPU suite is dominated by XLA compile time: compile without LLVM's expensive optimisation
# passes (numerics are unchanged; IEEE semantics hold at every level). Not on GPU machines.
# Single-threaded Eigen and FFT: XLA's CPU FFT thunk runs ducc's multi-threaded FFT from inside XLA's
# intra-op pool, and on a 2-core machine two FFTs running at once can wait on each other for ever
# (seen: a pytest worker hung in FftThunk -> ducc0 latch::wait with both pool threads blocked, which
# is how CI ran out of its 90 minutes). pytest-xdist already keeps every core busy.
if shutil.which("nvidia-smi") is None:
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
         "--xla_cpu_multi_thread_eigen=false"]
    ).strip()

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

#: ../shared/fixtures beside the checkout; LRNNX_FIXTURES overrides it (GPU runs carry a copy in .fixtures)
FIXTURES_ROOT = pathlib.Path(
    os.environ.get("LRNNX_FIXTURES", pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"))
FIXTURE_DIR = FIXTURES_ROOT / "lrnnx_parity"
LM_FIXTURE_DIR = FIXTURES_ROOT / "lrnnx_lm"


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module. Every CPU executable holds about three memory maps
    (measured: 300 small programs add ~930 maps, ``jax.clear_caches()`` returns them), and a pytest worker
    compiles thousands of programs; two full runs without this ended in a segmentation fault inside XLA's
    compiler late in a worker (the likely cause: the per-process limit of 65,530 maps, vm.max_map_count)."""
    yield
    jax.clear_caches()


#: a test that runs longer than this is stuck (the slowest take ~20 s on 2 CPU cores): its worker prints every
#: thread's traceback and exits, so that pytest-xdist reports the test as crashed instead of the suite hanging
TEST_WATCHDOG_SECONDS = 600


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    faulthandler.dump_traceback_later(TEST_WATCHDOG_SECONDS, exit=True, file=sys.__stderr__)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


#: the modules whose module-scoped fixture runs a multi-device check in a subprocess for 40-170 s (on 2 CPU cores)
SUBPROCESS_MODULES = ("test_parallel.py", "test_sequence_parallel.py", "test_benchmark_multi_gpu.py",
                      "test_model_parallel.py")


def pytest_collection_modifyitems(config, items):
    """The long multi-device subprocess modules first: pytest-xdist hands out tests in collection order, so they start
    at once, side by side with the short tests, instead of running alone at the end of the suite (measured: the
    last 2 % of the suite took four minutes on one busy core)."""
    items.sort(key=lambda item: item.path.name not in SUBPROCESS_MODULES)  # stable: each group keeps its order


@pytest.fixture(autouse=True)
def float32_matmuls():
    """Every test runs its dense matmuls at float32 accuracy: the tests compare paths (forward, step, kernels,
    verification) and references at float32 tolerances, and on a GPU XLA's default float32 matmul is TF32 (about
    1e-3 relative). A no-op on the CPU, whose default is float32 already."""
    with jax.default_matmul_precision("highest"):
        yield


def fixture_names(prefix: str = "") -> list[str]:
    """Stems of the parity fixtures (empty when ../shared/fixtures is absent)."""
    if not FIXTURE_DIR.is_dir():
        return []
    return sorted(p.stem for p in FIXTURE_DIR.glob("*.npz") if prefix in p.stem)


def load_fixture(name: str):
    """``(meta, arrays, state_dict)`` of one fixture, or a skip when the folder is absent."""
    path = FIXTURE_DIR / f"{name}.npz"
    if not path.exists():
        pytest.skip(f"lrnnx parity fixtures not found at {FIXTURE_DIR} (../shared/fixtures is absent)")
    z = np.load(path)
    meta = json.loads(bytes(z["meta_json"]))
    arrays = {k: z[k] for k in z.files if k != "meta_json" and not k.startswith("param/")}
    state_dict = {k[len("param/"):]: z[k] for k in z.files if k.startswith("param/")}
    return meta, arrays, state_dict


def check_prefill_then_decode(fixture: str, split: int):
    """Prefill an lrnnx fixture's first ``split`` steps (``return_cache``), decode the rest with ``step``:
    together they must equal lrnnx's forward; and ``lengths=(24, 10)`` must give row 1 as if alone, with
    zeros after its length. Event fixtures use their timesteps. Returns ``(meta, arrays, state_dict, cache)``
    (the fixture and the cache after the prefill) for model-specific checks."""
    from lrnnx_jax.convert import from_lrnnx

    meta, arrays, state_dict = load_fixture(fixture)
    model = from_lrnnx(meta["model"], meta["kwargs"], state_dict)
    x, y_ref, tau = arrays["x"], arrays["y_forward"], arrays.get("integration_timesteps")
    head, tail = (None, None) if tau is None else (tau[:, :split], tau[:, split:])
    y_head, cache = model(x[:, :split], integration_timesteps=head, return_cache=True)
    y_tail, _ = run_steps(model, x[:, split:], tail, cache)
    assert relative_error(np.concatenate([y_head, y_tail], 1), y_ref) < 1e-4
    y_len = model(x, integration_timesteps=tau, lengths=jnp.asarray([24, 10]))
    assert relative_error(y_len[1, :10], y_ref[1, :10]) < 1e-4
    assert np.all(np.asarray(y_len[1, 10:]) == 0)
    return meta, arrays, state_dict, cache


def relative_error(ours, theirs) -> float:
    """``max|ours - theirs| / max|theirs|``, the fixtures' agreement measure."""
    wide = np.complex128 if np.iscomplexobj(theirs) or np.iscomplexobj(ours) else np.float64
    theirs = np.asarray(theirs, wide)
    return float(np.max(np.abs(np.asarray(ours, wide) - theirs)) / np.max(np.abs(theirs)))


def same_through_capture(model, captured, call):
    """``call`` of ``model`` and of its ``decoding.CapturedModel`` ``captured``: equal pytrees (shapes, dtypes and
    every value exactly, the same program with the same leaves), returned as the model's."""
    expected, got = call(model), call(captured)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, expected)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    return expected



@functools.partial(jax.jit, static_argnums=(0, 5))
def _run_steps(graphdef, state, x, tau, cache, kernel_config):
    model = nnx.merge(graphdef, state)

    def body(c, inputs):
        x_t, tau_t = inputs
        y_t, c = model.step(x_t, c, integration_timesteps=tau_t, kernel_config=kernel_config)
        return c, y_t

    taus = None if tau is None else jnp.moveaxis(tau, 1, 0)
    cache, ys = jax.lax.scan(body, cache, (jnp.moveaxis(x, 1, 0), taus))
    return jnp.moveaxis(ys, 0, 1), cache


def run_steps(model, x, integration_timesteps=None, cache=None, kernel_config=None):
    """``model.step`` over ``x (B, L, H)`` from ``cache`` (fresh when None), in one jitted scan, with
    ``kernel_config`` (a ``pallas_kernels.KernelConfig``; the default when None).

    Returns ``(y (B, L, H), final cache)``; ``integration_timesteps`` is ``(B, L)`` or None.
    """
    if cache is None:
        cache = model.allocate_inference_cache(x.shape[0], max_seqlen=x.shape[1])
    graphdef, state = nnx.split(model)
    tau = None if integration_timesteps is None else jnp.asarray(integration_timesteps)
    from pallas_kernels import dispatch

    return _run_steps(graphdef, state, jnp.asarray(x), tau, cache, dispatch.resolve(kernel_config))


@pytest.fixture
def lower_for_h100(monkeypatch):
    """Lower to CUDA on this CPU machine: Pallas translates each kernel to Triton IR (not compiled).

    Interpret mode runs a kernel body with XLA, so it cannot see a primitive or an
    indexing form that has no Triton lowering; this does. ``lower(fn, *args)`` returns
    the module text; ``kernels`` (default 1) is the number of Triton kernels expected in it.
    """
    from jax._src.pallas.triton import gpu_info, pallas_call_registration

    h100 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
    monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info", lambda: h100)

    def lower(fn, *args, kernels: int = 1):
        checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
        text = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args).mlir_module()
        assert text.count("__gpu$xla.gpu.triton") == kernels
        return text

    return lower


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.names: list[str] = []

    def emit(self, record):
        match = re.search(r"Finished XLA compilation of jit\((\w+)\)", record.getMessage())
        if match:
            self.names.append(match.group(1))


@contextlib.contextmanager
def compile_log():
    """Collect the names of the programs XLA compiles inside the block."""
    handler, logger = _Collect(), logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            yield handler.names
    finally:
        logger.removeHandler(handler)


def multi_device_reports(script: pathlib.Path, *argvs: list[str], timeout: float = 600) -> list[dict]:
    """Run ``script`` (a check script of tests/ that sets its own ``XLA_FLAGS``: fake CPU devices, which must be fixed
    before JAX starts) once per ``argv`` (once without arguments when none is given), the runs side by side, and
    return each run's JSON report (the last line of its standard output)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    runs = [subprocess.Popen([sys.executable, str(script), *argv], env=env, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE) for argv in (argvs or ([],))]
    reports = []
    for run in runs:
        out, err = run.communicate(timeout=timeout)
        assert run.returncode == 0, err[-6000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports
