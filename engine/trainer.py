"""The Trainer: runs epochs of train_one_epoch/evaluate and owns the run folder.

Run folder (<results_loc>/<run_label>/): config.yaml, metrics.jsonl (one object per epoch),
train.log, summary.json, checkpoint_last.pt (full state), checkpoint_best.pt and, with EMA,
checkpoint_ema_best.pt. Only rank 0 writes; every write is atomic.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional

import torch
from torch import nn
from tqdm import tqdm

from engine.ema import ModelEMA
from engine.loops import LoopOptions, Progress, evaluate, train_one_epoch
from engine.utils import DistInfo, atomic_torch_save, rng_state, set_rng_state, write_json
from options.config import ConfigError, save_config, to_dict
from options.schema import Config

logger = logging.getLogger("cvnets")

CHECKPOINT_VERSION = 1


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; the state was saved to checkpoint_last.pt."""

    def __init__(self, signum: int, path: str) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}; state saved to {path}")
        self.signum = signum


@dataclass
class Components:
    """Everything main_train builds from the config, handed to the Trainer."""

    model: nn.Module  # the plain module (its state_dict is what checkpoints hold)
    train_model: nn.Module  # what the loop calls: possibly DDP- and/or compile-wrapped
    train_loader: Any
    val_loader: Any
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    num_classes: int
    wnids: List[str]
    scaler: Optional[torch.amp.GradScaler] = None
    ema: Optional[ModelEMA] = None


