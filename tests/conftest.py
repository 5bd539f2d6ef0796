"""Shared test helpers: the lrnnx parity fixtures and float64 mode."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

FIXTURE_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "lrnnx_parity"


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


def relative_error(ours, theirs) -> float:
    """``max|ours - theirs| / max|theirs|``, the fixtures' agreement measure."""
    theirs = np.asarray(theirs, np.float64)
    return float(np.max(np.abs(np.asarray(ours, np.float64) - theirs)) / np.max(np.abs(theirs)))
