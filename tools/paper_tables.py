"""Reproduce the paper's Tables 1-4: list the rows, train them, or tabulate finished runs.

    python tools/paper_tables.py --list
    python tools/paper_tables.py --run --table 3 [--rows 3.5 3.6] [--results DIR] [--section.key VALUE ...]
        [--launcher local|slurm] [--parallel N] [--slurm.partition P --slurm.time 4:00:00 ...]
    python tools/paper_tables.py --collect results/paper [--csv tables.csv]
    python tools/paper_tables.py --status [results/paper]

Each row is one YAML file under config/paper/ and trains into `<results>/<config stem>/`, so rows
that share a file (Table 4 A and F are the Table 2 baselines) share a run. Measured figures come
from the run folders alone (metrics.jsonl, summary.json); a row without one shows as pending.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from engine.run_folder import best_epoch, read_metrics, read_summary
from options.config import ConfigError, load_config, parse_flags, to_yaml
from utils.files import atomic_open
from tools import launchers
from tools.launchers import RunSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PAPER_CONFIGS = os.path.join(ROOT, "config", "paper")
DEFAULT_RESULTS = os.path.join("results", "paper")
NUM_CLASSES = 200
MISSING = "–"


@dataclass(frozen=True)
class Row:
    """One row of the paper's tables: where its config lives and what the paper reports."""

    table: int
    key: str  # unique over all tables: "1.1" ... "3.8", and the paper's letters A-K for Table 4
    experiment: str
    config: str  # file name under config/paper/
    train_top1: Optional[float] = None  # the paper's figures; None for rows the paper lacks
    val_top1: Optional[float] = None
    val_top5: Optional[float] = None
    params: Optional[str] = None  # as the paper prints it (Table 1 gives 1000-class counts)
    # What the row's settings were checked against (tests/test_paper_configs.py): "log" (the
    # authors' training log), "config" (their config, or it plus the row's one stated change),
    # "paper" (only the paper's text: no run of theirs survives), "none" (an ablation of your own).
    verified: str = "none"


VERIFIED = {"log": "authors' log", "config": "authors' config", "paper": "paper text only",
            "none": "– (not the paper's)"}

TITLES = {
    1: "Table 1. MobileViT baselines",
    2: "Table 2. ResNet baselines",
    3: "Table 3. MobileViT x_small experiments (variable batch sampler off)",
    4: "Table 4. ResNet experiments",
}

