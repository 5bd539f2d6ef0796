"""examples/quickstart.py (what `make demo` runs) builds and runs every model."""

from __future__ import annotations

import pathlib
import runpy

QUICKSTART = pathlib.Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


def test_quickstart_runs_every_model(capsys):
    runpy.run_path(str(QUICKSTART), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    names = ["LRU", "S4", "S4D", "S5 (LTI)", "Centaurus", "S5 (LTV)", "Mamba", "Mamba (event)", "RG-LRU", "S7"]
    rows = [line for line in lines[2:] if line.strip()]
    assert [row[:14].strip() for row in rows] == names
    for row in rows:
        assert "(4, 256, 32)" in row and "(4, 64, 32)" in row
