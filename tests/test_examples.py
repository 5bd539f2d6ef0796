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