# The registry: adding an ablation to a table is one line here plus its YAML file.
# Parameter counts are the paper's: Table 1 and 2 print them, Table 3 only MobileViT-Tiny's
# (section 3.1, "817k"), Table 4 reuses Table 2's models.
ROWS: List[Row] = [
    Row(1, "1.1", "small", "table1_mobilevit_small.yaml", 54.03, 44.91, 70.37, "5.6M", verified="config"),
    Row(1, "1.2", "x_small", "table1_mobilevit_x_small.yaml", 55.97, 53.42, 78.51, "2.3M", verified="config"),
    Row(1, "1.3", "xx_small", "table1_mobilevit_xx_small.yaml", 52.14, 50.36, 75.75, "1.3M", verified="config"),
    Row(2, "2.1", "ResNet-50", "table2_resnet50.yaml", 54.61, 55.70, 80.18, "23.9M", verified="log"),
    Row(2, "2.2", "ResNet-34", "table2_resnet34.yaml", 50.62, 52.78, 76.74, "21.4M", verified="log"),
    Row(2, "2.3", "ResNet-18", "table2_resnet18.yaml", 53.84, 54.37, 78.26, "11.3M", verified="log"),
    Row(3, "3.1", "no variable batch", "table3_no_vbs.yaml", 58.69, 57.29, 80.49, verified="log"),
    Row(3, "3.2", "remove 5", "table3_remove_5.yaml", 54.69, 57.81, 81.39, verified="paper"),
    Row(3, "3.3", "remove 4,5", "table3_remove_4_5.yaml", 58.53, 58.73, 81.86, verified="paper"),
    Row(3, "3.4", "remove 4,5, decrease L2", "table3_remove_4_5_wd_0.001.yaml", 54.98, 56.73, 80.95, verified="paper"),
    Row(3, "3.5", "remove 3,4", "table3_remove_3_4.yaml", 61.30, 59.67, 82.36, verified="config"),
    Row(3, "3.6", "remove 3,4, no fusing (MobileViT-Tiny)", "table3_remove_3_4_no_fusion.yaml", 60.67, 60.11, 82.49,
        "817k", verified="config"),
    Row(3, "3.7", "remove 3,4, use residual", "table3_remove_3_4_residual.yaml", 59.98, 59.76, 82.00,
        verified="config"),
    Row(3, "3.8", "remove 3,4, no fusing, cutout", "table3_remove_3_4_no_fusion_cutout.yaml", 58.29, 59.63, 82.50,
        verified="config"),
    Row(4, "A", "ResNet-18 base, cosine", "table2_resnet18.yaml", 53.84, 54.37, 78.26, "11.3M", verified="log"),
    Row(4, "B", "ResNet-18 no VBS, cosine", "table4_resnet18_no_vbs.yaml", 54.97, 56.74, 79.70, "11.3M",
        verified="log"),
    Row(4, "C", "ResNet-18 no VBS, cosine, augment tiny", "table4_resnet18_no_vbs_augment_tiny.yaml", 44.80, 51.07,
        77.00, "11.3M", verified="log"),
    Row(4, "D", "ResNet-18 no VBS, div-by-ten", "table4_resnet18_no_vbs_div_by_ten.yaml", 54.56, 55.30, 78.37,
        "11.3M", verified="log"),
    Row(4, "E", "ResNet-18 no VBS, div-by-ten, augment tiny", "table4_resnet18_no_vbs_div_by_ten_augment_tiny.yaml",
        43.13, 49.78, 77.07, "11.3M", verified="log"),
    Row(4, "F", "ResNet-50 base, cosine", "table2_resnet50.yaml", 54.61, 55.70, 80.18, "23.9M", verified="log"),
    Row(4, "G", "ResNet-50 no VBS, cosine", "table4_resnet50_no_vbs.yaml", 58.51, 60.19, 81.93, "23.9M",
        verified="log"),
    Row(4, "H", "ResNet-50 no VBS, cosine, augment tiny", "table4_resnet50_no_vbs_augment_tiny.yaml", 47.67, 54.59,
        79.11, "23.9M", verified="log"),
    Row(4, "I", "ResNet-50 no VBS, cosine, weight decay 4e-5", "table4_resnet50_no_vbs_wd_4e-5.yaml", 55.89, 57.22,
        80.78, "23.9M", verified="log"),
    Row(4, "J", "ResNet-50 no VBS, div-by-ten", "table4_resnet50_no_vbs_div_by_ten.yaml", 53.54, 53.89, 78.41,
        "23.9M", verified="log"),
    Row(4, "K", "ResNet-50 no VBS, div-by-ten, augment tiny", "table4_resnet50_no_vbs_div_by_ten_augment_tiny.yaml",
        47.27, 51.70, 78.30, "23.9M", verified="log"),
    # Not in the paper's table: the authors' cyclic run, which the paper mentions without figures.
    Row(4, "L", "ResNet-18 base, cyclic (extra row)", "table4_resnet18_cyclic.yaml", verified="log"),
]

FOOTNOTES = (
    "Cells read measured / paper. Measured figures are the model's own metrics (not the EMA's) at the "
    "epoch with the best val top-1; train top-1 is the training accuracy logged for that epoch.",
)

# Notes that belong under one table only.
TABLE_NOTES: Dict[int, Tuple[str, ...]] = {
    1: ("The paper's # params are the 1000-class (ImageNet) counts of these models; with TinyImageNet's "
        "200 classes they have 5,065,832 / 2,009,848 / 1,015,224.",),
    4: ("Row L is not in the paper's table: the authors' cyclic run (the paper mentions cyclic schedules "
        "without figures).",),
}


# ----------------------------------------------------------------------------- registry helpers
def config_path(row: Row) -> str:
    """Absolute path of the row's YAML file."""
    return os.path.join(PAPER_CONFIGS, row.config)


def run_label(row: Row) -> str:
    """The run folder name: the config's stem, so rows sharing a config share a run."""
    return os.path.splitext(row.config)[0]


def title(table: int) -> str:
    return TITLES.get(table, f"Table {table}")


def select_rows(tables: Optional[Sequence[int]] = None, keys: Optional[Sequence[str]] = None) -> List[Row]:
    """Rows of the given tables whose key or config stem is among `keys` (all when None)."""
    empty = sorted(set(tables or ()) - {r.table for r in ROWS})
    if empty:
        raise ValueError(f"no rows in table(s) {', '.join(map(str, empty))}; tables: "
                         f"{', '.join(map(str, sorted({r.table for r in ROWS})))}")
    rows = [r for r in ROWS if not tables or r.table in tables]
    if not keys:
        return rows
    wanted = {k.lower() for k in keys}
    chosen = [r for r in rows if r.key.lower() in wanted or run_label(r).lower() in wanted]
    unknown = wanted - {r.key.lower() for r in chosen} - {run_label(r).lower() for r in chosen}
    if unknown:
        known = ", ".join(r.key for r in rows)
        raise ValueError(f"unknown row(s) {', '.join(sorted(unknown))}; rows here: {known}")
    return chosen


