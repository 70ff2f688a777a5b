"""Run a grid of experiments (an ablation) from one base config, and tabulate the results.

    python -m tools.sweep --common.config-file config/mobilevit_tiny.yaml \\
        --grid optim.weight_decay=0.01,0.001 model.mobilevit.remove_layers=[3,4],[4,5] \\
        [--grid-file grid.yaml] [--name NAME] [--results results/sweeps] [--section.key VALUE ...] \\
        [--launcher local|slurm] [--parallel N] [--slurm.partition P ...] [--csv table.csv] [--dry-run]
    python -m tools.sweep --collect results/sweeps/NAME [--csv table.csv]
    python -m tools.sweep --status results/sweeps/NAME

Each grid point is one run with the base config, the other flags and the point's values, in
<results>/<name>/<label>/, the label naming the swept values (`weight_decay=0.001,remove_layers=3-4`).
Every point is resolved and checked before anything starts; a bad one is reported in one line
and nothing runs (exit status 2). The resolved config of each point is written to
<results>/<name>/configs/<label>.yaml, and the run is exactly
`python main_train.py --common.config-file <results>/<name>/configs/<label>.yaml`, so each
point can be rerun on its own. Running the same command again skips finished points and
resumes the others. At the end, and with --collect, one table: a row per point, the swept
values as columns, best val top-1/top-5 with its epoch and train top-1, parameters, status.

A grid file is a YAML mapping of keys to lists of values (nested sections or dotted keys):

    optim: {weight_decay: [0.01, 0.001]}
    model.mobilevit.remove_layers: [[3, 4], [4, 5]]

On the command line, values are split at commas outside brackets, so list values need
brackets: `model.mobilevit.remove_layers=[3,4],[4,5]` is two points.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from engine import experiments, launchers
from engine.experiments import PLACEMENT_KEYS, RunSpec
from options.config import ConfigError, override, parse_flags, read_yaml, to_dict, to_yaml
from options.schema import Config
from utils.files import atomic_write_text, write_json

DEFAULT_RESULTS = os.path.join("results", "sweeps")
SWEEP_FILE = "sweep.json"
CONFIGS = "configs"
# The keys the sweep sets for every point, refused in a grid and as flags (but the first, the base
# config): each point's config file, and where its run goes, <results>/<name>/<label>/.
RESERVED = ("common.config_file", *PLACEMENT_KEYS)
MAX_LABEL = 120  # characters; longer labels are cut and end in a hash (file names stop at 255 bytes)


class SweepError(ValueError):
    """A user error in the sweep's definition or folder; the message is one line."""


# ----------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class Axis:
    """One swept key and its values, as flag text (`1e-3`, `[3, 4]`, `null`)."""

    key: str  # dotted, with underscores
    values: Tuple[str, ...]


@dataclass(frozen=True)
class Point:
    """One grid point: its run label and its value (flag text) of each axis."""

    label: str
    values: Tuple[Tuple[str, str], ...]  # (key, value) per axis, in grid order

    def flags(self) -> List[str]:
        return [arg for key, value in self.values for arg in (f"--{key}", value)]


def split_values(text: str) -> List[str]:
    """`1e-3,2e-3` -> ['1e-3', '2e-3']; `[3,4],[4,5]` -> ['[3,4]', '[4,5]'] (commas inside brackets stay)."""
    values, depth, current = [], 0, []
    for char in text:
        if char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
            if depth < 0:
                raise SweepError(f"unbalanced brackets in {text!r}")
        if char == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    if depth:
        raise SweepError(f"unbalanced brackets in {text!r}")
    values.append("".join(current).strip())
    return values


def _key(raw: str, where: str) -> str:
    key = raw.strip().lstrip("-").replace("-", "_")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+", key):
        raise SweepError(f"{where}: {raw!r} is not a config key like optim.weight_decay")
    return key


def parse_grid(tokens: Sequence[str]) -> List[Axis]:
    """Axes from `KEY=V1,V2,...` words."""
    axes = []
    for token in tokens:
        if "=" not in token:
            raise SweepError(f"--grid {token!r}: write KEY=VALUE1,VALUE2 (e.g. optim.weight_decay=0.01,0.001)")
        raw_key, text = token.split("=", 1)
        key = _key(raw_key, f"--grid {token!r}")
        values = split_values(text)
        if any(v == "" for v in values):
            raise SweepError(f"--grid {token!r}: empty value; separate values with single commas")
        axes.append(Axis(key, tuple(values)))
    return axes


