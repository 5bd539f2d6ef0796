"""Published numbers of other libraries ("anchors") that a benchmark may compare with, loaded from a results file.

A report compares only numbers measured in the same run, or numbers read from a named results file that says
on which device they were measured. The default file, ``benchmarks/results/lrnnx_anchors.json``, holds the
PyTorch lrnnx numbers quoted in the issues (see each anchor's ``source``). Each anchor is::

    {"id": ..., "benchmark": "generate" | "lm_decode" | ..., "library": "PyTorch lrnnx",
     "value": 30.0, "unit": "us_per_step", "device": "NVIDIA H100", "source": "...",
     "measured": {"model": "LRU", "B": 32, "H": 128, "d_state": 64, "steps": 512, "method": "CUDA-graph replay"}}

A benchmark uses an anchor only when

* this run's device kind (``jax.devices()[0].device_kind``, e.g. ``"NVIDIA H100 80GB HBM3"``) names the anchor's
  device: every word of ``device`` except ``NVIDIA`` is a word of the device kind, so an H100 anchor serves an
  "NVIDIA H100 80GB HBM3" run and never a CPU or H200 run; and
* a row of the run has the anchor's configuration: :meth:`Anchors.find` is given the row's configuration and
  every key it names must equal the anchor's ``measured`` value.

Every other anchor of the benchmark is reported as skipped, with why (:meth:`Anchors.summary`).

A results file may also hold ``"targets"``: the goals an issue sets for this library, in the same form (``library``
``"lrnnx_jax"``, ``value`` the time to reach at most), read with ``key="targets"`` and used by the same rules, so a
target set on an H200 is compared only with an H200 run.

``python -m benchmarks.anchors --lrnnx-csv DIR --device "NVIDIA H100" --out FILE`` turns the CSV files of lrnnx's
``benchmarks/run_all.py`` (``infer_{seq_length,model_dim,batch_size}.csv``) into a results file of ``generate``
anchors, which ``python -m benchmarks.run_all --anchors FILE`` draws next to its own sweeps.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import pathlib
from typing import Iterable, Optional, Sequence

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
DEFAULT_PATH = RESULTS / "lrnnx_anchors.json"
UNITS = {"us_per_step": "µs/step", "us_per_token": "µs/token", "ms": "ms"}
#: words of a device name that say nothing about the chip
_VENDOR_WORDS = {"nvidia"}


def device_kind() -> str:
    """This process's device kind, as the anchors' ``device`` is compared with (``"cpu"`` on the CPU)."""
    import jax

    device = jax.devices()[0]
    return str(getattr(device, "device_kind", device.platform))


def same_device(anchor_device: str, kind: str) -> bool:
    """Whether a run on ``kind`` may be compared with numbers measured on ``anchor_device``."""
    words = set(kind.lower().replace("-", " ").split())
    wanted = [w for w in anchor_device.lower().replace("-", " ").split() if w not in _VENDOR_WORDS]
    return bool(wanted) and all(w in words for w in wanted)


@dataclasses.dataclass(frozen=True)
class Anchor:
    id: str
    benchmark: str
    library: str
    value: float
    unit: str
    measured: dict
    device: str
    source: str
    path: str  # the results file it was read from

    def matches(self, config: dict) -> bool:
        return all(_plain(self.measured.get(key)) == _plain(value) for key, value in config.items())

    def configuration(self) -> str:
        what = self.measured.get("model") or "+".join(self.measured.get("stack") or [])
        rest = ", ".join(f"{k}={v}" for k, v in self.measured.items()
                         if k not in ("model", "stack", "method", "lrnnx_class") and v is not None)
        return f"{what} ({rest})" if rest else what

    def label(self) -> str:
        """What, how much, how and where, e.g.
        ``LRU (B=32, H=128, d_state=64, steps=512): 30 µs/step, PyTorch lrnnx CUDA-graph replay on NVIDIA H100``."""
        method = self.measured.get("method")
        return (f"{self.configuration()}: {self.value:g} {UNITS.get(self.unit, self.unit)}, {self.library}"
                f"{' ' + method if method else ''} on {self.device}")


def _plain(value):
    """Tuples and lists compare equal (JSON has only lists)."""
    return list(value) if isinstance(value, tuple) else value


def _shown(path: pathlib.Path) -> str:
    path = pathlib.Path(path).resolve()
    try:
        return str(path.relative_to(RESULTS.parents[1]))
    except ValueError:
        return str(path)


@dataclasses.dataclass
class Anchors:
    """The anchors of one benchmark: ``usable`` (measured on this run's device kind) and ``skipped`` (with why)."""

    device_kind: str
    files: list[str]
    usable: list[Anchor]
    skipped: list[tuple[Anchor, str]]
    used: dict = dataclasses.field(default_factory=dict)

    def find(self, **config) -> Optional[Anchor]:
        """The first usable anchor whose ``measured`` values equal every given key (``None``: no comparison)."""
        for anchor in self.usable:
            if anchor.matches(config):
                self.used[anchor.id] = anchor
                return anchor
        return None

    def unmatched(self) -> list[Anchor]:
        return [a for a in self.usable if a.id not in self.used]

    def summary(self) -> list[str]:
        """Report lines: the files, the anchors compared with, and each skipped anchor with why."""
        lines = [f"anchor files: {', '.join(self.files) or 'none'}; this run's device: {self.device_kind}"]
        lines += [f"compared with {a.label()} (source: {a.source})" for a in self.used.values()]
        if not self.used:
            lines.append("compared with no anchor")
        lines += [f"skipped {a.label()}; {why}" for a, why in self.skipped]
        lines += [f"skipped {a.label()}; no row of this run has its configuration" for a in self.unmatched()]
        return lines

    def to_json(self) -> dict:
        return {
            "device_kind": self.device_kind,
            "files": self.files,
            "used": [dataclasses.asdict(a) for a in self.used.values()],
            "skipped": [{"id": a.id, "device": a.device, "reason": why} for a, why in self.skipped]
            + [{"id": a.id, "device": a.device, "reason": "no row of this run has its configuration"}
               for a in self.unmatched()],
        }


def load(path, key: str = "anchors") -> list[Anchor]:
    """Every anchor of one results file (``key="targets"``: its targets; a file without that list has none)."""
    path = pathlib.Path(path)
    data = json.loads(path.read_text())
    anchors = []
    for entry in data.get(key, []):
        missing = {"id", "benchmark", "value", "unit", "measured", "device"} - set(entry)
        if missing:
            raise ValueError(f"{path}: anchor {entry.get('id', '?')!r} lacks {sorted(missing)}")
        anchors.append(Anchor(id=entry["id"], benchmark=entry["benchmark"], library=entry.get("library", "lrnnx"),
                              value=float(entry["value"]), unit=entry["unit"], measured=dict(entry["measured"]),
                              device=entry["device"], source=entry.get("source", ""), path=_shown(path)))
    return anchors


def anchors(kind: Optional[str] = None, paths: Optional[Sequence] = None, benchmark: Optional[str] = None,
            key: str = "anchors") -> Anchors:
    """The anchors of ``benchmark`` (all benchmarks if None) in ``paths`` (default: ``lrnnx_anchors.json``), split
    into those measured on device ``kind`` (default: this process's) and the skipped ones (``key="targets"``: the
    files' targets)."""
    kind = device_kind() if kind is None else kind
    if not paths:
        if not DEFAULT_PATH.exists():  # not installed in editable mode: results/ is not package data
            print(f"no anchors: {DEFAULT_PATH} is not there; name a results file to compare with")
            return Anchors(device_kind=kind, files=[], usable=[], skipped=[])
        paths = [DEFAULT_PATH]
    paths = [pathlib.Path(p) for p in paths]
    usable, skipped = [], []
    for path in paths:
        for anchor in load(path, key):
            if benchmark is not None and anchor.benchmark != benchmark:
                continue
            if same_device(anchor.device, kind):
                usable.append(anchor)
            else:
                skipped.append((anchor, f"this run is on {kind}, another device kind"))
    return Anchors(device_kind=kind, files=[_shown(p) for p in paths], usable=usable, skipped=skipped)


# ------------------------------------------------------------------ lrnnx's run_all CSV files -> a results file
#: lrnnx's ``benchmarks/run_all.py``: the fixed sizes of each sweep and the state size of every model
LRNNX_SWEEPS = {
    "seq_length": lambda v: dict(B=32, H=128, steps=v),
    "model_dim": lambda v: dict(B=32, H=v, steps=512),
    "batch_size": lambda v: dict(B=v, H=128, steps=512),
}
LRNNX_STATE = 16


def from_lrnnx_csv(directory, device: str, source: str) -> list[dict]:
    """Anchors (µs per generated step, the mean over repeats) from lrnnx's ``infer_<sweep>.csv`` files."""
    entries = []
    for column, sizes in LRNNX_SWEEPS.items():
        path = pathlib.Path(directory) / f"infer_{column}.csv"
        if not path.exists():
            continue
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                value = int(row[column])
                config = sizes(value)
                entries.append(dict(
                    id=f"generate/{row['model']}/{column}={value}", benchmark="generate", library="PyTorch lrnnx",
                    value=1e3 * float(row["mean_ms"]) / config["steps"], unit="us_per_step",
                    measured=dict(model=row["model"], B=config["B"], H=config["H"], d_state=LRNNX_STATE,
                                  steps=config["steps"], sweep=column,
                                  method="CUDA-graph generate (lrnnx benchmarks/run_all.py)"),
                    device=device, source=source or f"lrnnx benchmarks/run_all.py output {path}"))
    return entries


def main(argv: Optional[Iterable[str]] = None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.anchors", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lrnnx-csv", required=True, type=pathlib.Path,
                        help="the directory of lrnnx's run_all output (infer_<sweep>.csv)")
    parser.add_argument("--device", required=True, help="the GPU those numbers were measured on, e.g. 'NVIDIA H100'")
    parser.add_argument("--source", default="", help="where the numbers come from (default: the directory)")
    parser.add_argument("--out", required=True, type=pathlib.Path)
    args = parser.parse_args(None if argv is None else list(argv))
    entries = from_lrnnx_csv(args.lrnnx_csv, args.device, args.source)
    if not entries:
        parser.error(f"no infer_<sweep>.csv file of lrnnx in {args.lrnnx_csv}")
    args.out.write_text(json.dumps({"description": f"lrnnx run_all sweeps on {args.device}", "anchors": entries},
                                   indent=1) + "\n")
    print(f"{len(entries)} anchors measured on {args.device} written to {args.out}")


if __name__ == "__main__":
    main()