# ----------------------------------------------------------------------------- run folders
# (read through engine.run_folder: read_metrics, read_summary, best_epoch)
def count_params(config_file: str, num_classes: int = NUM_CLASSES) -> Optional[int]:
    """Parameters of the model a config file builds for `num_classes` classes (None when the
    model code is unavailable). Works on a row's YAML and on a run folder's config.yaml alike.
    """
    try:
        from cvnets import build_model  # imported lazily: torch is slow to load and --list needs none of it
    except ImportError:
        return None
    cfg = load_config(["--common.config-file", config_file])
    model = build_model(cfg.model, num_classes)  # model.num_classes, when set, wins
    return sum(p.numel() for p in model.parameters())


def dataset_of_run(run_dir: str, summary: Dict[str, Any]) -> Tuple[Optional[int], Optional[bool]]:
    """(classes, generated data?) of the dataset a run trained on; None where nothing says.

    summary.json's num_classes is what the engine saw; without it the run's config.yaml tells
    (dataset.fake.enable writes the generated sample data, model.num_classes overrides).
    """
    saved = os.path.join(run_dir, "config.yaml")
    try:
        cfg = load_config(["--common.config-file", saved]) if os.path.isfile(saved) else None
    except ConfigError:  # a run folder of an older version; its summary may still say
        cfg = None
    generated = cfg.dataset.fake.enable if cfg is not None else None
    if summary.get("num_classes") is not None:
        return int(summary["num_classes"]), generated
    if cfg is None:
        return None, None
    if cfg.model.num_classes is not None:
        return cfg.model.num_classes, generated
    return (cfg.dataset.fake.classes if generated else NUM_CLASSES), generated


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Result:
    """What one run folder says about a row; all None for a row not yet run."""

    status: str
    best_epoch: Optional[int] = None
    train_top1: Optional[float] = None
    val_top1: Optional[float] = None
    val_top5: Optional[float] = None
    params: Optional[int] = None
    num_classes: Optional[int] = None  # of the dataset the run trained on
    generated_data: Optional[bool] = None  # the generated sample data (dataset.fake), not TinyImageNet


def collect(row: Row, results_dir: str) -> Result:
    """Read the row's run folder under `results_dir`."""
    run_dir = os.path.join(results_dir, run_label(row))
    metrics = read_metrics(run_dir)
    best = best_epoch(metrics)
    if best is None:
        return Result("pending")
    summary = read_summary(run_dir)
    num_classes, generated = dataset_of_run(run_dir, summary)
    return Result(
        status=_status(summary, metrics[-1].get("epoch")),
        best_epoch=best.get("epoch"),
        train_top1=best.get("train_top1"),
        val_top1=best.get("val_top1"),
        val_top5=best.get("val_top5"),
        params=summary.get("params") or _params_of_run(run_dir, row, num_classes or NUM_CLASSES),
        num_classes=num_classes,
        generated_data=generated,
    )


def _status(summary: Dict[str, Any], last_epoch: Optional[int]) -> str:
    """'done', or 'partial N/M' for a run that is still going or was interrupted."""
    if summary.get("finished"):
        return "done"
    done = summary.get("epochs_done", last_epoch)
    return f"partial {done}/{summary.get('max_epochs', '?')}"


def _params_of_run(run_dir: str, row: Row, num_classes: int) -> Optional[int]:
    saved = os.path.join(run_dir, "config.yaml")
    return count_params(saved if os.path.isfile(saved) else config_path(row), num_classes)


# ----------------------------------------------------------------------------- rendering
def _num(value: Optional[float]) -> str:
    return MISSING if value is None else f"{value:.2f}"


def _count(value: Optional[int]) -> str:
    return MISSING if value is None else f"{value:,}"


