"""Plot training curves of one or more run folders, overlaid (like the paper's Figures 3 and 4).

    python tools/plot_curves.py results/paper/table3_remove_3_4_no_fusion results/paper/table4_resnet50_no_vbs -o best.png

Three panels: top-1 (train dashed, val solid), loss (likewise) and the learning rate on a log
scale, one colour per run. Needs matplotlib: pip install -e '.[plots]'.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tools.paper_tables import read_metrics  # noqa: E402

INSTALL_HINT = "plot_curves needs matplotlib: pip install -e '.[plots]'"

# (panel title, y scale, [(metrics key, line style, legend suffix), ...]); the LR panel is
# logarithmic so that MobileViT (2e-3) and ResNet (0.4) schedules are both readable.
PANELS = [
    ("top-1 (%)", "linear", [("train_top1", "--", "train"), ("val_top1", "-", "val")]),
    ("loss", "linear", [("train_loss", "--", "train"), ("val_loss", "-", "val")]),
    ("learning rate", "log", [("lr", "-", "")]),
]


class PlotError(Exception):
    """A user error: missing matplotlib or an unusable run folder."""


def load_runs(run_dirs: Sequence[str]) -> Dict[str, List[Dict[str, Any]]]:
    """{run folder: its epoch rows}; raises PlotError naming a folder that is missing or empty."""
    runs = {}
    for run_dir in run_dirs:
        if not os.path.isdir(run_dir):
            raise PlotError(f"run folder not found: {run_dir}")
        metrics = read_metrics(run_dir)
        if not metrics:
            raise PlotError(f"no epochs in {run_dir} (metrics.jsonl is missing or empty)")
        runs[run_dir] = metrics
    return runs


def import_pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or PlotError with the install command."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError(INSTALL_HINT) from None
    return plt


def _series(metrics: List[Dict[str, Any]], key: str):
    points = [(m["epoch"], m[key]) for m in metrics if m.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot(runs: Dict[str, List[Dict[str, Any]]], out: str, labels: Optional[Sequence[str]] = None,
         title: Optional[str] = None) -> None:
    """Draw every run into one figure of PANELS and save it to `out`."""
    plt = import_pyplot()
    labels = list(labels) if labels else [os.path.basename(os.path.normpath(d)) for d in runs]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4), constrained_layout=True)
    for i, (label, metrics) in enumerate(zip(labels, runs.values())):
        colour = f"C{i % 10}"
        for ax, (_, _, lines) in zip(axes, PANELS):
            for key, style, suffix in lines:
                epochs, values = _series(metrics, key)
                ax.plot(epochs, values, style, color=colour, label=f"{label} {suffix}".strip())
    for ax, (name, yscale, _) in zip(axes, PANELS):
        ax.set_title(name)
        ax.set_yscale(yscale)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="plot_curves.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders holding metrics.jsonl")
    parser.add_argument("-o", "--output", required=True, help="image to write (.png, .pdf, .svg)")
    parser.add_argument("--labels", nargs="+", help="legend names, one per run (default: folder names)")
    parser.add_argument("--title", help="figure title")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.run_dirs):
        parser.error(f"--labels got {len(args.labels)} names for {len(args.run_dirs)} run folders")
    try:
        plot(load_runs(args.run_dirs), args.output, args.labels, args.title)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
