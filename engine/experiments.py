"""Experiments: a list of runs -> checked -> launched -> their states -> one table.

tools/sweep.py (a grid) and tools/paper_tables.py (the paper's rows) describe each run as a
RunSpec, its run folder and the main_train.py arguments that train into it, and take the list
through the same steps:

1. check_runs: every run's config resolved and checked as main_train checks it, before any starts;
2. launch: the runs that are neither finished nor held by a live trainer nor queued as SLURM jobs
   (pending_runs), started by a launcher of engine/launchers.py: on this machine one after
   another or N at once, under torchrun, or as SLURM jobs through submitit;
3. run_state: what the run folder and the launch record say (pending, queued, running, finished,
   failed, interrupted, requeued), the one place a run's state is worked out;
4. collect: the epoch with the best val top-1 of metrics.jsonl, as a Result; format_table,
   markdown_table and write_csv (atomic) turn rows of Results into tables.

The launchers keep a record per run beside the run folders, `<results>/_launch/<label>.json`
(launcher, pid or SLURM job id, attempts, requeues, last exit status and error line), with the
trainer's output in `_launch/logs/<label>.log`. No torch at import: listings stay fast.
"""
from __future__ import annotations

import csv
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from engine.run_folder import best_epoch, is_locked, read_lock_holder, read_metrics, read_summary
from options.config import load_config, parse_flags
from options.schema import Config
from utils.files import atomic_open, read_json_object, write_json

LAUNCH = "_launch"  # launcher records, beside the run folders
MISSING = "–"  # a table cell with nothing measured yet

Log = Callable[[str], None]


# ----------------------------------------------------------------------------- runs and records
@dataclass(frozen=True)
class RunSpec:
    """One training run: its folder and the main_train.py arguments that train into it.

    `group` names the set of runs it belongs to (the sweep, the tables) and `label` (its folder
    name) the run within it: what an experiment tracker calls the group (or experiment) and the run.
    """

    run_dir: str
    args: Tuple[str, ...]
    name: str = ""  # what log lines call the run; default its folder name
    group: str = ""

    @property
    def label(self) -> str:
        return os.path.basename(os.path.normpath(self.run_dir))

    @property
    def title(self) -> str:
        return self.name or self.label

    @property
    def launch_dir(self) -> str:
        return os.path.join(os.path.dirname(os.path.abspath(self.run_dir)), LAUNCH)

    @property
    def config_file(self) -> Optional[str]:
        """The --common.config-file the run trains from (None when its arguments give none)."""
        flags, _ = parse_flags(self.args)
        given = flags.get("common.config_file")
        return given[1] if given else None


def placement(results_dir: str, label: str) -> Dict[str, str]:
    """The config keys the experiments core sets for every run it places: the run goes into
    `<results_dir>/<label>/` and continues there, and an experiment tracker files it under the
    folder's name (the sweep's, or the tables') as its group. Tools refuse them from users
    (PLACEMENT_KEYS)."""
    group = os.path.basename(os.path.normpath(results_dir)) if results_dir else ""
    return {"common.results_loc": results_dir, "common.run_label": label, "common.resume": "auto",
            "stats.wandb.group": group, "stats.mlflow.experiment": group}


PLACEMENT_KEYS = tuple(placement("", ""))


def placement_args(results_dir: str, label: str) -> List[str]:
    """placement() as main_train flags."""
    flags = placement(results_dir, label).items()
    return [arg for key, value in flags for arg in ("--" + key.replace("_", "-"), value)]


def record_path(spec: RunSpec) -> str:
    return os.path.join(spec.launch_dir, f"{spec.label}.json")


def log_path(spec: RunSpec) -> str:
    return os.path.join(spec.launch_dir, "logs", f"{spec.label}.log")


def read_record(spec: RunSpec) -> Dict[str, Any]:
    """What the launchers wrote about the run ({} when nothing yet)."""
    return read_json_object(record_path(spec))


def update_record(spec: RunSpec, **fields: Any) -> None:
    """Merge `fields` into the run's record (one writer at a time: the launcher, then its job).
    A run that starts again or finishes drops the error of an earlier attempt."""
    if fields.get("state") in ("running", "finished"):
        fields.setdefault("error", None)
    write_json(record_path(spec), {**read_record(spec), **fields, "updated": time.time()})


# ----------------------------------------------------------------------------- checking
def check_runs(specs: Sequence[RunSpec]) -> Tuple[Dict[str, Config], List[str]]:
    """Each run's resolved config (by label), and one line per run whose arguments do not load or
    do not pass the checks main_train runs (engine.build.check_config) before it touches data."""
    from engine.build import check_config  # imports torch: only when about to train

    configs, errors = {}, []
    for spec in specs:
        try:
            cfg = load_config(spec.args)
            check_config(cfg)
        except ValueError as e:
            errors.append(f"{spec.title}: {e}")
            continue
        configs[spec.label] = cfg
    return configs, errors


