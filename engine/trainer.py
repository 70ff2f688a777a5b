"""The Trainer: runs epochs of train_one_epoch/evaluate and keeps the run folder truthful.

At the end of every epoch, in this order: the best-weights checkpoints, checkpoint_last.pt
(which carries the whole per-epoch history), then the metrics.jsonl row, the experiment
trackers (TensorBoard, W&B, MLflow: engine/loggers.py) and summary.json. A kill anywhere in
between leaves a checkpoint that knows more than or as much as the records; resuming rebuilds
the records from the checkpoint, so every epoch appears exactly once (engine/run_folder.py). Signals (SIGINT, SIGTERM, SIGUSR1, SIGHUP) finish the current optimizer
step, save and stop; the process exits 128 + the signal number.
"""
from __future__ import annotations

import logging
import math
import os
import shlex
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm import tqdm

from engine import checkpoint as ckpt
from engine.ema import ModelEMA
from engine.loggers import RunInfo, Trackers, build_loggers, git_commit
from engine.loops import LoopOptions, NonFiniteLossError, Progress, evaluate, optimizer_steps, train_one_epoch
from engine.run_folder import (BEST_CHECKPOINTS, RESTART, RunFolder, append_metrics, discard_records, error_line,
                               resume_path, write_metrics, write_summary)
from engine.signals import STOP_SIGNALS, handling
from engine.teacher import KEY as TEACHER_KEY, teacher_change
from engine.utils import DistInfo, flatten, seed_everything
from options.config import save_config, to_dict
from options.schema import Config, harmless_on_resume
from utils.files import atomic_open

logger = logging.getLogger("cvnets")


class TrainingInterrupted(Exception):
    """A stop signal arrived; `saved` says whether checkpoint_last.pt holds the state at the stop."""

    def __init__(self, signum: int, path: str, saved: bool = True) -> None:
        name = signal.Signals(signum).name
        where = f"state saved to {path}" if saved else f"stopped before saving; {path} holds the last save"
        super().__init__(f"stopped by {name}; {where}")
        self.signum, self.saved = signum, saved


class _StopNow(BaseException):
    """A second stop signal while training (not while saving): leave at once."""


@dataclass
class Components:
    """Everything engine/build.py builds from the config, handed to the Trainer."""

    model: nn.Module  # the plain module (its state_dict is what checkpoints hold)
    train_model: nn.Module  # what the loop calls: possibly DDP- and/or compile-wrapped
    train_loader: Any
    val_loader: Any
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    num_classes: int
    wnids: List[str]
    class_names: List[str]
    epoch_batches: Callable[[int], int]  # batches trained in epoch e (the sampler's length, capped)
    scaler: Optional[torch.amp.GradScaler] = None
    ema: Optional[ModelEMA] = None
    eval_copy: Callable[[nn.Module], nn.Module] = lambda module: module  # e.g. a BatchNorm-folded copy
    teacher: Optional[Dict[str, str]] = None  # distillation: the teacher's {"path", "sha256"}


