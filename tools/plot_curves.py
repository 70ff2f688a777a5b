"""Plot training curves of run folders, overlaid (like the paper's Figures 3 and 4).

    python tools/plot_curves.py results/paper/table3_remove_3_4_no_fusion \
        results/paper/table4_resnet50_no_vbs -o best.png
    python -m tools.plot_curves results/sweeps/NAME -o ablation.png      # every point of a sweep

Each argument is a run folder (it holds metrics.jsonl), a sweep folder written by tools/sweep.py
(one line per point, named by its swept values, in grid order) or any folder of run folders,
such as results/paper (one line per run folder in it). Points and runs without an epoch yet
are left out with a note. Three panels: top-1 (train dashed, val solid), loss (likewise) and
the learning rate on a log scale, one colour per run. Needs matplotlib: pip install -e '.[plots]'.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from engine.run_folder import METRICS, read_metrics
from tools.sweep import SWEEP_FILE, SweepError, load_sweep, short_names

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


def runs_in(path: str) -> List[Tuple[str, str]]:
    """(legend label, run folder) for each run a command-line path names: the folder itself when it
    holds metrics.jsonl, a sweep's points labelled by their swept values, or the run folders in it."""
    if not os.path.isdir(path):
        raise PlotError(f"run folder not found: {path}")
    if os.path.isfile(os.path.join(path, METRICS)):
        return [(os.path.basename(os.path.normpath(path)), path)]
    if os.path.isfile(os.path.join(path, SWEEP_FILE)):
        try:
            sweep = load_sweep(path)
        except SweepError as e:
            raise PlotError(str(e)) from None
        names = short_names([a.key for a in sweep.axes])
        return [(", ".join(f"{names[k]}={v}" for k, v in p.values), os.path.join(path, p.label)) for p in sweep.points]
    children = sorted(e.path for e in os.scandir(path) if e.is_dir() and os.path.isfile(os.path.join(e.path, METRICS)))
    if not children:
        raise PlotError(f"no epochs in {path} (no metrics.jsonl, and no run or sweep folders inside)")
    return [(os.path.basename(c), c) for c in children]


def load_runs(paths: Sequence[str], log: Callable[[str], None] = print) -> Dict[str, Tuple[str, List[Dict[str, Any]]]]:
    """{run folder: (legend label, its epoch rows)} for every run the paths name. A run folder
    given itself must have epochs (PlotError naming it); inside a folder, runs without are noted."""
    runs = {}
    for path in paths:
        found = runs_in(path)
        for label, run_dir in found:
            metrics = read_metrics(run_dir)
            if metrics:
                runs[run_dir] = (label, metrics)
            elif len(found) == 1 and run_dir == path:
                raise PlotError(f"no epochs in {run_dir} (metrics.jsonl is missing or empty)")
            else:
                log(f"note: {run_dir} has no epochs yet; left out")
    if not runs:
        raise PlotError(f"no epochs in any run of {', '.join(paths)}")
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


def plot(runs: Dict[str, Tuple[str, List[Dict[str, Any]]]], out: str, labels: Optional[Sequence[str]] = None,
         title: Optional[str] = None) -> None:
    """Draw every run into one figure of PANELS and save it to `out`."""
    plt = import_pyplot()
    labels = list(labels) if labels else [label for label, _ in runs.values()]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4), constrained_layout=True)
    for i, (label, (_, metrics)) in enumerate(zip(labels, runs.values())):
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
    parser.add_argument("run_dirs", nargs="+", metavar="FOLDER",
                        help="run folders (holding metrics.jsonl), sweep folders or folders of run folders")
    parser.add_argument("-o", "--output", required=True, help="image to write (.png, .pdf, .svg)")
    parser.add_argument("--labels", nargs="+", help="legend names, one per run (default: folder names, or a "
                        "sweep point's swept values)")
    parser.add_argument("--title", help="figure title")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.run_dirs)
        if args.labels and len(args.labels) != len(runs):
            parser.error(f"--labels got {len(args.labels)} names for {len(runs)} runs")
        plot(runs, args.output, args.labels, args.title)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
