"""The README's quickstart snippet runs as written."""

from __future__ import annotations

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_snippet_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python snippet"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["y"].shape == (4, 256, 32)
    assert namespace["y_t"].shape == (4, 32)
    assert namespace["samples"].shape == (4, 128, 32)
    assert np.isfinite(float(namespace["loss"]))


def test_language_model_snippet_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    snippet = next(b for b in blocks if "LRNNLMHeadModel" in b)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (2, 12, 104)
    assert namespace["tokens"].shape == (2, 20) and int(namespace["tokens"].max()) < 100
    assert 0.0 <= namespace["stats"].acceptance_rate <= 1.0