def _flag_text(value: Any) -> str:
    """A YAML value as the text a flag would carry (strings as they are, the rest as JSON, which YAML reads)."""
    return value if isinstance(value, str) else json.dumps(value)


def read_grid_file(path: str) -> List[Axis]:
    """Axes from a YAML mapping of keys (nested or dotted) to lists of values, read as strictly as
    a config file (duplicate keys, anchors and aliases are refused: ConfigError)."""
    data = read_yaml(path)
    if not isinstance(data, Mapping) or not data:
        raise SweepError(f"{path}: a grid file is a mapping of config keys to lists of values")
    axes: List[Axis] = []

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for name, value in node.items():
            key = f"{prefix}{name}"
            if isinstance(value, Mapping):
                walk(value, key + ".")
            elif isinstance(value, list) and value:
                odd = next((v for v in value if not _plain(v)), None)
                if odd is not None:  # YAML reads 2024-01-01 as a date, which no config key takes
                    raise SweepError(f"{path}: {key}: {odd!r} is a {type(odd).__name__}, not a config value; "
                                     "quote it if it is text")
                axes.append(Axis(_key(key, path), tuple(_flag_text(v) for v in value)))
            else:
                raise SweepError(f"{path}: {key} needs a non-empty list of values, got {value!r}")

    walk(data, "")
    return axes


def _plain(value: Any) -> bool:
    """Whether a YAML value is one a config key can take (numbers, text, booleans, null, lists
    and mappings of those), not a date or timestamp."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return value is None or isinstance(value, (bool, int, float, str))


def short_names(keys: Sequence[str]) -> Dict[str, str]:
    """The shortest tail of each dotted key that no other key shares (`weight_decay`, `cosine.max_lr`)."""
    names = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            tail = ".".join(parts[-n:])
            if not any(other != key and (other == tail or other.endswith("." + tail)) for other in keys):
                break
        names[key] = tail
    return names


def value_label(text: str, index: int) -> str:
    """A value as a file-name-safe label part: `[3, 4]` -> `3-4`; long or structured values -> `v<index>`."""
    t = text.strip()
    if t.startswith("[") and t.endswith("]") and "{" not in t:
        t = "-".join(part.strip() for part in t[1:-1].split(",") if part.strip()) or "empty"
    if len(t) > 24 or "{" in t:
        return f"v{index + 1}"
    return re.sub(r"[^A-Za-z0-9._+-]", "_", t) or "empty"


def expand(axes: Sequence[Axis]) -> List[Point]:
    """Every combination of the axes' values (the first axis varies slowest), each with its label."""
    keys = [a.key for a in axes]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise SweepError(f"{', '.join(dupes)} swept twice; give each key one value list")
    names = short_names(keys)
    points, seen = [], {}
    for combo in itertools.product(*(list(enumerate(a.values)) for a in axes)):
        label = ",".join(f"{names[a.key]}={value_label(v, i)}" for a, (i, v) in zip(axes, combo))
        if len(label) > MAX_LABEL:
            label = label[:MAX_LABEL - 9] + "-" + hashlib.sha1(label.encode()).hexdigest()[:8]
        values = tuple((a.key, v) for a, (_, v) in zip(axes, combo))
        if label in seen:
            raise SweepError(f"points {dict(seen[label])} and {dict(values)} get the same run label {label!r}")
        seen[label] = values
        points.append(Point(label, values))
    return points


# ----------------------------------------------------------------------------- resolving and checking
def point_argv(base_args: Sequence[str], point: Point, sweep_dir: str) -> List[str]:
    """The config flags of a point: the user's, then the point's values, then where the run goes."""
    return [*base_args, *point.flags(), *experiments.placement_args(os.path.abspath(sweep_dir), point.label)]


def check_keys(axes: Sequence[Axis], base_args: Sequence[str]) -> None:
    """Keys the sweep owns, and keys both swept and set by a flag, are refused."""
    flags, _ = parse_flags(base_args, once=True)
    for axis in axes:
        if axis.key in RESERVED:
            raise SweepError(f"{axis.key} cannot be swept: the sweep sets it for every point")
        if axis.key in flags:
            raise SweepError(f"{axis.key} is both swept (--grid) and set by {flags[axis.key][0]}; keep one")
    for key in RESERVED[1:]:
        if key in flags:
            raise SweepError(f"{flags[key][0]} is set by the sweep for every point (use --results and --name)")


