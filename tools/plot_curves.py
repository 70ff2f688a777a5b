"""Plot training curves of run folders, overlaid (like the paper's Figures 3 and 4).

    python tools/plot_curves.py results/paper/table3_remove_3_4_no_fusion \
        results/paper/table4_resnet50_no_vbs -o best.png
    python -m tools.plot_curves results/sweeps/NAME -o ablation.png      # every point of a sweep

Each argument is a run folder (it holds metrics.jsonl), a sweep folder written by tools/sweep.py
(one line per point, named by its swept values, in grid order) or any folder of run folders,
such as results/paper (one line per run folder in it). Points and runs without an epoch yet
are left out with a note. Three panels: top-1 and loss (val solid, EMA val dashed, train dotted)
and the learning rate on a log scale; each run has its own colour and marker, and the legend
beside the panels gives its best val top-1. Needs matplotlib: pip install -e '.[plots]'.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from engine.run_folder import METRICS, read_metrics
from tools.sweep import SWEEP_FILE, SweepError, load_sweep, short_names

INSTALL_HINT = "plot_curves needs matplotlib: pip install -e '.[plots]'"

# (panel title, y scale, [(metrics key, line style, what the style means), ...]); the LR panel is
# logarithmic so that MobileViT (2e-3) and ResNet (0.4) schedules are both readable.
PANELS = [
    ("top-1 (%)", "linear", [("val_top1", "-", "val"), ("ema_val_top1", "--", "EMA val"), ("train_top1", ":", "train")]),
    ("loss", "linear", [("val_loss", "-", "val"), ("ema_val_loss", "--", "EMA val"), ("train_loss", ":", "train")]),
    ("learning rate", "log", [("lr", "-", "")]),
]
# A run is a colour and a marker: ten colours, then the next marker, so 24 runs stay apart.
MARKERS = ("", "o", "s", "^", "D", "v", "x", "*")


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


def run_style(i: int) -> Dict[str, Any]:
    """Colour and marker of the i-th run (distinct for 80 runs)."""
    return {"color": f"C{i % 10}", "marker": MARKERS[(i // 10) % len(MARKERS)], "markersize": 4}


def _final(metrics: List[Dict[str, Any]]) -> str:
    """The legend's summary of a run: its best val top-1 (and the EMA's) and at which epoch."""
    text = []
    for key, name in (("val_top1", "best"), ("ema_val_top1", "EMA")):
        rows = [m for m in metrics if m.get(key) is not None]
        if rows:
            best = max(rows, key=lambda m: m[key])
            text.append(f"{name} {best[key]:.1f} @{best['epoch']}")
    return ", ".join(text)


def plot(runs: Dict[str, Tuple[str, List[Dict[str, Any]]]], out: str, labels: Optional[Sequence[str]] = None,
         title: Optional[str] = None) -> None:
    """Draw every run into one figure of PANELS and save it to `out`."""
    plt = import_pyplot()
    fig = figure(runs, labels, title)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def figure(runs: Dict[str, Tuple[str, List[Dict[str, Any]]]], labels: Optional[Sequence[str]] = None,
           title: Optional[str] = None):
    """The figure: one colour and marker per run, the line style says which curve (val solid,
    EMA val dashed, train dotted); the legend, beside the panels, names each run with its best
    val top-1."""
    plt = import_pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter

    labels = list(labels) if labels else [label for label, _ in runs.values()]
    height = max(4.0, 0.2 * len(runs) + 1.5)  # the legend needs a row per run
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS) + 3.5, height), layout="constrained")
    handles = []
    for i, (label, (_, metrics)) in enumerate(zip(labels, runs.values())):
        style = run_style(i)
        for ax, (_, _, lines) in zip(axes, PANELS):
            for key, linestyle, _ in lines:
                epochs, values = _series(metrics, key)
                if epochs:
                    ax.plot(epochs, values, linestyle=linestyle, markevery=max(1, len(epochs) // 8), linewidth=1.2,
                            alpha=0.6 if linestyle == ":" else 1.0, **style)
        handles.append(Line2D([], [], linestyle="-", label=f"{label}  ({_final(metrics)})", **style))
    for ax, (name, yscale, lines) in zip(axes, PANELS):
        ax.set_title(name)
        ax.set_yscale(yscale)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if yscale == "log":  # 1e-4, 2e-4, 5e-4 ... as plain numbers, no labelled minor ticks
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(lambda value, _: f"{value:g}")
            ax.yaxis.set_minor_formatter(NullFormatter())
        elif len(lines) > 1:
            kinds = [Line2D([], [], color="0.3", linestyle=ls, label=kind) for _, ls, kind in lines]
            ax.legend(handles=kinds, fontsize="small", loc="best")
    fig.legend(handles=handles, loc="outside right upper", fontsize="small", title="run (best val top-1 @ epoch)",
               title_fontsize="small", frameon=False)
    if title:
        fig.suptitle(title)
    return fig


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
