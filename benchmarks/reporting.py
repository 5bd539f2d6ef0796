"""What the benchmarks share for their output: a progress bar and matplotlib, each optional.

tqdm and matplotlib come with the ``bench`` extra (``pip install -e ".[bench]"``, which ``make setup`` installs).
Without them a benchmark still runs: plain progress lines instead of a bar, and a message instead of plots.
"""

from __future__ import annotations

import pathlib
from typing import Optional


class Progress:
    """tqdm when it is installed, otherwise one printed line per finished item."""

    def __init__(self, total: int, desc: Optional[str] = None, unit: str = "point"):
        self.total, self.done, self.desc = total, 0, desc
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)

    def update(self, label: str):
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label)
            self.bar.update(1)
        else:
            prefix = f"  {self.desc}" if self.desc else " "
            print(f"{prefix} [{self.done}/{self.total}] {label}", flush=True)

    def write(self, message: str):
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def pyplot(what: str = "plots"):
    """``matplotlib.pyplot`` on the Agg backend, or ``None`` after saying that no ``what`` are written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no {what} (the CSV and JSON files hold every number; "
              'pip install -e ".[bench]" for plots)')
        return None
    return plt


def save(fig, path: pathlib.Path) -> str:
    """Write ``fig`` to ``path``, close it and return the file name."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def batch_axes(ax, batches, ylabel: str, title: str, ncol: int = 2):
    """Log-log axes over batch sizes: ticks at ``batches``, a grid and a small legend."""
    import matplotlib.pyplot as plt

    batches = sorted(batches)
    ax.set(xscale="log", yscale="log", xlabel="batch size B", ylabel=ylabel, title=title)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=ncol)


def write_plot(args, default_name: str, plot, rows):
    """Unless ``--no-plot``: ``plot(path, rows)`` at ``--plot``, else beside ``--out``, else
    ``benchmark_results/<default_name>``; prints where it went (``plot`` returns a false value when it wrote none)."""
    if args.no_plot:
        return
    if args.plot:
        path = pathlib.Path(args.plot)
    else:
        path = pathlib.Path(args.out).with_suffix(".png") if args.out else pathlib.Path("benchmark_results") / default_name
    if plot(path, rows):
        print(f"plot: {path}")


def add_plot_and_anchor_arguments(parser, default_plot_name: str):
    """``--plot``, ``--no-plot`` and ``--anchors``, as every benchmark with a plot and lrnnx anchors takes them."""
    parser.add_argument("--plot", type=pathlib.Path, default=None,
                        help=f"the PNG plot (default: --out with .png, else benchmark_results/{default_plot_name})")
    parser.add_argument("--no-plot", action="store_true", help="write no plot")
    parser.add_argument("--anchors", action="append", type=pathlib.Path, metavar="PATH",
                        help="a results file of PyTorch lrnnx numbers, used only where measured on this device kind "
                        "(repeatable; default benchmarks/results/lrnnx_anchors.json)")