class Trainer:
    def __init__(self, cfg: Config, parts: Components, opts: LoopOptions, run_dir: str, dist_info: DistInfo) -> None:
        self.cfg = cfg
        self.parts = parts
        self.opts = opts
        self.run_dir = run_dir
        self.dist = dist_info
        self.progress = Progress()
        self.best: Dict[str, Optional[Dict[str, Any]]] = {"model": None, "ema": None}
        self._signal: Optional[int] = None
        self._tb = None
        self.params = sum(p.numel() for p in parts.model.parameters())

    # ------------------------------------------------------------------ paths
    def path(self, name: str) -> str:
        return os.path.join(self.run_dir, name)

    # ------------------------------------------------------------------ main loop
    def run(self, stop_after_epoch: Optional[int] = None) -> Dict[str, Any]:
        """Train until scheduler.max_epochs (or stop early after `stop_after_epoch` epochs).

        Returns the summary written to summary.json.
        """
        max_epochs = self.cfg.scheduler.max_epochs
        until = max_epochs if stop_after_epoch is None else min(stop_after_epoch, max_epochs)
        self._open_run_dir()
        try:
            logger.info("model: %s, %s parameters, %d classes", self.cfg.model.name, f"{self.params:,}",
                        self.parts.num_classes)
            with self._catch_signals():
                while self.progress.epoch < until:
                    self._run_epoch()
                    if self._signal is not None:  # saved (mid-epoch or at its end): stop here
                        raise TrainingInterrupted(self._signal, self.path("checkpoint_last.pt"))
            summary = self._summary(finished=self.progress.epoch >= max_epochs)
            if self.dist.is_main:
                write_json(self.path("summary.json"), summary)
            return summary
        finally:
            self._close_run_dir()

    def _run_epoch(self) -> None:
        epoch = self.progress.epoch
        sampler = self.parts.train_loader.batch_sampler
        sampler.set_epoch(epoch, start_batch=self.progress.batch_in_epoch)
        t0 = time.perf_counter()
        scheduler = self.parts.scheduler
        loader, bar = self._progress_bar(epoch)
        train = train_one_epoch(
            self.parts.train_model,
            loader,
            self.parts.criterion,
            self.parts.optimizer,
            lambda iteration: scheduler.lr(epoch, iteration),
            self.progress,
            self.opts,
            dist_info=self.dist,
            scaler=self.parts.scaler,
            ema=self.parts.ema,
            should_stop=self._stop_requested,
            on_log=lambda stats: self._log_step(epoch, stats, bar),
        )
        if bar is not None:
            bar.close()
        if self.progress.stop_requested:
            self._save_last()
            return

        val = evaluate(self.parts.model, self.parts.val_loader, self.opts, self.dist)
        row: Dict[str, Any] = {
            "epoch": epoch + 1,
            "lr": self.parts.optimizer.param_groups[0]["lr"],
            "train_loss": train["loss"],
            "train_top1": train["top1"],
            "train_top5": train["top5"],
            "val_loss": val["loss"],
            "val_top1": val["top1"],
            "val_top5": val["top5"],
            "train_images": train["count"],
            "val_images": val["count"],
        }
        if self.parts.ema is not None:
            ema_val = evaluate(self.parts.ema.module, self.parts.val_loader, self.opts, self.dist)
            row.update(ema_val_loss=ema_val["loss"], ema_val_top1=ema_val["top1"], ema_val_top5=ema_val["top5"])
        row["images_per_second"] = train["images_per_second"]
        row["epoch_seconds"] = time.perf_counter() - t0

        scheduler.step_epoch(self._metric(row, ""), higher_is_better=self.cfg.stats.checkpoint_metric_max)
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
        """Log the epoch, update best trackers, write metrics and checkpoints (rank 0)."""
        new_best = {}
        for kind, prefix in (("model", ""), ("ema", "ema_")):
            if f"{prefix}val_top1" not in row:
                continue
            value = self._metric(row, prefix)
            if self._is_better(value, self.best[kind]):
                self.best[kind] = {"value": value, "epoch": row["epoch"], "val_top1": row[f"{prefix}val_top1"],
                                   "val_top5": row[f"{prefix}val_top5"], "train_top1": row["train_top1"]}
                new_best[kind] = True
        self._log_epoch(row)
        if not self.dist.is_main:
            return
        with open(self.path("metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        if "model" in new_best:
            self._save_weights("checkpoint_best.pt", self.parts.model.state_dict(), row, ema=False)
        if "ema" in new_best:
            self._save_weights("checkpoint_ema_best.pt", self.parts.ema.state_dict(), row, ema=True)
        self._save_last()
        write_json(self.path("summary.json"), self._summary(finished=False))
        if self._tb is not None:
            for key, value in row.items():
                if key != "epoch":
                    self._tb.add_scalar(key, value, row["epoch"])

    def _summary(self, finished: bool) -> Dict[str, Any]:
        return {
            "finished": finished,
            "epochs_done": self.progress.epoch,
            "max_epochs": self.cfg.scheduler.max_epochs,
            "params": self.params,
            "checkpoint_metric": self.cfg.stats.checkpoint_metric,
            "best": self.best["model"],
            "ema_best": self.best["ema"],
        }

    # ------------------------------------------------------------------ checkpoints
    def _common_state(self) -> Dict[str, Any]:
        return {"version": CHECKPOINT_VERSION, "config": to_dict(self.cfg), "num_classes": self.parts.num_classes,
                "wnids": list(self.parts.wnids), "params": self.params}

    def _save_weights(self, name: str, weights: Dict[str, Any], row: Dict[str, Any], ema: bool) -> None:
        state = self._common_state()
        state.update(model=weights, is_ema=ema, epoch=row["epoch"], metrics=row)
        atomic_torch_save(state, self.path(name))

    def _save_last(self) -> None:
        if not self.dist.is_main:
            return
        parts = self.parts
        state = self._common_state()
        state.update(
            model=parts.model.state_dict(),
            optimizer=parts.optimizer.state_dict(),
            scheduler=parts.scheduler.state_dict(),
            scaler=parts.scaler.state_dict() if parts.scaler is not None else None,
            ema=parts.ema.state_dict() if parts.ema is not None else None,
            epoch=self.progress.epoch,
            iteration=self.progress.iteration,
            batch_in_epoch=self.progress.batch_in_epoch,
            meter=self.progress.meter_state,
            best=self.best,
            rng=rng_state(),
        )
        atomic_torch_save(state, self.path("checkpoint_last.pt"))

    def resume(self, path: str) -> None:
        """Restore everything checkpoint_last.pt holds, so training continues exactly."""
        state = load_checkpoint(path)
        if "optimizer" not in state:
            raise ConfigError(f"{path} holds weights only, not a training state; resume from checkpoint_last.pt")
        parts = self.parts
        try:
            parts.model.load_state_dict(state["model"])
            parts.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0]
            raise ConfigError(f"{path} does not fit the model/optimizer of this config ({first}); "
                              "resume with the config the run was started with") from None
        parts.scheduler.load_state_dict(state["scheduler"])
        if parts.scaler is not None and state.get("scaler"):
            parts.scaler.load_state_dict(state["scaler"])
        if parts.ema is not None:
            if state.get("ema") is None:
                raise ConfigError(f"{path} has no EMA state but ema.enable is true; resume with --ema.enable false")
            parts.ema.load_state_dict(state["ema"])
        self.progress = Progress(epoch=state["epoch"], iteration=state["iteration"],
                                 batch_in_epoch=state["batch_in_epoch"], meter_state=state.get("meter"))
        self.best = state["best"]
        set_rng_state(state["rng"])
        logger.info("resumed from %s at epoch %d, batch %d (iteration %d)", path, state["epoch"] + 1,
                    state["batch_in_epoch"], state["iteration"])

    # ------------------------------------------------------------------ run folder, logging
    def _open_run_dir(self) -> None:
        self._handlers: List[logging.Handler] = []
        if not self.dist.is_main:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        save_config(self.cfg, self.path("config.yaml"))
        handler = logging.FileHandler(self.path("train.log"))
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        self._handlers.append(handler)
        if self.cfg.common.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("common.tensorboard needs the tensorboard package: pip install -e '.[tensorboard]'") from None
            self._tb = SummaryWriter(self.path("tensorboard"))

    def _close_run_dir(self) -> None:
        for handler in self._handlers:
            logger.removeHandler(handler)
            handler.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def _progress_bar(self, epoch: int):
        """A tqdm bar around the train loader on a terminal (rank 0); plain log lines otherwise."""
        loader = self.parts.train_loader
        if not (self.dist.is_main and sys.stdout.isatty()):
            return loader, None
        total = len(loader) - self.progress.batch_in_epoch
        if self.opts.max_iterations is not None:
            total = min(total, self.opts.max_iterations - self.progress.batch_in_epoch)
        bar = tqdm(loader, total=total, desc=f"epoch {epoch + 1}/{self.cfg.scheduler.max_epochs}",
                   leave=False, dynamic_ncols=True)
        return bar, bar

    def _log_step(self, epoch: int, stats: Dict[str, float], bar) -> None:
        if bar is not None:
            bar.set_postfix(loss=f"{stats['loss']:.3f}", top1=f"{stats['top1']:.1f}", lr=f"{stats['lr']:.2e}",
                            img_s=f"{stats['images_per_second']:.0f}")
            return
        logger.info("epoch %d batch %d: loss %.4f top1 %.2f lr %.3g %.0f img/s", epoch + 1,
                    self.progress.batch_in_epoch, stats["loss"], stats["top1"], stats["lr"], stats["images_per_second"])

    def _log_epoch(self, row: Dict[str, Any]) -> None:
        ema = f" | ema val top1 {row['ema_val_top1']:.2f}" if "ema_val_top1" in row else ""
        logger.info("epoch %d/%d: train loss %.4f top1 %.2f | val loss %.4f top1 %.2f top5 %.2f%s | %.0f img/s, %.1fs",
                    row["epoch"], self.cfg.scheduler.max_epochs, row["train_loss"], row["train_top1"], row["val_loss"],
                    row["val_top1"], row["val_top5"], ema, row["images_per_second"], row["epoch_seconds"])

    # ------------------------------------------------------------------ signals
    def _stop_requested(self) -> bool:
        if not self.dist.enabled:
            return self._signal is not None
        if self.progress.batch_in_epoch % self.opts.log_freq:
            return False  # agreeing costs a host-device sync: do it once per log interval
        # Every rank must stop after the same step, so agree on the flag.
        flag = torch.tensor([1.0 if self._signal is not None else 0.0], device=self.opts.device)
        torch.distributed.all_reduce(flag)
        if flag.item() > 0 and self._signal is None:
            self._signal = signal.SIGTERM
        return flag.item() > 0

    @contextmanager
    def _catch_signals(self) -> Iterator[None]:
        def handler(signum, frame):
            if self._signal is not None:  # a second signal: stop now
                raise KeyboardInterrupt
            self._signal = signum
            logger.warning("%s received: finishing the current step, then saving", signal.Signals(signum).name)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def load_pretrained(model: nn.Module, path: str) -> List[str]:
    """Initialise `model` from a checkpoint's weights for fine-tuning.

    Tensors whose shape differs (typically the classifier, for another number of classes)
    keep their fresh initialisation; their names are returned. Missing or unexpected keys
    mean another architecture and are an error.
    """
    weights = load_checkpoint(path)["model"]
    own = model.state_dict()
    if set(weights) != set(own):
        odd = sorted(set(weights) ^ set(own))[:3]
        raise ConfigError(f"model.checkpoint {path} holds another architecture (e.g. {', '.join(odd)}); "
                          "pick a checkpoint of the same model")
    skipped = [k for k, v in weights.items() if v.shape != own[k].shape]
    model.load_state_dict({k: v for k, v in weights.items() if k not in skipped}, strict=False)
    return skipped


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Read a checkpoint written by the Trainer, with a clear error for a missing or foreign file."""
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint not found: {path}; check the path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or not a torch file
        raise ConfigError(f"cannot read checkpoint {path}: {type(e).__name__}; is it a checkpoint of this tool?") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ConfigError(f"{path} is not a checkpoint of this tool (no model weights and config inside)")
    return state