# ----------------------------------------------------------------------------- state of a run
ACTIVE_SLURM_STATES = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                       "COMPLETING", "RESIZING", "SUSPENDED", "PREEMPTED")


@dataclass(frozen=True)
class RunState:
    """Where a run stands: one line of a status listing, one cell of a results table."""

    state: str  # pending, queued, running, finished, failed, interrupted, requeued
    text: str  # the state with progress and detail, e.g. "failed 2/10: error: disk full ..."
    job: str = ""  # "slurm 1234_1 (RUNNING)"
    progress: str = ""  # "2/10": epochs done of the run's total, when known

    @property
    def short(self) -> str:
        return f"{self.state} {self.progress}" if self.progress and self.state != "finished" else self.state


def run_state(spec: RunSpec, queued: Optional[Mapping[str, str]] = None) -> RunState:
    """What the run folder (its lock, summary.json, metrics.jsonl) and the launch record say.

    `queued` maps SLURM job ids to their queue states (queue_states)."""
    summary, record = read_summary(spec.run_dir), read_record(spec)
    total = summary.get("max_epochs")
    done = f"{int(summary.get('epochs_done') or 0)}/{total}" if total else ""
    progress = f" {done}" if done else ""
    job_id = record.get("job_id")
    queue = (queued or {}).get(str(job_id)) if job_id else None
    job = f"{record.get('launcher', 'slurm')} {job_id}" + (f" ({queue})" if queue else "") if job_id else ""
    # SLURM counts every requeue of the job (submitit's and its own preemptions); ours only the former.
    requeues = max(int(record.get("requeues") or 0), int(record.get("slurm_restarts") or 0))
    folder = os.path.isdir(spec.run_dir)
    if folder and is_locked(spec.run_dir):
        return RunState("running", f"running{progress} ({_holder(spec.run_dir)})", job, done)
    if summary.get("state") == "finished" or summary.get("finished"):
        return RunState("finished", "finished" + progress + (f" (requeued {requeues}x)" if requeues else ""), job, done)
    if summary.get("state") == "failed":
        error = summary.get("error")
        return RunState("failed", f"failed{progress}" + (f": {error}" if error else ""), job, done)
    if record.get("state") == "failed" and record.get("error"):  # died before its folder said so
        return RunState("failed", f"failed{progress}: {record['error']}", job, done)
    if record.get("state") == "requeued" or (requeues and record.get("state") in ("queued", "running")):
        return RunState("requeued", f"preempted, requeued{progress} ({requeues}x)", job, done)
    if folder and (summary or read_metrics(spec.run_dir)):  # stopped by a signal or killed: a resume continues it
        stopped = summary.get("stopped_by")
        return RunState("interrupted", f"interrupted{progress}" + (f" ({stopped})" if stopped else ""), job, done)
    if record.get("state") == "interrupted":  # stopped before its folder said anything
        return RunState("interrupted", f"interrupted: {record.get('error')}", job)
    if record.get("state") == "queued":
        return RunState("queued", "starting" if queue == "RUNNING" else "queued", job)
    return RunState("pending", "pending", job)


def _holder(run_dir: str) -> str:
    holder = read_lock_holder(run_dir)
    return f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "lock held"


def queue_states(runs: Sequence[RunSpec]) -> Dict[str, str]:
    """{SLURM job id: state} of the runs' recorded jobs, from sacct (through submitit); {} where
    sacct or submitit is missing, e.g. away from the cluster."""
    records = [read_record(spec) for spec in runs]
    wanted = [r for r in records if r.get("launcher") == "slurm" and r.get("job_id")]
    if not wanted or shutil.which("sacct") is None:
        return {}
    try:
        from submitit.slurm.slurm import SlurmJob
    except ImportError:
        return {}
    jobs = [SlurmJob(folder=r.get("submitit_folder") or ".", job_id=str(r["job_id"])) for r in wanted]
    return {job.job_id: job.state.split()[0] for job in jobs}


def pending_runs(runs: Sequence[RunSpec], log: Log = print) -> List[RunSpec]:
    """The runs to start. Finished runs are skipped; so are runs a live trainer holds (its lock)
    and runs still queued or running as SLURM jobs, which starting again would only duplicate."""
    queued = queue_states(runs)
    todo = []
    for spec in runs:
        state = run_state(spec, queued)
        job = str(read_record(spec).get("job_id"))
        if state.state == "finished":
            log(f"{spec.title}: finished, skipped")
        elif state.state == "running":
            log(f"{spec.title}: running ({_holder(spec.run_dir)}), skipped")
        elif queued.get(job) in ACTIVE_SLURM_STATES:
            log(f"{spec.title}: SLURM job {job} is {queued[job].lower()}, skipped")
        else:
            todo.append(spec)
    return todo