def resolve_points(base_args: Sequence[str], points: Sequence[Point],
                   sweep_dir: str) -> Tuple[Dict[str, Config], List[str]]:
    """Each point's resolved config, and one line per point that does not pass the checks
    main_train runs first (experiments.check_runs) or resolves to the same config as another."""
    specs = [RunSpec(os.path.join(sweep_dir, p.label), tuple(point_argv(base_args, p, sweep_dir)), f"point {p.label}")
             for p in points]
    configs, errors = experiments.check_runs(specs)
    seen: Dict[str, str] = {}
    for label, cfg in configs.items():
        data = to_dict(cfg)
        data["common"]["run_label"] = None
        key = json.dumps(data, sort_keys=True)
        if key in seen:
            errors.append(f"point {label}: resolves to the same config as point {seen[key]}")
        seen.setdefault(key, label)
    return configs, errors


# ----------------------------------------------------------------------------- the sweep folder
@dataclass(frozen=True)
class Sweep:
    """A sweep folder: its definition (sweep.json) and its points."""

    folder: str
    base_config: str
    axes: Tuple[Axis, ...]
    points: Tuple[Point, ...]

    def config_path(self, point: Point) -> str:
        return os.path.join(os.path.abspath(self.folder), CONFIGS, f"{point.label}.yaml")

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.folder))

    def spec(self, point: Point) -> RunSpec:
        return RunSpec(os.path.join(self.folder, point.label), ("--common.config-file", self.config_path(point)),
                       group=self.name)

    def specs(self) -> List[RunSpec]:
        return [self.spec(p) for p in self.points]


def load_sweep(folder: str) -> Sweep:
    """The sweep in `folder`, from its sweep.json."""
    path = os.path.join(folder, SWEEP_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        axes = tuple(Axis(a["key"], tuple(a["values"])) for a in data["grid"])
        points = tuple(Point(p["label"], tuple((k, p["values"][k]) for k in (a.key for a in axes)))
                       for p in data["points"])
        return Sweep(folder, data["base_config"], axes, points)
    except FileNotFoundError:
        raise SweepError(f"{folder} is not a sweep folder (no {SWEEP_FILE}); give the folder a sweep wrote") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise SweepError(f"{path} is unreadable or not written by tools/sweep.py") from None


def write_sweep(sweep: Sweep, configs: Mapping[str, Config], base_args: Sequence[str]) -> None:
    """Write sweep.json and each point's config, refusing a folder that holds another sweep.

    A finished point keeps its config file: it is the record of what ran."""
    path = os.path.join(sweep.folder, SWEEP_FILE)
    grid = [{"key": a.key, "values": list(a.values)} for a in sweep.axes]
    if os.path.isfile(path):
        old = load_sweep(sweep.folder)
        if (old.base_config, old.axes) != (sweep.base_config, sweep.axes):
            raise SweepError(f"{sweep.folder} holds another sweep (base {old.base_config}, grid "
                             f"{' '.join(a.key + '=' + ','.join(a.values) for a in old.axes)}); "
                             "choose another --name, or delete the folder")
    for point in sweep.points:
        target = sweep.config_path(point)
        if os.path.isfile(target) and experiments.run_state(sweep.spec(point)).state == "finished":
            continue
        cfg = override(configs[point.label], {"common.config_file": None})  # set to the file itself when loaded
        atomic_write_text(target, f"# sweep {sweep.name}, point {point.label}\n" + to_yaml(cfg))
    write_json(path, {
        "version": 1,
        "base_config": sweep.base_config,
        "grid": grid,
        "flags": list(base_args),
        "points": [{"label": p.label, "values": dict(p.values)} for p in sweep.points],
    })


# ----------------------------------------------------------------------------- results
def report(sweep: Sweep, csv_path: Optional[str]) -> None:
    """The table (one line per point: the swept values as typed, then the results) and, with
    `csv_path`, the same as CSV with the full dotted keys as the swept columns."""
    results = {p.label: experiments.collect(sweep.spec(p)) for p in sweep.points}
    names = short_names([a.key for a in sweep.axes])
    header = [names[a.key] for a in sweep.axes] + list(experiments.RESULT_COLUMNS)
    rows = [[v for _, v in p.values] + results[p.label].cells() for p in sweep.points]
    print("\n".join(experiments.format_table(header, rows)))
    if csv_path:
        experiments.write_csv(csv_path, ["label", *(a.key for a in sweep.axes), *experiments.RESULT_FIELDS],
                              [[p.label, *(v for _, v in p.values), *results[p.label].values()] for p in sweep.points])
        print(f"wrote {csv_path}")


# ----------------------------------------------------------------------------- command line
def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.sweep", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__,
        epilog="Any other --section.key VALUE flag (main_train's, --common.config-file first of all) applies to "
        "every point.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--collect", metavar="SWEEP_DIR", help="print the table of a sweep folder and exit")
    mode.add_argument("--status", metavar="SWEEP_DIR", help="list every run of a sweep folder with its state")
    parser.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2", help="swept keys and their values")
    parser.add_argument("--grid-file", metavar="YAML", help="a YAML mapping of keys to lists of values")
    parser.add_argument("--name", help="sweep folder name (default: the base config's stem and the swept keys)")
    parser.add_argument("--results", default=DEFAULT_RESULTS, help=f"parent of sweep folders ({DEFAULT_RESULTS})")
    parser.add_argument("--csv", metavar="PATH", help="also write the table as CSV")
    parser.add_argument("--dry-run", action="store_true", help="check every point and write the configs; start nothing")
    parser.add_argument("--print-config", action="store_true",
                        help="check every point and print its resolved config; write and start nothing")
    launchers.add_launch_arguments(parser)
    args, overrides = parser.parse_known_args(argv)
    launchers.check_launch_arguments(parser, args, overrides, running=not (args.collect or args.status))
    if args.collect or args.status:
        if overrides or args.grid or args.grid_file:
            parser.error("--collect and --status take only a sweep folder (and --csv)")
    else:
        try:
            flags, switches = parse_flags(overrides)
        except ConfigError as e:
            parser.error(str(e))
        if switches:
            parser.error(f"unknown option --{switches[0]}")
        if "common.config_file" not in flags:
            parser.error("give the base config: --common.config-file BASE.yaml")
        if not args.grid and not args.grid_file:
            parser.error("give the grid: --grid KEY=V1,V2 ... or --grid-file GRID.yaml")
    args.overrides = overrides
    return args


