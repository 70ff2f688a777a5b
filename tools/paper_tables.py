"""Reproduce the paper's Tables 1-4: list the rows, train them, or tabulate finished runs.

    python tools/paper_tables.py --list
    python tools/paper_tables.py --run --table 3 [--rows 3.5 3.6] [--results DIR] [--section.key VALUE ...]
        [--launcher local|slurm] [--parallel N] [--slurm.partition P --slurm.time 4:00:00 ...]
    python tools/paper_tables.py --collect results/paper [--csv tables.csv]
    python tools/paper_tables.py --status [results/paper]

The rows are data, config/paper/tables.json: each row names one YAML file under config/paper/
and trains into `<results>/<config stem>/`, so rows that share a file (Table 4 A and F are the
Table 2 baselines) share a run. A table added to that file (rows without the paper's figures
show them as –) is listed, trained and tabulated like the paper's; config/beyond/ladder.json adds
Table 5, the ladder beyond the paper, whose configs live beside it. Measured figures come from
the run folders alone (metrics.jsonl, summary.json); a row without one shows as pending.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from engine import experiments, launchers
from engine.experiments import MISSING, NUM_CLASSES, Result, RunSpec, fmt_count, fmt_num, markdown_table
from options.config import ConfigError, parse_flags, read_yaml, to_yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PAPER_CONFIGS = os.path.join(ROOT, "config", "paper")
TABLES_FILE = os.path.join(PAPER_CONFIGS, "tables.json")
# Tables beyond the paper: the same format, their configs beside them.
TABLES_FILES = (TABLES_FILE, os.path.join(ROOT, "config", "beyond", "ladder.json"))
DEFAULT_RESULTS = os.path.join("results", "paper")


@dataclass(frozen=True)
class Row:
    """One row of a table: where its config lives and what the paper reports."""

    table: int
    key: str  # unique over all tables: "1.1" ... "3.8", and the paper's letters A-L for Table 4
    experiment: str
    config: str  # file name under config/paper/
    train_top1: Optional[float] = None  # the paper's figures; None for rows the paper lacks
    val_top1: Optional[float] = None
    val_top5: Optional[float] = None
    params: Optional[str] = None  # as the paper prints it (Table 1 gives 1000-class counts)
    verified: str = "none"  # what the row's settings were checked against: a key of VERIFIED
    folder: str = field(default=PAPER_CONFIGS, compare=False)  # where `config` lives: its tables file's folder


VERIFIED = {"log": "authors' log", "config": "authors' config", "paper": "paper text only",
            "none": "– (not the paper's)"}
PAPER_FIGURES = ("train_top1", "val_top1", "val_top5", "params")


def load_tables(path: str) -> Tuple[List[Row], Dict[int, str], Dict[int, Tuple[str, ...]], Tuple[str, ...]]:
    """(rows, {table: title}, {table: notes}, footnotes) of a tables file (read as strictly as a
    config: a duplicate key is an error); ValueError names what is wrong."""
    data = read_yaml(path)  # JSON is YAML
    rows: List[Row] = []
    titles: Dict[int, str] = {}
    notes: Dict[int, Tuple[str, ...]] = {}
    try:
        for table in data["tables"]:
            number = int(table["table"])
            titles[number], notes[number] = table["title"], tuple(table.get("notes", ()))
            for entry in table["rows"]:
                paper = entry.get("paper", {})
                unknown = set(paper) - set(PAPER_FIGURES)
                if unknown or entry.get("verified", "none") not in VERIFIED:
                    raise ValueError(f"row {entry.get('key')}: paper figures are {', '.join(PAPER_FIGURES)}; "
                                     f"verified is one of {', '.join(VERIFIED)}")
                rows.append(Row(number, **{k: v for k, v in entry.items() if k != "paper"}, **paper,
                                folder=os.path.dirname(os.path.abspath(path))))
        footnotes = tuple(data.get("footnotes", ()))
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a tables file ({type(e).__name__}: {e})") from None
    keys = [r.key for r in rows]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{path}: row keys are used twice: {sorted({k for k in keys if keys.count(k) > 1})}")
    return rows, titles, notes, footnotes


def load_all(paths: Sequence[str]) -> Tuple[List[Row], Dict[int, str], Dict[int, Tuple[str, ...]], Tuple[str, ...]]:
    """The tables of several files as one set; a table number or row key used twice is a ValueError."""
    rows: List[Row] = []
    titles: Dict[int, str] = {}
    notes: Dict[int, Tuple[str, ...]] = {}
    footnotes: Dict[str, None] = {}
    for path in paths:
        more, more_titles, more_notes, more_footnotes = load_tables(path)
        clash = sorted(set(titles) & set(more_titles)) or sorted({r.key for r in rows} & {r.key for r in more})
        if clash:
            raise ValueError(f"{path}: table numbers or row keys {clash} are used by another tables file")
        rows += more
        titles.update(more_titles)
        notes.update(more_notes)
        footnotes.update(dict.fromkeys(more_footnotes))
    return rows, titles, notes, tuple(footnotes)


ROWS, TITLES, TABLE_NOTES, FOOTNOTES = load_all(TABLES_FILES)


# ----------------------------------------------------------------------------- rows and their runs
def config_path(row: Row) -> str:
    """Absolute path of the row's YAML file."""
    return os.path.join(row.folder, row.config)


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


def row_spec(row: Row, results_dir: str, overrides: Sequence[str] = ()) -> RunSpec:
    """The row's run; the user's overrides come last so they win."""
    label = run_label(row)
    args = ("--common.config-file", config_path(row), *experiments.placement_args(results_dir, label), *overrides)
    return RunSpec(os.path.join(results_dir, label), args, f"[{row.key}] {label}",
                   group=os.path.basename(os.path.normpath(results_dir)))


