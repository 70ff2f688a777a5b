"""Experiment trackers behind one small interface: TensorBoard, Weights & Biases, MLflow.

The Trainer (rank 0 only) feeds every tracker at the same four points:

- start(run): once the run folder agrees with the checkpoint; `run.history` holds the epochs
  that checkpoint vouches for, which is the truth a resumed tracker run must end up holding;
- log_step(step, scalars): loss, top1, lr and images/s once per common.log_every_batches,
  at the optimizer step (`step`) reached; never more often;
- log_epoch(row, step): every field of the epoch's metrics.jsonl row, right after the row;
- finish(summary, checkpoints): the run's summary.json data and the best checkpoint files.

A resumed run continues the same tracker run: the ids live in `<run folder>/trackers.json`.
Each epoch reaches a tracker once after any sequence of kills and resumes: a tracker is fed an
epoch only after checkpoint_last.pt of that epoch is on disk, so what it holds is a prefix of
the checkpoint's history, and start() adds just the rows it lacks (MLflow is asked which
values it holds; W&B, which cannot be asked offline, is told by trackers.json). A tracker run
that holds epochs the checkpoint does not (a resume from an older checkpoint) is left as it is
and a new one starts. A tracker that raises is switched off with one warning; training goes on.
"""
from __future__ import annotations

import functools
import glob
import importlib.util
import json
import logging
import math
import os
import re
import secrets
import string
import struct
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from engine.utils import flatten
from options.schema import Config, MLflowConfig, WandbConfig
from utils.files import read_json_object, write_json

logger = logging.getLogger("cvnets")

TRACKERS_FILE = "trackers.json"
STEP_PREFIX = "step/"  # per-log-interval scalars, beside the epoch row's own names
STEP_SCALARS = ("loss", "top1", "top5", "lr", "images_per_second")  # of the log line, so far in the epoch
FINAL_PREFIX = "best/"  # the finished run's best metrics
_WANDB_BLOCK = 32768  # the block size of W&B run files (LevelDB's log format)


@dataclass(frozen=True)
class RunInfo:
    """What a tracker needs to know about the run at its start."""

    run_dir: str
    name: str  # common.run_label (the run folder's name)
    config: Dict[str, Any]  # the resolved config, nested
    params: int  # the model's parameter count
    git_commit: Optional[str]
    history: Sequence[Dict[str, Any]] = ()  # metrics rows of the epochs the checkpoint holds
    epoch_steps: Sequence[int] = ()  # optimizer steps taken by the end of each of those epochs
    resume_changes: Mapping[str, Any] = field(default_factory=dict)  # dotted key -> new value


class Logger:
    """One tracker. Methods may raise: the Trackers wrapper switches the tracker off."""

    name = "logger"

    def start(self, run: RunInfo) -> None:
        """Open (or reopen) the tracker run and add the history rows it does not hold yet."""

    def log_step(self, step: int, scalars: Mapping[str, float]) -> None:
        """Scalars of the latest log interval, at optimizer step `step`."""

    def log_epoch(self, row: Mapping[str, Any], step: int) -> None:
        """A finished epoch's metrics row; `step` is the optimizer step at its end."""

    def finish(self, summary: Mapping[str, Any], checkpoints: Sequence[str]) -> None:
        """The run stopped (summary["state"] says how); close the tracker run."""


class Trackers:
    """The trackers of a run, each called in turn; one that raises is dropped with a warning."""

    def __init__(self, loggers: Sequence[Logger] = ()) -> None:
        self.active: List[Logger] = list(loggers)

    def start(self, run: RunInfo) -> None:
        self._call("start", run)

    def log_step(self, step: int, scalars: Mapping[str, float]) -> None:
        self._call("log_step", step, {k: scalars[k] for k in STEP_SCALARS if k in scalars})

    def log_epoch(self, row: Mapping[str, Any], step: int) -> None:
        self._call("log_epoch", row, step)

    def finish(self, summary: Mapping[str, Any], checkpoints: Sequence[str]) -> None:
        self._call("finish", summary, checkpoints)
        self.active = []

    def _call(self, method: str, *args: Any) -> None:
        for tracker in list(self.active):
            try:
                getattr(tracker, method)(*args)
            except Exception as e:  # a tracker's server or disk is gone: the run matters more
                self.active.remove(tracker)
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                logger.warning("%s stopped logging: %s failed (%s%s); training goes on without it", tracker.name,
                               method, type(e).__name__, f": {first}" if first else "")