class Trainer:
    def __init__(self, cfg: Config, parts: Components, opts: LoopOptions, dist_info: DistInfo) -> None:
        self.cfg, self.parts, self.opts, self.dist = cfg, parts, opts, dist_info
        self.progress = Progress()
        self.best: Dict[str, Optional[Dict[str, Any]]] = {"model": None, "ema": None}
        self.history: List[Dict[str, Any]] = []  # one row per finished epoch
        self.params = sum(p.numel() for p in parts.model.parameters())
        self.folder: Optional[RunFolder] = None
        self.resumes = 0
        self._signal: Optional[int] = None
        self._ranks: Optional[List[Dict[str, Any]]] = None  # per-rank states for checkpoint_last.pt (DDP)
        self._saving = False
        self._announced = False
        self.trackers = Trackers()  # rank 0 fills it when the run starts
        self._closing: Dict[str, Any] = {}  # the last summary written: what the trackers get at the end
        self._changes: Dict[str, Any] = {}  # keys a resume changed, for the trackers

    # ------------------------------------------------------------------ main loop
    def run(self, folder: RunFolder, stop_after_epoch: Optional[int] = None) -> Dict[str, Any]:
        """Train in the open `folder` until scheduler.max_epochs (or `stop_after_epoch` epochs).

        Continues from the checkpoint common.resume names; returns the summary (also in
        summary.json), whose "state" says how the run ended.
        """
        adopted = False
        if self.folder is None:  # the first call; later ones (stop_after_epoch) continue in memory
            start = resume_path(folder.path, self.cfg.common.resume)
            if self.cfg.common.resume == RESTART and self.dist.is_main:
                discard_records(folder.path)
                logger.info("common.resume restart: discarded the earlier run's records and checkpoints")
            if start is not None:
                self.resume(start)
                source = os.path.dirname(os.path.abspath(start))
                adopted = source != os.path.abspath(folder.path)
                if adopted and self.dist.is_main:
                    self._adopt_best_checkpoints(source, folder)
            else:
                # What data setup drew from the global generators (a cache build, say) must
                # not shift the training draws (dropout): a fresh run starts them from the
                # seed, as a resume restores them from its checkpoint.
                seed_everything(self.cfg.common.seed)
        self.folder = folder
        max_epochs = self.cfg.scheduler.max_epochs
        until = max_epochs if stop_after_epoch is None else min(stop_after_epoch, max_epochs)
        if self.progress.epoch >= max_epochs and not adopted:
            return self._summary("finished", already=True)
        self._start_records()
        try:
            if self.progress.epoch >= max_epochs:  # another run's finished checkpoint: this folder gets its records
                self._save_last()
            with self._catch_signals():
                while self.progress.epoch < until:
                    self._run_epoch()
                    # saved (mid-epoch or at its end): stop here; every rank agrees, also when the
                    # signal reached one rank only while it saved the epoch's checkpoints
                    if self._stop_requested():
                        raise TrainingInterrupted(self._signal, folder.last_checkpoint)
            summary = self._summary("finished" if self.progress.epoch >= max_epochs else "interrupted")
        except _StopNow:
            self._announce_signal()
            self._write_summary("interrupted", stopped_by=signal.Signals(self._signal).name)
            raise TrainingInterrupted(self._signal, folder.last_checkpoint, saved=False) from None
        except TrainingInterrupted:
            self._write_summary("interrupted", stopped_by=signal.Signals(self._signal).name)
            raise
        except NonFiniteLossError as e:
            saved = os.path.isfile(folder.last_checkpoint)
            message = f"{e}; " + ("checkpoint_last.pt still holds the last good epoch" if saved
                                  else "no checkpoint was written yet")
            self._write_summary("failed", error=message)
            raise NonFiniteLossError(message) from None
        except Exception as e:
            self._write_summary("failed", error=error_line(e))
            raise
        finally:
            self._close_records()
        return summary

    def _run_epoch(self) -> None:
        epoch, parts = self.progress.epoch, self.parts
        epoch_batches = parts.epoch_batches(epoch)
        first_batch = self.progress.batch_in_epoch  # > 0 when resuming mid-epoch
        parts.train_loader.batch_sampler.set_epoch(epoch, start_batch=first_batch)
        started = time.perf_counter()
        loader, bar = self._progress_bar(epoch, epoch_batches)
        train = train_one_epoch(
            parts.train_model, loader, parts.criterion, parts.optimizer,
            lambda iteration: parts.scheduler.lr(epoch, iteration), self.progress, self.opts, epoch_batches,
            dist_info=self.dist, scaler=parts.scaler, ema=parts.ema, should_stop=self._stop_requested,
            on_log=lambda stats: self._log_step(epoch, epoch_batches, first_batch, stats, started, bar),
        )
        if bar is not None:
            bar.close()
        if self.progress.stop_requested:
            self._ranks = self._rank_states()
            self._save_last()
            return

        val = evaluate(parts.eval_copy(parts.model), parts.val_loader, self.opts, self.dist)
        row: Dict[str, Any] = {
            "epoch": epoch + 1, "lr": parts.optimizer.param_groups[0]["lr"],
            "train_loss": train["loss"], "train_top1": train["top1"], "train_top5": train["top5"],
            "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
            "train_images": train["count"], "val_images": val["count"],
        }
        if parts.ema is not None:
            ema_val = evaluate(parts.eval_copy(parts.ema.module), parts.val_loader, self.opts, self.dist)
            row.update(ema_val_loss=ema_val["loss"], ema_val_top1=ema_val["top1"], ema_val_top5=ema_val["top5"])
        row["images_per_second"] = train["images_per_second"]
        row["train_seconds"] = train["seconds"]
        row["epoch_seconds"] = time.perf_counter() - started

        parts.scheduler.step_epoch(self._metric(row, ""), higher_is_better=self.cfg.stats.checkpoint_metric_max)
        self.progress.epoch += 1
        self.progress.batch_in_epoch = 0
        self._record(row)

    # ------------------------------------------------------------------ bookkeeping
    def _metric(self, row: Dict[str, Any], prefix: str) -> float:
        return row[f"{prefix}val_{self.cfg.stats.checkpoint_metric}"]

    def _is_better(self, value: float, best: Optional[Dict[str, Any]]) -> bool:
        if best is None:
            return True
        return value > best["value"] if self.cfg.stats.checkpoint_metric_max else value < best["value"]

    def _record(self, row: Dict[str, Any]) -> None:
        """Best trackers, then (rank 0) checkpoints, then the records (see the module docstring)."""
        new_best = []
        for kind, prefix in (("model", ""), ("ema", "ema_")):
            if f"{prefix}val_top1" not in row:
                continue
            value = self._metric(row, prefix)
            if self._is_better(value, self.best[kind]):
                self.best[kind] = {"value": value, "epoch": row["epoch"], "val_top1": row[f"{prefix}val_top1"],
                                   "val_top5": row[f"{prefix}val_top5"], "train_top1": row["train_top1"]}
                new_best.append(kind)
        self.history.append(row)
        self._log_epoch(row)
        self._ranks = self._rank_states()
        if not self.dist.is_main:
            return
        if "model" in new_best:
            self._save_weights("checkpoint_best.pt", self.parts.model.state_dict(), row, ema=False)
        if "ema" in new_best:
            self._save_weights("checkpoint_ema_best.pt", self.parts.ema.module.state_dict(), row, ema=True)
        self._save_last()
        append_metrics(self.folder.path, row)
        self.trackers.log_epoch(row, self.progress.iteration)
        self._write_summary("running")

    def _start_records(self) -> None:
        """Make the records agree with the state just restored (or start them), then save the config."""
        if not self.dist.is_main:
            return
        if write_metrics(self.folder.path, self.history):
            logger.info("metrics.jsonl rebuilt from the checkpoint (%d epochs)", len(self.history))
        save_config(self.cfg, self.folder.file("config.yaml"))
        self._start_trackers()
        self._write_summary("running")

    def _summary(self, state: str, already: bool = False) -> Dict[str, Any]:
        summary = self._summary_data(state)
        if self.dist.is_main and not already:
            self._closing = dict(summary)
            write_summary(self.folder.path, summary)
        summary["already_finished"] = already
        return summary

    def _write_summary(self, state: str, **extra: Any) -> None:
        if not self.dist.is_main or self.folder is None:
            return
        self._closing = {**self._summary_data(state), **extra}
        try:
            write_summary(self.folder.path, self._closing)
        except Exception as e:  # e.g. the disk is full: the error that got us here matters more
            logger.warning("could not update summary.json: %s", e)

    def _summary_data(self, state: str) -> Dict[str, Any]:
        wall = sum(r.get("epoch_seconds", 0.0) for r in self.history)
        train_seconds = sum(r.get("train_seconds", 0.0) for r in self.history)
        train_images = sum(r.get("train_images", 0) for r in self.history)
        return {
            "state": state,
            "finished": state == "finished",
            "epochs_done": self.progress.epoch,
            "max_epochs": self.cfg.scheduler.max_epochs,
            "params": self.params,
            "num_classes": self.parts.num_classes,
            "checkpoint_metric": self.cfg.stats.checkpoint_metric,
            "best": self.best["model"],
            "ema_best": self.best["ema"],
            "final_train_top1": self.history[-1]["train_top1"] if self.history else None,
            "wall_seconds": wall,
            "images_per_second": train_images / train_seconds if train_seconds else None,
            "run_dir": os.path.abspath(self.folder.path),
            "resumes": self.resumes,
            "pid": os.getpid(),
        }

    # ------------------------------------------------------------------ checkpoints
    def _common_state(self) -> Dict[str, Any]:
        return {"config": to_dict(self.cfg), "num_classes": self.parts.num_classes, "wnids": list(self.parts.wnids),
                "class_names": list(self.parts.class_names), "params": self.params, "teacher": self.parts.teacher}

    def _save(self, state: Dict[str, Any], name: str) -> None:
        self._saving = True
        try:
            ckpt.save(state, self.folder.file(name))
        finally:
            self._saving = False

    def _save_weights(self, name: str, weights: Dict[str, Any], row: Dict[str, Any], ema: bool) -> None:
        self._save({**self._common_state(), "kind": ckpt.WEIGHTS, "model": weights, "is_ema": ema,
                    "epoch": row["epoch"], "metrics": row}, name)

    def _save_last(self) -> None:
        if not self.dist.is_main:
            return
        parts = self.parts
        self._save({
            **self._common_state(),
            "kind": ckpt.TRAINING,
            "model": parts.model.state_dict(),
            "optimizer": parts.optimizer.state_dict(),
            "optimizer_name": self.cfg.optim.name,
            "scheduler": parts.scheduler.state_dict(),
            "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
            "ema": parts.ema.state_dict() if parts.ema is not None else None,
            "progress": self.progress.state_dict(),
            "best": self.best,
            "history": self.history,
            "resumes": self.resumes,
            "rng": ckpt.rng_state(),
            "ranks": self._ranks,
        }, "checkpoint_last.pt")

    def _rank_states(self) -> Optional[List[Dict[str, Any]]]:
        """Under DDP, what differs between ranks, gathered from every rank (a collective: all
        ranks call it at the same point): the meter sums of an epoch stopped mid-way, the EMA's
        buffers (BatchNorm statistics follow each rank's own batches) and the RNG state. Saved
        beside rank 0's state, so that each rank resumes as itself."""
        if not self.dist.enabled:
            return None
        own: Dict[str, Any] = {"meter": self.progress.meter_state, "rng": ckpt.rng_state()}
        if self.parts.ema is not None:
            own["ema_buffers"] = {k: v.detach().cpu() for k, v in self.parts.ema.module.named_buffers()}
        ranks: List[Any] = [None] * self.dist.world_size
        torch.distributed.all_gather_object(ranks, own)
        return ranks

    def resume(self, path: str) -> None:
        """Restore everything checkpoint_last.pt holds, so training continues exactly.

        The checkpoint's config is compared with this run's: a change that alters the run is
        refused unless common.resume_allow_changes names it; every resume is logged with what
        changed."""
        state = ckpt.load(path, kind=ckpt.TRAINING)
        changes = config_changes(state["config"], to_dict(self.cfg))
        refused = [c for c in changes if not _allowed(c[0], self.cfg.common.resume_allow_changes)]
        if refused:
            listing = "; ".join(f"{key} {old!r} -> {new!r}" for key, old, new in refused)
            keys = ",".join(key for key, _, _ in refused)
            raise ValueError(f"resuming {path} would change the run: {listing}; resume with the original "
                             f"settings, allow them with --common.resume-allow-changes {keys}, or start a new run "
                             "with --common.run-label NAME")
        teacher = teacher_change(state.get("teacher"), self.parts.teacher)
        if teacher is not None and not _allowed(TEACHER_KEY, self.cfg.common.resume_allow_changes):
            raise ValueError(f"resuming {path} would change the distillation teacher: {teacher}; resume with the "
                             f"original teacher, allow it with --common.resume-allow-changes {TEACHER_KEY}, or "
                             "start a new run with --common.run-label NAME")
        parts = self.parts
        other = ckpt.class_list_difference(state.get("wnids"), parts.wnids)
        if other:
            raise ValueError(f"resuming {path} onto another class list ({other}); resume with the dataset the run "
                             "was started with (dataset.root), or fine-tune on this one with --model.checkpoint "
                             f"{path} and a new --common.run-label")
        try:
            parts.model.load_state_dict(state["model"])
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise ckpt.CheckpointError(f"{path} does not fit the model of this config ({first}); "
                                       "resume with the config the run was started with") from None
        if state.get("optimizer_name") == self.cfg.optim.name:
            parts.optimizer.load_state_dict(state["optimizer"])
        else:
            logger.warning("optimizer changed to %s: its state starts fresh", self.cfg.optim.name)
        if state["config"].get("scheduler", {}).get("name") == self.cfg.scheduler.name:
            parts.scheduler.load_state_dict(state["scheduler"])
        if parts.scaler is not None and state.get("scaler"):
            parts.scaler.load_state_dict(state["scaler"])
        if parts.ema is not None:
            if state.get("ema") is not None:
                parts.ema.load_state_dict(state["ema"])
            else:
                logger.warning("ema.enable is now true: the average starts from the resumed weights")
        self.progress = Progress.from_state(state["progress"])
        self.best, self.history = state["best"], list(state["history"])
        self.resumes = int(state.get("resumes", 0)) + 1
        ckpt.set_rng_state(state["rng"])
        ranks = state.get("ranks")
        if self.dist.enabled and ranks and len(ranks) == self.dist.world_size:
            mine = ranks[self.dist.rank]
            self.progress.meter_state = mine["meter"]
            ckpt.set_rng_state(mine["rng"])
            if parts.ema is not None and mine.get("ema_buffers") is not None:
                parts.ema.module.load_state_dict(mine["ema_buffers"], strict=False)
        if self.progress.epoch >= self.cfg.scheduler.max_epochs:
            return  # a finished run: the closing summary says so
        self._changes = {key: value for key, _, value in changes}
        what = "; changed: " + ", ".join(f"{k} {o!r} -> {n!r}" for k, o, n in changes) if changes else ""
        logger.info("resumed from %s at epoch %d, batch %d (optimizer step %d)%s", os.path.abspath(path),
                    self.progress.epoch + 1, self.progress.batch_in_epoch, self.progress.iteration, what)

    def _adopt_best_checkpoints(self, source: str, folder: RunFolder) -> None:
        """Continuing another run's checkpoint in a new folder: copy that run's best checkpoints
        that belong to the history just restored, so this folder's records name files it holds."""
        for kind, name in zip(("model", "ema"), BEST_CHECKPOINTS):
            best, src, dest = self.best.get(kind), os.path.join(source, name), folder.file(name)
            if best is None:
                continue
            try:
                epoch = ckpt.load(src, kind=ckpt.WEIGHTS).get("epoch")
            except ckpt.CheckpointError:
                epoch = None
            if epoch != best["epoch"]:
                logger.warning("%s is not the best of epoch %d that %s took over; this folder has no %s until a "
                               "better epoch", src, best["epoch"], os.path.basename(source), name)
                continue
            with open(src, "rb") as inp, atomic_open(dest, "wb") as out:
                shutil.copyfileobj(inp, out)
            logger.info("copied %s (epoch %d) from %s", name, epoch, source)

    # ------------------------------------------------------------------ records
    def _start_trackers(self) -> None:
        """Rank 0: start the configured trackers, which add the checkpoint's epochs they lack."""
        steps, total = [], 0
        for epoch in range(len(self.history)):
            total += optimizer_steps(self.parts.epoch_batches(epoch), self.opts.accum_freq)
            steps.append(total)
        self.trackers = Trackers(build_loggers(self.cfg))
        if self.trackers.active:
            self.trackers.start(RunInfo(
                run_dir=self.folder.path, name=os.path.basename(os.path.abspath(self.folder.path)),
                config=to_dict(self.cfg), params=self.params, git_commit=git_commit(), history=list(self.history),
                epoch_steps=steps, resume_changes=self._changes))

    def _close_records(self) -> None:
        best = [self.folder.file(name) for name in BEST_CHECKPOINTS]
        self.trackers.finish(self._closing, [path for path in best if os.path.isfile(path)])

    # ------------------------------------------------------------------ progress display
    def _progress_bar(self, epoch: int, epoch_batches: int):
        """A tqdm bar around the train loader on a terminal (rank 0); plain log lines otherwise."""
        loader = self.parts.train_loader
        if not (self.dist.is_main and sys.stdout.isatty()):
            return loader, None
        bar = tqdm(loader, total=epoch_batches - self.progress.batch_in_epoch,
                   desc=f"epoch {epoch + 1}/{self.cfg.scheduler.max_epochs}", leave=False, dynamic_ncols=True)
        return bar, bar

    def run_eta(self, epoch_batches: int, first_batch: int, started: float) -> Optional[float]:
        """Seconds left in the whole run: what is left of this epoch at its current batch rate,
        plus the epochs after it at the last epoch's duration (this epoch's pace before one)."""
        batches_done = self.progress.batch_in_epoch - first_batch
        if batches_done <= 0:
            return None
        per_batch = (time.perf_counter() - started) / batches_done
        per_epoch = self.history[-1]["epoch_seconds"] if self.history else per_batch * epoch_batches
        epochs_after = self.cfg.scheduler.max_epochs - self.progress.epoch - 1
        return per_batch * (epoch_batches - self.progress.batch_in_epoch) + epochs_after * per_epoch

    def _log_step(self, epoch: int, epoch_batches: int, first_batch: int, stats: Dict[str, float], started: float,
                  bar) -> None:
        self.trackers.log_step(self.progress.iteration, stats)
        eta = self.run_eta(epoch_batches, first_batch, started)
        eta_text = format_duration(eta) if eta is not None else "?"
        if bar is not None:
            bar.set_postfix(loss=f"{stats['loss']:.3f}", top1=f"{stats['top1']:.1f}", lr=f"{stats['lr']:.2e}",
                            img_s=f"{stats['images_per_second']:.0f}", run_eta=eta_text)
            return
        logger.info("epoch %d/%d batch %d/%d: loss %.4f top1 %.2f lr %.3g %.0f img/s | run ETA %s", epoch + 1,
                    self.cfg.scheduler.max_epochs, self.progress.batch_in_epoch, epoch_batches, stats["loss"],
                    stats["top1"], stats["lr"], stats["images_per_second"], eta_text)

    def _log_epoch(self, row: Dict[str, Any]) -> None:
        ema = f" | ema val top1 {row['ema_val_top1']:.2f}" if "ema_val_top1" in row else ""
        left = (self.cfg.scheduler.max_epochs - row["epoch"]) * row["epoch_seconds"]
        logger.info("epoch %d/%d: train loss %.4f top1 %.2f | val loss %.4f top1 %.2f top5 %.2f%s | %.0f img/s, "
                    "%.1fs | run ETA %s", row["epoch"], self.cfg.scheduler.max_epochs, row["train_loss"],
                    row["train_top1"], row["val_loss"], row["val_top1"], row["val_top5"], ema,
                    row["images_per_second"], row["epoch_seconds"], format_duration(left))

    # ------------------------------------------------------------------ signals
    def _announce_signal(self) -> None:
        """Log the stop signal once, from the main code: a handler that logs could interrupt a
        log write in progress, and a reentrant write to the same file fails."""
        if self._signal is not None and not self._announced:
            self._announced = True
            logger.warning("%s received: finishing the current step, then saving (again to stop at once)",
                           signal.Signals(self._signal).name)

    def _stop_requested(self) -> bool:
        self._announce_signal()
        if not self.dist.enabled:
            return self._signal is not None
        if self.progress.batch_in_epoch % self.opts.log_every_batches:
            return False  # agreeing costs a host-device sync: do it once per log interval
        # Every rank must stop after the same step, so agree on the flag.
        flag = torch.tensor([float(self._signal or 0)], device=self.opts.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() > 0 and self._signal is None:
            self._signal = int(flag.item())
            self._announce_signal()
        return flag.item() > 0

    @contextmanager
    def _catch_signals(self) -> Iterator[None]:
        def handler(signum, frame):
            if self._signal is None:
                self._signal = signum  # announced by the loop (_announce_signal)
            elif self._saving:
                pass  # the save in progress completes; the stop follows it
            else:
                raise _StopNow()

        with handling(STOP_SIGNALS, handler):
            yield


def config_changes(old: Dict[str, Any], new: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """(dotted key, old value, new value) of every leaf that differs and would change the run."""
    a, b = flatten(old), flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not harmless_on_resume(k)]


def _allowed(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m', 75 -> '1m15s', 8 -> '8s'."""
    seconds = max(0, int(math.ceil(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def closing_block(summary: Dict[str, Any]) -> List[str]:
    """The lines that end a run (and answer a relaunched finished run): best metrics, timing,
    where the run folder is and what to run next."""
    done, total = summary["epochs_done"], summary["max_epochs"]
    state = "already finished" if summary.get("already_finished") else summary["state"]
    speed = f", {summary['images_per_second']:,.0f} training images/s" if summary.get("images_per_second") else ""
    lines = [f"run {state}: {done}/{total} epochs in {format_duration(summary['wall_seconds'])}{speed}"]
    for key, name in (("best", "model"), ("ema_best", "EMA")):
        best = summary.get(key)
        if best:
            lines.append(f"  best val top-1 {best['val_top1']:.2f}, top-5 {best['val_top5']:.2f} "
                         f"at epoch {best['epoch']} ({name})")
    if summary.get("final_train_top1") is not None:
        lines.append(f"  final train top-1 {summary['final_train_top1']:.2f}")
    run_dir = summary["run_dir"]
    lines.append(f"  run folder: {run_dir}")
    best = os.path.join(run_dir, "checkpoint_best.pt")
    if os.path.isfile(best):
        lines.append(f"  evaluate: {eval_command()} --model.checkpoint {shlex.quote(best)}")
    return lines


def eval_command() -> str:
    """main_eval as a command that runs from any folder: this checkout's main_eval.py by its
    absolute path, or the console script of an installed package."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "main_eval.py")
    return f"python {shlex.quote(script)}" if os.path.isfile(script) else "cvnets-eval"