def run_specs(rows: Sequence[Row], results_dir: str, overrides: Sequence[str]) -> List[RunSpec]:
    """One run per config (rows sharing a config share a run), named after its first row."""
    specs: Dict[str, RunSpec] = {}
    for row in rows:
        specs.setdefault(run_label(row), row_spec(row, results_dir, overrides))
    return list(specs.values())


def collect(row: Row, results_dir: str) -> Result:
    """What the row's run folder under `results_dir` says."""
    return experiments.collect(row_spec(row, results_dir))


# ----------------------------------------------------------------------------- rendering
def render_results(rows: Sequence[Row], results: Mapping[Row, Result]) -> str:
    """Markdown tables of measured / paper figures, one per table, with its notes and the footnotes."""
    header = ["#", "experiment", "status", "best epoch", "train top-1", "val top-1", "val top-5", "params"]
    parts = []
    for table in dict.fromkeys(r.table for r in rows):
        members = [r for r in rows if r.table == table]
        lines = [_result_cells(row, results[row]) for row in members]
        notes = [*TABLE_NOTES.get(table, ()), *_dataset_notes(members, results)]
        parts.append(f"### {title(table)}\n\n{markdown_table(header, lines)}" + "".join(f"\n\n{n}" for n in notes))
    parts.append("Notes:\n" + "\n".join(f"- {note}" for note in FOOTNOTES))
    return "\n\n".join(parts) + "\n"


def _dataset_notes(rows: Sequence[Row], results: Mapping[Row, Result]) -> List[str]:
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
        f"{fmt_num(res.train_top1)} / {fmt_num(row.train_top1)}",
        f"{fmt_num(res.val_top1)} / {fmt_num(row.val_top1)}",
        f"{fmt_num(res.val_top5)} / {fmt_num(row.val_top5)}",
        f"{fmt_count(res.params)} / {row.params or MISSING}",
    ]


def render_list(rows: Sequence[Row]) -> str:
    """Markdown listing of the rows: each row, its config, what its settings were checked against
    and the paper's figures."""
    header = ["#", "table", "experiment", "config", "settings verified against", "train top-1", "val top-1",
              "val top-5", "params"]
    lines = [
        [r.key, str(r.table), r.experiment, os.path.relpath(config_path(r), ROOT), VERIFIED[r.verified],
         fmt_num(r.train_top1), fmt_num(r.val_top1), fmt_num(r.val_top5), r.params or MISSING]
        for r in rows
    ]
    notes = [
        f"{len(rows)} rows; figures are the paper's (its Table 1 # params are 1000-class counts).",
        "Settings verified against: every setting compared with the authors' training log or config "
        "(tests/test_paper_configs.py); rows 3.5, 3.7 and 3.8 are their MobileViT-Tiny config plus the row's "
        "one stated change; paper text only: no run of theirs survives.",
    ]
    return markdown_table(header, lines) + "".join(f"\n\n{note}" for note in notes) + "\n"


CSV_FIELDS = ["table", "row", "experiment", "config", *experiments.RESULT_FIELDS,
              *(f"paper_{name}" for name in PAPER_FIGURES)]


def write_csv(path: str, rows: Sequence[Row], results: Mapping[Row, Result]) -> None:
    """One CSV line per row, measured and paper figures in separate columns (blank = not run)."""
    experiments.write_csv(path, CSV_FIELDS, [
        [row.table, row.key, row.experiment, os.path.relpath(config_path(row), ROOT), *results[row].values(),
         *(getattr(row, name) for name in PAPER_FIGURES)] for row in rows])


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
    parser.add_argument("--table", type=int, nargs="+", metavar="N",
                        help="only these tables (1-4: the paper's, 5: the ladder beyond it)")
    parser.add_argument("--rows", nargs="+", metavar="ROW", help="only these rows (key like 3.6 or K, or config stem)")
    parser.add_argument("--results", default=DEFAULT_RESULTS, help=f"run folders' parent for --run ({DEFAULT_RESULTS})")
    parser.add_argument("--csv", metavar="PATH", help="also write the measured tables as CSV")
    launchers.add_launch_arguments(parser)
    args, overrides = parser.parse_known_args(argv)
    if overrides and not (args.run or args.print_config):
        parser.error(f"config overrides ({' '.join(overrides)}) only apply with --run or --print-config")
    launchers.check_launch_arguments(parser, args, overrides, running=args.run)
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
    if args.status is not None:
        print("\n".join(experiments.status_lines(run_specs(rows, args.status or args.results, []))))
        return 0
    results_dir = args.collect or os.path.abspath(args.results)  # absolute: SLURM jobs may start elsewhere
    if args.collect and not os.path.isdir(results_dir):
        print(f"error: results folder not found: {results_dir}", file=sys.stderr)
        return 2
    status = 0
    if args.run or args.print_config:
        specs = run_specs(rows, results_dir, args.overrides)
        configs, errors = experiments.check_runs(specs)
        for line in errors:
            print(f"error: {line}", file=sys.stderr)
        if errors:
            if args.run:
                print(f"error: {len(errors)} run(s) have an invalid config; nothing was started", file=sys.stderr)
            return 2
        if args.print_config:
            for spec in specs:
                print(f"# {spec.title}\n{to_yaml(configs[spec.label])}")
            return 0
        try:
            status = experiments.launch(specs, launcher or launchers.launcher_from_args(args))
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