# ----------------------------------------------------------------------------- building
# Each tracker: the key that turns it on, its package (also the name of the extra that installs
# it) and how to build it from the config.
TRACKERS: Tuple[Tuple[str, str, Callable[[Config], Logger]], ...] = (
    ("common.tensorboard", "tensorboard", lambda cfg: TensorBoardLogger()),
    ("stats.wandb.enable", "wandb", lambda cfg: WandbLogger(cfg.stats.wandb)),
    ("stats.mlflow.enable", "mlflow", lambda cfg: MLflowLogger(cfg.stats.mlflow)),
)


def _is_on(cfg: Config, key: str) -> bool:
    return bool(functools.reduce(getattr, key.split("."), cfg))


def check_trackers(cfg: Config) -> None:
    """ValueError (exit status 2, before training) when an enabled tracker's package is missing."""
    for key, package, _ in TRACKERS:
        if _is_on(cfg, key) and importlib.util.find_spec(package) is None:
            raise ValueError(f"{key}: true needs the {package} package: pip install -e '.[{package}]'")


def build_loggers(cfg: Config) -> List[Logger]:
    """The trackers the config turns on (TensorBoard, W&B, MLflow), not started yet."""
    return [build(cfg) for key, _, build in TRACKERS if _is_on(cfg, key)]