def _markdown(header: Sequence[str], lines: Iterable[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


def _by_table(rows: Sequence[Row]) -> Dict[int, List[Row]]:
    tables: Dict[int, List[Row]] = {}
    for row in rows:
        tables.setdefault(row.table, []).append(row)
    return tables


def render_results(rows: Sequence[Row], results: Dict[Row, Result]) -> str:
    """Markdown tables of measured / paper figures, one per paper table, with footnotes."""
    header = ["#", "experiment", "status", "best epoch", "train top-1", "val top-1", "val top-5", "params"]
    parts = []
    for table, members in _by_table(rows).items():
        lines = [_result_cells(row, results[row]) for row in members]
        notes = [*TABLE_NOTES.get(table, ()), *_dataset_notes(members, results)]
        parts.append(f"### {title(table)}\n\n{_markdown(header, lines)}" + "".join(f"\n\n{note}" for note in notes))
    parts.append("Notes:\n" + "\n".join(f"- {note}" for note in FOOTNOTES))
    return "\n\n".join(parts) + "\n"


def _dataset_notes(rows: Sequence[Row], results: Dict[Row, Result]) -> List[str]:
    """What the measured parameter counts of this table were built for, read from the runs."""
    groups: Dict[str, List[str]] = {}
    for row in rows:
        res = results[row]
        if res.params is None:
            continue
        if res.num_classes is None:
            what = "classes unknown (the run folder does not say)"
        elif res.generated_data:
            what = f"{res.num_classes} classes of generated sample data"
        elif res.num_classes == NUM_CLASSES and res.generated_data is False:
            what = f"{res.num_classes} classes (TinyImageNet)"
        else:
            what = f"{res.num_classes} classes"
        groups.setdefault(what, []).append(row.key)
    if not groups:
        return []
    if len(groups) == 1:
        return [f"Measured parameter counts: the model each run built, for {next(iter(groups))}."]
    parts = "; ".join(f"rows {', '.join(keys)}: {what}" for what, keys in groups.items())
    return [f"Measured parameter counts: the model each run built ({parts})."]


def _result_cells(row: Row, res: Result) -> List[str]:
    return [
        row.key,
        row.experiment,
        res.status,
        MISSING if res.best_epoch is None else str(res.best_epoch),
        f"{_num(res.train_top1)} / {_num(row.train_top1)}",
        f"{_num(res.val_top1)} / {_num(row.val_top1)}",
        f"{_num(res.val_top5)} / {_num(row.val_top5)}",
        f"{_count(res.params)} / {row.params or MISSING}",
    ]


def render_list(rows: Sequence[Row]) -> str:
    """Markdown listing of the registry: each row, its config, what its settings were checked
    against and the paper's figures."""
    header = ["#", "table", "experiment", "config", "settings verified against", "train top-1", "val top-1",
              "val top-5", "params"]
    lines = [
        [r.key, str(r.table), r.experiment, os.path.relpath(config_path(r), ROOT), VERIFIED[r.verified],
         _num(r.train_top1), _num(r.val_top1), _num(r.val_top5), r.params or MISSING]
        for r in rows
    ]
    notes = [
        f"{len(rows)} rows; figures are the paper's (its Table 1 # params are 1000-class counts).",
        "Settings verified against: every setting compared with the authors' training log or config "
        "(tests/test_paper_configs.py); rows 3.5, 3.7 and 3.8 are their MobileViT-Tiny config plus the row's "
        "one stated change; paper text only: no run of theirs survives.",
    ]
    return _markdown(header, lines) + "".join(f"\n\n{note}" for note in notes) + "\n"


CSV_FIELDS = ["table", "row", "experiment", "config", "status", "best_epoch", "train_top1", "val_top1",
              "val_top5", "params", "paper_train_top1", "paper_val_top1", "paper_val_top5", "paper_params"]


def write_csv(path: str, rows: Sequence[Row], results: Dict[Row, Result]) -> None:
    """One CSV line per row, measured and paper figures in separate columns (blank = not run)."""
    with atomic_open(path, "w") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        for row in rows:
            res = results[row]
            writer.writerow([
                row.table, row.key, row.experiment, os.path.relpath(config_path(row), ROOT), res.status,
                res.best_epoch, res.train_top1, res.val_top1, res.val_top5, res.params,
                row.train_top1, row.val_top1, row.val_top5, row.params,
            ])


# ----------------------------------------------------------------------------- training
def train_argv(row: Row, results_dir: str, overrides: Sequence[str]) -> List[str]:
    """main_train arguments for one row; the user's overrides come last so they win."""
    return [
        "--common.config-file", config_path(row),
        "--common.results-loc", results_dir,
        "--common.run-label", run_label(row),
        "--common.resume", "auto",
        *overrides,
    ]


def run_specs(rows: Sequence[Row], results_dir: str, overrides: Sequence[str]) -> List[RunSpec]:
    """One run per config (rows sharing a config share a run), named after its first row."""
    specs, seen = [], set()
    for row in rows:
        label = run_label(row)
        if label not in seen:
            seen.add(label)
            specs.append(RunSpec(os.path.join(results_dir, label), tuple(train_argv(row, results_dir, overrides)),
                                 f"[{row.key}] {label}"))
    return specs


def check_runs(specs: Sequence[RunSpec]) -> List[str]:
    """One line per run whose config (with the overrides) does not load or does not pass the
    checks main_train runs first, so that nothing starts before every run is known to be valid."""
    from engine.build import check_config  # imports torch: only when about to train

    errors = []
    for spec in specs:
        try:
            check_config(load_config(spec.args))
        except ConfigError as e:
            errors.append(f"{spec.title}: {e}")
    return errors


def run_rows(rows: Sequence[Row], results_dir: str, overrides: Sequence[str], launcher: Any = None,
             log: Callable[[str], None] = print) -> int:
    """Train the rows' runs, each in its own process (finished runs are skipped, the others resumed);
    returns the launcher's exit status."""
    todo = launchers.pending_runs(run_specs(rows, results_dir, overrides), log)
    return (launcher or launchers.LocalLauncher(log=log)).launch(todo)


# ----------------------------------------------------------------------------- command line
def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="paper_tables.py", allow_abbrev=False,
        description="List, train or tabulate the paper's table rows, or list their runs' states. Other "
        "--section.key VALUE flags are passed to training as config overrides (with --run).",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--list", action="store_true", help="print every row, its config and the paper's figures")
    mode.add_argument("--run", action="store_true", help="train the selected rows, then print the tables")
    mode.add_argument("--collect", metavar="RESULTS_DIR", help="print the tables from the run folders in RESULTS_DIR")
    mode.add_argument("--print-config", action="store_true",
                      help="print the resolved config (with the overrides) of every selected run")
    mode.add_argument("--status", nargs="?", const="", metavar="RESULTS_DIR",
                      help="list the selected rows' runs: pending, queued, running, finished, failed, "
                      "interrupted or preempted and requeued, with their SLURM job (default RESULTS_DIR: --results)")
    parser.add_argument("--table", type=int, nargs="+", metavar="N", help="only these tables (1-4)")
    parser.add_argument("--rows", nargs="+", metavar="ROW", help="only these rows (key like 3.6 or K, or config stem)")
    parser.add_argument("--results", default=DEFAULT_RESULTS, help=f"run folders' parent for --run ({DEFAULT_RESULTS})")
    parser.add_argument("--csv", metavar="PATH", help="also write the measured tables as CSV")
    launchers.add_arguments(parser)
    args, overrides = parser.parse_known_args(argv)
    if overrides and not (args.run or args.print_config):
        parser.error(f"config overrides ({' '.join(overrides)}) only apply with --run or --print-config")
    launchers.check_arguments(parser, args, overrides, running=args.run)
    try:
        parse_flags(overrides)  # rejects stray words early; the configs are checked before anything starts
    except ConfigError as e:
        parser.error(str(e))
    args.overrides = overrides
    return args


def main(argv: Optional[Sequence[str]] = None, launcher: Any = None) -> int:
    args = parse_args(argv)
    try:
        rows = select_rows(args.table, args.rows)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.list:
        print(render_list(rows), end="")
        return 0
    if args.print_config:
        specs = run_specs(rows, os.path.abspath(args.results), args.overrides)
        errors = check_runs(specs)
        for line in errors:
            print(f"error: {line}", file=sys.stderr)
        if errors:
            return 2
        for spec in specs:
            print(f"# {spec.title}\n{to_yaml(load_config(spec.args))}")
        return 0
    if args.status is not None:
        print("\n".join(launchers.status_lines(run_specs(rows, args.status or args.results, []))))
        return 0
    results_dir = args.collect or os.path.abspath(args.results)  # absolute: SLURM jobs may start elsewhere
    if args.collect and not os.path.isdir(results_dir):
        print(f"error: results folder not found: {results_dir}", file=sys.stderr)
        return 2
    status = 0
    if args.run:
        errors = check_runs(run_specs(rows, results_dir, args.overrides))
        for line in errors:
            print(f"error: {line}", file=sys.stderr)
        if errors:
            print(f"error: {len(errors)} run(s) have an invalid config; nothing was started", file=sys.stderr)
            return 2
        try:
            status = run_rows(rows, results_dir, args.overrides, launcher or launchers.launcher_from_args(args))
        except launchers.LaunchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.launcher == "slurm" and not args.wait:
            return status  # queued: the tables would only say pending
    results = {row: collect(row, results_dir) for row in rows}
    print(render_results(rows, results), end="")
    if args.csv:
        write_csv(args.csv, rows, results)
    return status


if __name__ == "__main__":
    sys.exit(main())
