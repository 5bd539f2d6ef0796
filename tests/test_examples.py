"""examples/quickstart.py (what `make demo` runs) builds and runs every model; examples/unet_denoise.py, in a tiny
configuration, trains an LRUUnet that improves the SNR; examples/event_classification.py, in a tiny configuration,
classifies event streams by their timing far better than the same classifier fed constant timesteps."""

from __future__ import annotations

import pathlib
import runpy

QUICKSTART = pathlib.Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
UNET_DENOISE = QUICKSTART.with_name("unet_denoise.py")
EVENT_CLASSIFICATION = QUICKSTART.with_name("event_classification.py")


def test_quickstart_runs_every_model(capsys):
    runpy.run_path(str(QUICKSTART), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    names = ["LRU", "S4", "S4D", "S5 (LTI)", "Centaurus", "S5 (LTV)", "Mamba", "Mamba (event)", "RG-LRU", "S7"]
    rows = [line for line in lines[2:] if line.strip()]
    assert [row[:14].strip() for row in rows] == names
    for row in rows:
        assert "(4, 256, 32)" in row and "(4, 64, 32)" in row
        step_err, rms, gen_max = (float(v) for v in row.split()[-3:])
        assert step_err < 1e-4, row  # forward and recurrence agree to float32 rounding
        assert 0.01 < rms < 100 and 0 < gen_max < 100, row  # finite, bounded values


def test_unet_denoise_improves_the_snr(tmp_path, capsys):
    main = runpy.run_path(str(UNET_DENOISE), run_name="unet_denoise")["main"]
    plot = tmp_path / "denoise.png"
    result = main(["--steps", "300", "--batch", "8", "--length", "128", "--channels", "8", "16", "--factors", "4", "2",
                   "--d-state", "8", "--lr", "1e-2", "--plot", str(plot)])  # about 15 s on 2 CPU cores
    out = capsys.readouterr().out
    assert f"SNR before: {result['snr_before']:.2f} dB" in out and f"SNR after:  {result['snr_after']:.2f} dB" in out
    assert result["snr_after"] > result["snr_before"] + 2.0  # +3.6 to +4.9 dB over seeds 0-3
    if result["plot"] is not None:  # matplotlib installed
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_event_classification_beats_a_timing_blind_model(tmp_path, capsys):
    main = runpy.run_path(str(EVENT_CLASSIFICATION), run_name="event_classification")["main"]
    plot = tmp_path / "confusion.png"
    result = main(["--train-size", "512", "--test-size", "256", "--seq-len", "32", "--d-model", "16", "--d-state", "8",
                   "--steps", "150", "--batch-size", "32", "--plot", str(plot)])  # about 16 s on 1 CPU core
    out = capsys.readouterr().out
    assert f"event timesteps: test accuracy {result['accuracy']:.3f}" in out
    assert f"ignores the timing): test accuracy {result['baseline_accuracy']:.3f}" in out
    assert result["confusion"].sum() == 256
    # the values carry nothing: the timing-blind model stays near chance (0.22-0.32 over seeds 0-3), the event
    # model reads the intervals (0.92-0.98)
    assert result["baseline_accuracy"] < 0.4
    assert result["accuracy"] > 0.7 and result["accuracy"] > result["baseline_accuracy"] + 0.3
    if result["plot"] is not None:  # matplotlib installed
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "matplotlib is not installed" in out


CHAR_LM = QUICKSTART.with_name("train_char_lm.py")


def test_char_lm_trains_saves_reloads_and_samples(tmp_path, capsys, monkeypatch):
    """examples/train_char_lm.py in a tiny configuration: the held-out loss falls, the checkpoint reloads to the
    same logits, the samples are characters of the vocabulary, the loss curve is a PNG; prints without tqdm."""
    import sys

    import numpy as np

    from lrnnx_jax.architectures import LRNNLMHeadModel

    namespace = runpy.run_path(str(CHAR_LM), run_name="train_char_lm")
    result = namespace["main"](["--steps", "50", "--batch", "16", "--seq-len", "64", "--d-model", "32", "--d-state", "8",
                                "--d-intermediate", "64", "--lr", "1e-2", "--eval-every", "25", "--eval-windows", "16",
                                "--sample-tokens", "40", "--out", str(tmp_path)])  # about 11 s on 1 CPU core
    out = capsys.readouterr().out
    assert f"held-out loss before training: {result['initial_loss']:.4f}" in out
    assert f"held-out loss after 50 steps: {result['final_loss']:.4f}" in out
    # 4.12-4.13 (uniform: 4.13) -> 2.52-2.59 over seeds 0-3: the character frequencies and the commonest pairs
    assert result["final_loss"] < result["initial_loss"] - 1.2
    assert len(result["train_losses"]) == 50 and result["eval_steps"] == [0, 25, 50]
    # the checkpoint reloads to the same logits
    reloaded = LRNNLMHeadModel.from_pretrained(str(tmp_path / "checkpoint"))
    ids = np.random.default_rng(0).integers(0, len(result["vocab"]), (2, 24))
    np.testing.assert_array_equal(np.asarray(reloaded(ids)), np.asarray(result["model"](ids)))
    text = CHAR_LM.with_name("data").joinpath("shakespeare.txt").read_text()
    assert result["vocab"] == sorted(set(text))
    # both samples are 40 characters of the vocabulary, and printed
    for sample in result["samples"].values():
        assert len(sample) == 40 and set(sample) <= set(result["vocab"])
        assert sample in out
    if result["plot"] is not None:  # matplotlib installed
        assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "matplotlib is not installed" in out
    # without tqdm, the progress is printed
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    progress = namespace["Progress"](2, 1, plain=False)
    progress.update(1, 3.5)
    progress.close()
    out = capsys.readouterr().out
    assert "tqdm is not installed" in out and "step      1/2  loss 3.5000" in out


MULTI_DEVICE = QUICKSTART.with_name("train_multi_device.py")


def run_multi_device(*extra: str) -> tuple[str, float, float]:
    """examples/train_multi_device.py on 4 fake CPU devices (a subprocess: the device count is fixed when JAX starts)
    in a tiny configuration, 60 steps; returns its output and the held-out loss before and after training."""
    import os
    import subprocess
    import sys

    flags = ("--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0 "
             "--xla_llvm_disable_expensive_passes=true --xla_cpu_multi_thread_eigen=false")
    args = ["--steps", "60", "--d-model", "16", "--d-state", "8", "--lr", "1e-2", *extra]
    run = subprocess.run([sys.executable, str(MULTI_DEVICE), *args], env={**os.environ, "XLA_FLAGS": flags},
                         capture_output=True, text=True, timeout=300)  # about 10 s on 1 CPU core
    assert run.returncode == 0, run.stderr[-4000:]
    out = run.stdout
    before = float(out.split("held-out loss before training: ")[1].split()[0])
    after = float(out.split("held-out loss after 60 steps: ")[1].split()[0])
    return out, before, after


def test_train_multi_device_on_four_cpu_devices():
    """As CI runs it: the loss falls and the compiled step moves no batch-shaped array."""
    out, before, after = run_multi_device("--batch", "24", "--length", "32")
    assert "4 devices (cpu)" in out and "6 rows per device" in out
    assert "0 on batch-shaped arrays" in out and "all-reduce" in out  # the gradient's, and nothing on activations
    assert after < 0.7 * before, out
    assert "generate: (24, 16, 16), rows on 4 devices" in out


def test_train_multi_device_sequence_parallel():
    """``--sequence-parallel``: the length split over the 4 devices (10 positions each, a dimension of nothing else);
    the loss falls (0.270 -> 0.173), the compiled step moves no array with a length axis (the entering states go
    along the chain of devices, Mamba's conv halo sent on) and gathers nothing, and the sequence-parallel final cache
    equals one device's."""
    out, before, after = run_multi_device("--sequence-parallel", "--batch", "16", "--length", "40")
    assert "4 devices (cpu), mesh axis 'sequence'; length 40, 10 positions per device" in out
    assert "0 with a length axis" in out and "collective-permute" in out and "all-gather" not in out, out
    assert after < 0.75 * before, out
    difference = float(out.split("final cache from 4 devices vs one: relative difference ")[1].split()[0])
    assert difference < 1e-5, out  # float32: the composed state differs from one scan by a few ulps