def git_commit(folder: Optional[str] = None) -> Optional[str]:
    """The commit checked out at `folder` (default: this code's checkout), None when it is not a
    git checkout's top level or git is missing: the code may run from an installed package
    inside someone else's repository, whose commit would mislead."""
    folder = os.path.abspath(folder or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        done = subprocess.run(["git", "-C", folder, "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.split()
    if done.returncode != 0 or len(lines) != 2 or os.path.realpath(lines[0]) != os.path.realpath(folder):
        return None
    return lines[1]


# ----------------------------------------------------------------------------- trackers.json
def read_tracker_ids(run_dir: str) -> Dict[str, Dict[str, Any]]:
    """trackers.json of a run folder ({} when missing or unreadable)."""
    return read_json_object(os.path.join(run_dir, TRACKERS_FILE))


def _write_tracker_entry(run_dir: str, tracker: str, entry: Dict[str, Any]) -> None:
    write_json(os.path.join(run_dir, TRACKERS_FILE), {**read_tracker_ids(run_dir), tracker: entry})


def _numbers(data: Mapping[str, Any]) -> Dict[str, float]:
    """The numeric fields of a row (bools and None left out)."""
    return {k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _final_metrics(summary: Mapping[str, Any]) -> Dict[str, float]:
    """best/val_top1, best/epoch, ... (and best/ema_* with EMA) of a summary."""
    out: Dict[str, float] = {}
    for key, prefix in (("best", ""), ("ema_best", "ema_")):
        for name, value in _numbers(summary.get(key) or {}).items():
            out[f"{FINAL_PREFIX}{prefix}{name}"] = value
    return out


def _summary_fields(summary: Mapping[str, Any]) -> Dict[str, Any]:
    """The summary flattened to scalar fields, without process details and the best epochs
    (those are _final_metrics)."""
    left_out = ("pid", "updated", "already_finished", "best", "ema_best")
    flat = flatten({k: v for k, v in summary.items() if k not in left_out})
    return {k: v for k, v in flat.items() if v is None or isinstance(v, (str, int, float, bool))}


# ----------------------------------------------------------------------------- TensorBoard
def tensorboard_tag(key: str) -> str:
    """A metrics row key as a TensorBoard tag grouped by what it measures: train_loss ->
    train/loss, val_top1 -> val/top1, ema_val_top5 -> ema_val/top5, lr -> epoch/lr."""
    for group in ("ema_val", "train", "val"):
        if key.startswith(group + "_"):
            return f"{group}/{key[len(group) + 1:]}"
    return f"epoch/{key}"


class TensorBoardLogger(Logger):
    """Epoch rows as grouped scalars under <run folder>/tensorboard, one point per epoch; the
    log-interval scalars (train_step/loss, lr, ...) in tensorboard/steps, on the optimizer-step axis."""

    name = "TensorBoard"

    def __init__(self) -> None:
        self.writer = self.steps = None

    def start(self, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter  # check_trackers found the package

        # purge_step drops what an interrupted run wrote beyond the checkpoint; the last row
        # the checkpoint vouches for is written again, so every epoch appears once.
        done = len(run.history)
        self.writer = SummaryWriter(os.path.join(run.run_dir, "tensorboard"), purge_step=done if done else None)
        # The step scalars are a run of their own: a purge applies to every tag of a run, and
        # these count optimizer steps, not epochs. What followed the last finished epoch goes.
        last = run.epoch_steps[-1] if run.epoch_steps else 0
        self.steps = SummaryWriter(os.path.join(run.run_dir, "tensorboard", "steps"),
                                   purge_step=last + 1 if last else None)
        if run.history:
            self.log_epoch(run.history[-1], last)

    def log_step(self, step: int, scalars: Mapping[str, float]) -> None:
        for key, value in scalars.items():
            self.steps.add_scalar(f"train_step/{key}", value, step)
        self.steps.flush()

    def log_epoch(self, row: Mapping[str, Any], step: int) -> None:
        for key, value in _numbers(row).items():
            if key != "epoch":
                self.writer.add_scalar(tensorboard_tag(key), value, row["epoch"])
        self.writer.flush()

    def finish(self, summary: Mapping[str, Any], checkpoints: Sequence[str]) -> None:
        for writer in (self.writer, self.steps):
            if writer is not None:
                writer.close()
        self.writer = self.steps = None


# ----------------------------------------------------------------------------- Weights & Biases
class WandbLogger(Logger):
    """A W&B run per run folder. Its x-axis `_step` is the optimizer step; charts of the epoch
    fields use `epoch`, those of step/* use `iteration`.

    What the W&B run already holds: offline, its own run files say (they are read back);
    online, trackers.json records the last epoch and step handed over, and W&B itself drops
    any step below the run's last."""

    name = "W&B"

    def __init__(self, settings: WandbConfig) -> None:
        self.settings = settings
        self.run = None
        self.run_dir = ""
        self.entry: Dict[str, Any] = {}
        self.held: set = set()  # epochs the W&B run holds
        self.last_step = -1  # the highest step it holds
        self._defined: set = set()

    def start(self, run: RunInfo) -> None:
        import wandb

        s = self.settings
        self.run_dir = run.run_dir
        wandb_dir = os.environ.get("WANDB_DIR") or run.run_dir  # the user's WANDB_DIR wins
        entry = read_tracker_ids(run.run_dir).get("wandb") or {}
        self.held, self.last_step = set(range(1, int(entry.get("epoch", 0)) + 1)), int(entry.get("step", -1))
        if entry.get("id") and s.mode == "offline" and entry.get("mode") == "offline":
            found = _offline_history(wandb_dir, entry["id"])
            if found is not None:
                self.held, self.last_step = found
        if entry.get("id") and max(self.held, default=0) > len(run.history):
            logger.warning("W&B run %s holds epochs up to %d, the checkpoint only %d: continuing in a new W&B run",
                           entry["id"], max(self.held), len(run.history))
            entry = {}
        if not entry.get("id"):
            entry, self.held, self.last_step = {"id": _wandb_id()}, set(), -1
        self.entry = {**entry, "mode": s.mode}
        self._save_entry()  # before init: a kill right after it still resumes this id
        self.run = wandb.init(
            project=s.project, entity=s.entity, group=s.group, tags=list(s.tags) or None, name=run.name,
            id=entry["id"], resume="allow", mode=s.mode, job_type="train",
            dir=None if os.environ.get("WANDB_DIR") else run.run_dir,
        )
        self.run.config.update({**run.config, "num_parameters": run.params, "git_commit": run.git_commit},
                               allow_val_change=True)
        if run.resume_changes:
            self.run.summary["resume_changes"] = dict(run.resume_changes)
        self.run.define_metric("epoch")
        self.run.define_metric("iteration")
        self.run.define_metric(STEP_PREFIX + "*", step_metric="iteration")
        for row, step in zip(run.history, run.epoch_steps):
            self.log_epoch(row, step)

    def _save_entry(self) -> None:
        self.entry.update(epoch=max(self.held, default=0), step=self.last_step)
        _write_tracker_entry(self.run_dir, "wandb", self.entry)

    def log_step(self, step: int, scalars: Mapping[str, float]) -> None:
        if step <= self.last_step:
            return  # an earlier attempt of this run logged it
        self.run.log({"iteration": step, **{STEP_PREFIX + k: v for k, v in _numbers(scalars).items()}}, step=step)

    def log_epoch(self, row: Mapping[str, Any], step: int) -> None:
        if row["epoch"] in self.held:
            return
        values = _numbers(row)
        for key in values.keys() - self._defined - {"epoch"}:
            self.run.define_metric(key, step_metric="epoch")
            self._defined.add(key)
        self.run.log(values, step=step)
        self.held.add(int(row["epoch"]))
        self.last_step = max(self.last_step, step)
        self._save_entry()

    def finish(self, summary: Mapping[str, Any], checkpoints: Sequence[str]) -> None:
        if self.run is None:
            return
        import wandb

        self.run.summary.update({**_summary_fields(summary), **_final_metrics(summary)})
        if self.settings.log_checkpoint and summary.get("state") == "finished" and checkpoints:
            artifact = wandb.Artifact(re.sub(r"[^A-Za-z0-9._-]", "-", f"{self.run.name or self.run.id}-best"),
                                      type="model", metadata=_final_metrics(summary))
            for path in checkpoints:
                artifact.add_file(path)
            self.run.log_artifact(artifact)
        run, self.run = self.run, None
        run.finish(exit_code=1 if summary.get("state") == "failed" else 0)


def _offline_history(wandb_dir: str, run_id: str) -> Optional[Tuple[set, int]]:
    """(epochs, highest step) in the history of the offline W&B run `run_id` under `wandb_dir`,
    read from its run files; None when they cannot be read (another W&B file format).

    A run file is a 7-byte header (':W&B', magic, version), then records in LevelDB's log
    framing: 32 KiB blocks, each record [crc32 4][length 2][type 1][payload], a payload split
    FIRST/MIDDLE/LAST across blocks, a block tail shorter than a header left as padding.
    Each payload is a W&B protobuf Record. A kill can leave the last record torn: reading
    stops there."""
    try:
        from google.protobuf.message import DecodeError
        from wandb.proto import wandb_internal_pb2 as pb
    except ImportError:
        return None
    epochs, last = set(), -1
    for path in glob.glob(os.path.join(wandb_dir, "wandb", f"offline-run-*-{run_id}", f"run-{run_id}.wandb")):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            return None
        if data[:4] != b":W&B":
            return None
        pos, parts = 7, b""
        while pos + 7 <= len(data):
            if _WANDB_BLOCK - pos % _WANDB_BLOCK < 7:
                pos += _WANDB_BLOCK - pos % _WANDB_BLOCK
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if pos + 7 + length > len(data):
                break  # torn by a kill
            parts += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind not in (1, 4):  # FULL or LAST end a record
                continue
            record = pb.Record()
            try:
                record.ParseFromString(parts)
            except DecodeError:
                break
            parts = b""
            if record.WhichOneof("record_type") != "history":
                continue
            last = max(last, record.history.step.num)
            for item in record.history.item:
                if (item.key or "/".join(item.nested_key)) == "epoch":
                    epochs.add(int(json.loads(item.value_json)))
    return epochs, last


def _wandb_id() -> str:
    """8 random lowercase letters and digits, the shape of the ids W&B makes itself."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


# ----------------------------------------------------------------------------- MLflow
class MLflowLogger(Logger):
    """An MLflow run per run folder: params = the flattened config; epoch fields as metrics at
    step = epoch, step/* at step = optimizer step; the summary as summary.json.

    MLflow keeps every value logged, even at a step it already has, so a resume first asks
    the run which (metric, step) pairs it holds and logs only the others."""

    name = "MLflow"
    MAX_PARAMS_PER_CALL = 100  # MLflow's log_batch limits
    MAX_METRICS_PER_CALL = 1000

    def __init__(self, settings: MLflowConfig) -> None:
        self.settings = settings
        self.client = None
        self.run_id: Optional[str] = None
        self.held: Dict[str, set] = {}  # metric -> steps the run already holds
        self.last_step = -1  # the highest step/* step the run holds

    def start(self, run: RunInfo) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.settings.tracking_uri)
        uri = self.client.tracking_uri
        entry = read_tracker_ids(run.run_dir).get("mlflow") or {}
        existing = self._existing_run(entry, uri, len(run.history))
        if existing is None:
            tags = {"run_dir": os.path.abspath(run.run_dir)}
            if run.git_commit:
                tags["mlflow.source.git.commit"] = run.git_commit
            created = self.client.create_run(self._experiment_id(), run_name=run.name, tags=tags)
            self.run_id = created.info.run_id
            params: Dict[str, str] = {}
        else:
            self.run_id = existing.info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            params = dict(existing.data.params)
        _write_tracker_entry(run.run_dir, "mlflow", {"run_id": self.run_id, "tracking_uri": uri})
        self._log_params({**{k: _param_text(v) for k, v in flatten(run.config).items()},
                          "num_parameters": str(run.params), "git_commit": str(run.git_commit)}, params)
        for row, step in zip(run.history, run.epoch_steps):
            self.log_epoch(row, step)

    def _existing_run(self, entry: Mapping[str, Any], uri: str, epochs: int):
        """The MLflow run this folder logged to before, when it can be continued; else None."""
        from mlflow.exceptions import MlflowException

        if not entry.get("run_id") or entry.get("tracking_uri") != uri:
            return None
        try:
            existing = self.client.get_run(entry["run_id"])
        except MlflowException:
            logger.warning("MLflow run %s is gone from %s: a new MLflow run starts", entry["run_id"], uri)
            return None
        if existing.info.lifecycle_stage != "active":
            logger.warning("MLflow run %s was deleted: a new MLflow run starts", entry["run_id"])
            return None
        held = {key: {m.step for m in self.client.get_metric_history(existing.info.run_id, key)}
                for key in existing.data.metrics}
        beyond = max((max(steps) for key, steps in held.items()
                      if steps and not key.startswith((STEP_PREFIX, FINAL_PREFIX))), default=0)
        if beyond > epochs:
            logger.warning("MLflow run %s holds epochs up to %d, the checkpoint only %d: continuing in a new MLflow "
                           "run", existing.info.run_id, beyond, epochs)
            return None
        self.held = held
        self.last_step = max((max(s) for k, s in held.items() if s and k.startswith(STEP_PREFIX)), default=-1)
        return existing

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        name = self.settings.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        if name is None:
            return "0"  # MLflow's Default experiment
        for _ in range(2):
            found = self.client.get_experiment_by_name(name)
            if found is not None:
                return found.experiment_id
            try:
                return self.client.create_experiment(name)
            except MlflowException:  # another run of the sweep created it first
                continue
        raise RuntimeError(f"could not create or find the MLflow experiment {name!r}")

    def _log_params(self, params: Dict[str, str], held: Mapping[str, str]) -> None:
        from mlflow.entities import Param, RunTag

        # An MLflow param cannot change; a value a resume changed is kept as a tag instead.
        new = [Param(k, v) for k, v in params.items() if k not in held]
        changed = [RunTag(f"resume_changed.{k}", v) for k, v in params.items() if k in held and held[k] != v]
        for i in range(0, len(new), self.MAX_PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=new[i:i + self.MAX_PARAMS_PER_CALL])
        if changed:
            self.client.log_batch(self.run_id, tags=changed)

    def _log_metrics(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items() if step not in self.held.get(k, ())]
        for i in range(0, len(metrics), self.MAX_METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + self.MAX_METRICS_PER_CALL])

    def log_step(self, step: int, scalars: Mapping[str, float]) -> None:
        if step <= self.last_step:
            return  # an earlier attempt logged up to here before it was killed
        self._log_metrics({STEP_PREFIX + k: v for k, v in _numbers(scalars).items()}, step)

    def log_epoch(self, row: Mapping[str, Any], step: int) -> None:
        self._log_metrics({k: v for k, v in _numbers(row).items() if k != "epoch"}, int(row["epoch"]))

    def finish(self, summary: Mapping[str, Any], checkpoints: Sequence[str]) -> None:
        if self.run_id is None:
            return
        state = summary.get("state")
        self.client.log_dict(self.run_id, {k: v for k, v in summary.items() if k not in ("pid", "updated")},
                             "summary.json")
        self.client.set_tag(self.run_id, "state", str(state))
        if state == "finished":
            self._log_metrics(_final_metrics(summary), 0)
            if self.settings.log_checkpoint:
                for path in checkpoints:
                    self.client.log_artifact(self.run_id, path, "checkpoints")
        status = {"finished": "FINISHED", "failed": "FAILED"}.get(str(state), "KILLED")
        run_id, self.run_id = self.run_id, None
        self.client.set_terminated(run_id, status)


def _param_text(value: Any) -> str:
    """A config value as an MLflow param string (lists and mappings as JSON)."""
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return str(value)
