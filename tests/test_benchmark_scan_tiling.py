"""benchmarks/benchmark_scan_tiling.py: the configurations it parses and a quick run of both kernels (interpret mode)."""

from __future__ import annotations

import math

import pytest

from benchmarks import benchmark_scan_tiling as tiling
from pallas_kernels import selective_scan as ss


def test_parse_config():
    assert tiling.parse_config("bwd:256:2:4") == {"kind": "bwd", "tile": 256, "warps": 2, "chunk": 4,
                                                  "load": ss.BACKWARD_LOAD_STEPS}
    assert tiling.parse_config("fwd:128:1:4:16")["load"] == 16
    for bad in ("bwd:256:2", "xyz:256:2:4", "fwd:256:0:4", "fwd:a:2:4", "fwd:1:2:3:4:5"):
        with pytest.raises(ValueError, match="KIND:TILE:WARPS:CHUNK"):
            tiling.parse_config(bad)


def test_quick_run_times_both_kernels_and_restores_the_module_tiling():
    names = ("FORWARD_TILE", "BACKWARD_TILE", "FORWARD_LOAD_STEPS", "BACKWARD_LOAD_STEPS")
    before = [getattr(ss, name) for name in names]
    rows = tiling.main(["--quick", "--configs", "fwd:64:2:4:4", "bwd:32:1:4:4", "bwd:32:1:4"])
    assert [(r["kind"], r["tile"], r["load"]) for r in rows] == [("fwd", 64, 4), ("bwd", 32, 4),
                                                                  ("bwd", 32, ss.BACKWARD_LOAD_STEPS)]
    assert all(math.isfinite(r["ms"]) and r["ms"] > 0 and r["compile_s"] > 0 for r in rows)
    assert [getattr(ss, name) for name in names] == before