def _sweep_name(base_config: str, axes: Sequence[Axis]) -> str:
    stem = os.path.splitext(os.path.basename(base_config))[0]
    return "-".join([stem, *short_names([a.key for a in axes]).values()])


def plan(args: argparse.Namespace) -> Tuple[Sweep, Dict[str, Config]]:
    """The sweep the command line describes, every point resolved and checked (SweepError otherwise)."""
    axes = parse_grid(args.grid) + (read_grid_file(args.grid_file) if args.grid_file else [])
    flags, _ = parse_flags(args.overrides)
    base_config = os.path.abspath(flags["common.config_file"][1])
    check_keys(axes, args.overrides)
    points = expand(axes)
    if os.path.exists(args.results) and not os.path.isdir(args.results):
        raise SweepError(f"--results {args.results} is a file; give a folder for the sweep folders")
    folder = os.path.abspath(os.path.join(args.results, args.name or _sweep_name(base_config, axes)))
    configs, errors = resolve_points(args.overrides, points, folder)
    if errors:
        raise _PointErrors(errors)
    return Sweep(folder, base_config, tuple(axes), tuple(points)), configs


class _PointErrors(SweepError):
    def __init__(self, lines: List[str]) -> None:
        super().__init__(f"{len(lines)} bad point(s)")
        self.lines = lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        if args.collect or args.status:
            sweep = load_sweep(args.collect or args.status)
            if args.status:
                print("\n".join(experiments.status_lines(sweep.specs())))
            else:
                report(sweep, args.csv)
            return 0
        sweep, configs = plan(args)
        if args.print_config:
            for label, cfg in configs.items():
                print(f"# point {label}\n{to_yaml(cfg)}")
            return 0
        write_sweep(sweep, configs, args.overrides)
    except _PointErrors as e:
        for line in e.lines:
            print(f"error: {line}", file=sys.stderr)
        print(f"error: {len(e.lines)} of the points are invalid; nothing was started", file=sys.stderr)
        return 2
    except (SweepError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"sweep {sweep.folder}: {len(sweep.points)} point(s), configs in {os.path.join(sweep.folder, CONFIGS)}")
    if args.dry_run:
        for point in sweep.points:
            print(f"  python main_train.py --common.config-file {sweep.config_path(point)}")
        return 0
    launcher = launchers.launcher_from_args(args)
    try:
        status = experiments.launch(sweep.specs(), launcher)
    except launchers.LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.launcher == "local" or args.wait:
        report(sweep, args.csv)
    return status


if __name__ == "__main__":
    sys.exit(main())
