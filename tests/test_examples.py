"""examples/quickstart.py (what `make demo` runs) builds and runs every model; examples/unet_denoise.py, in a tiny
configuration, trains an LRUUnet that improves the SNR."""

from __future__ import annotations

import pathlib
import runpy

QUICKSTART = pathlib.Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
UNET_DENOISE = QUICKSTART.with_name("unet_denoise.py")


def test_quickstart_runs_every_model(capsys):
    runpy.run_path(str(QUICKSTART), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    names = ["LRU", "S4", "S4D", "S5 (LTI)", "Centaurus", "S5 (LTV)", "Mamba", "Mamba (event)", "RG-LRU", "S7"]
    rows = [line for line in lines[2:] if line.strip()]
    assert [row[:14].strip() for row in rows] == names
    for row in rows:
        assert "(4, 256, 32)" in row and "(4, 64, 32)" in row


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