def status_lines(runs: Sequence[RunSpec]) -> List[str]:
    """An aligned table: one line per run with its state and job, and a count per state."""
    queued = queue_states(runs)
    states = [run_state(spec, queued) for spec in runs]
    lines = format_table(("run", "state", "job"), [(spec.title, s.text, s.job) for spec, s in zip(runs, states)])
    counts = Counter(s.state for s in states)
    lines.append(", ".join(f"{n} {state}" for state, n in counts.items()))
    return lines


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Result:
    """What a run folder says for a results table; the figures are those of the epoch with the
    best val top-1 (None until the run has an epoch)."""

    status: str  # RunState.short
    best_epoch: Optional[int] = None
    val_top1: Optional[float] = None
    val_top5: Optional[float] = None
    train_top1: Optional[float] = None
    params: Optional[int] = None
    num_classes: Optional[int] = None  # of the dataset the run trained on
    generated_data: Optional[bool] = None  # the generated sample data (dataset.fake), not TinyImageNet

    def cells(self) -> List[str]:
        """The RESULT_COLUMNS of a printed table."""
        return [self.status, MISSING if self.best_epoch is None else str(self.best_epoch), fmt_num(self.val_top1),
                fmt_num(self.val_top5), fmt_num(self.train_top1), fmt_count(self.params)]

    def values(self) -> List[Any]:
        """The RESULT_FIELDS of a CSV line (None: blank, not measured yet)."""
        return [getattr(self, name) for name in RESULT_FIELDS]


RESULT_COLUMNS = ("status", "best epoch", "val top-1", "val top-5", "train top-1", "params")
RESULT_FIELDS = ("status", "best_epoch", "val_top1", "val_top5", "train_top1", "params")
NUM_CLASSES = 200  # TinyImageNet's, what a run trains on unless its config says otherwise


def collect(spec: RunSpec, queued: Optional[Mapping[str, str]] = None) -> Result:
    """The run's state and its best epoch by val top-1 from metrics.jsonl."""
    status = run_state(spec, queued).short
    best = best_epoch(read_metrics(spec.run_dir))
    if best is None:
        return Result(status)
    summary = read_summary(spec.run_dir)
    num_classes, generated = dataset_of_run(spec.run_dir, summary)
    params = summary.get("params")
    if params is None:  # a run folder of an older version: build the model its config describes
        saved = os.path.join(spec.run_dir, "config.yaml")
        source = saved if os.path.isfile(saved) else spec.config_file
        params = count_params(source, num_classes or NUM_CLASSES) if source else None
    return Result(status, best.get("epoch"), best.get("val_top1"), best.get("val_top5"), best.get("train_top1"),
                  params, num_classes, generated)


def count_params(config_file: str, num_classes: int = NUM_CLASSES) -> int:
    """Parameters of the model a config file builds for `num_classes` classes. Works on a row's
    YAML and on a run folder's config.yaml alike."""
    from cvnets import build_model  # imported lazily: torch is slow to load and listings need none of it

    cfg = load_config(["--common.config-file", config_file])
    model = build_model(cfg.model, num_classes)  # model.num_classes, when set, wins
    return sum(p.numel() for p in model.parameters())


def dataset_of_run(run_dir: str, summary: Mapping[str, Any]) -> Tuple[Optional[int], Optional[bool]]:
    """(classes, generated data?) of the dataset a run trained on; None where nothing says.

    summary.json's num_classes is what the engine saw; without it the run's config.yaml tells
    (dataset.fake.enable writes the generated sample data, model.num_classes overrides)."""
    saved = os.path.join(run_dir, "config.yaml")
    try:
        cfg = load_config(["--common.config-file", saved]) if os.path.isfile(saved) else None
    except ValueError:  # a run folder of an older version; its summary may still say
        cfg = None
    generated = cfg.dataset.fake.enable if cfg is not None else None
    if summary.get("num_classes") is not None:
        return int(summary["num_classes"]), generated
    if cfg is None:
        return None, None
    if cfg.model.num_classes is not None:
        return cfg.model.num_classes, generated
    return (cfg.dataset.fake.classes if generated else NUM_CLASSES), generated


# ----------------------------------------------------------------------------- tables
def fmt_num(value: Optional[float]) -> str:
    return MISSING if value is None else f"{value:.2f}"


def fmt_count(value: Optional[int]) -> str:
    return MISSING if value is None else f"{value:,}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> List[str]:
    """Left-aligned columns under a header and a rule, for terminals (CSV is for programs)."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[Any]) -> str:
        return "  ".join(f"{str(c):<{w}}" for c, w in zip(cells, widths)).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(row) for row in rows)]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(cells) + " |" for cells in rows])


def write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A CSV file (None cells blank), written atomically: a reader never sees half of it."""
    with atomic_open(path, "w") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


# ----------------------------------------------------------------------------- launching
def launch(runs: Sequence[RunSpec], launcher: Any, log: Log = print) -> int:
    """Start the runs that need it (pending_runs) with `launcher`; its exit status."""
    return launcher.launch(pending_runs(runs, log))
