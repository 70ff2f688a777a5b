"""The training and evaluation loops as plain functions; the Trainer only orchestrates them."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from engine.ema import ModelEMA
from engine.utils import DistInfo, Meter


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class LoopOptions:
    """How each step runs; fixed for the whole run."""

    device: torch.device
    channels_last: bool = False
    autocast_dtype: Optional[torch.dtype] = None
    accum_freq: int = 1
    grad_clip: Optional[float] = None
    log_freq: int = 50
    max_iterations: Optional[int] = None  # batches per epoch, for debugging


@dataclass
class Progress:
    """Where training stands; saved in checkpoint_last.pt."""

    epoch: int = 0  # completed epochs
    iteration: int = 0  # optimizer steps taken
    batch_in_epoch: int = 0  # batches of the current epoch already trained (mid-epoch resume)
    stop_requested: bool = False
    meter_state: Optional[dict] = field(default=None, repr=False)


def autocast(opts: LoopOptions):
    if opts.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(opts.device.type, dtype=opts.autocast_dtype)


def to_device(images: torch.Tensor, targets: torch.Tensor, opts: LoopOptions):
    """A batch on opts.device in the model's memory format.

    Batch contract (data/__init__.py): images float32 [B, 3, h, w], already scaled (and mixed,
    normalised). Loaders built for a CUDA device deliver them there already, converted from
    uint8 on the device; then `.to` is a no-op and only the layout change runs, on the device.
    """
    fmt = torch.channels_last if opts.channels_last else torch.contiguous_format
    images = images.to(opts.device, non_blocking=True).contiguous(memory_format=fmt)
    return images, targets.to(opts.device, non_blocking=True)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_at: Callable[[int], float],
    progress: Progress,
    opts: LoopOptions,
    *,
    dist_info: DistInfo = DistInfo(),
    scaler: Optional[torch.amp.GradScaler] = None,
    ema: Optional[ModelEMA] = None,
    should_stop: Callable[[], bool] = lambda: False,
    on_log: Callable[[Dict[str, float]], None] = lambda stats: None,
) -> Dict[str, float]:
    """Train over `loader` (which already skips `progress.batch_in_epoch` batches).

    Updates `progress` in place. Returns loss/top1/top5 over the epoch's batches and
    images_per_second. Stops early, with progress.stop_requested set, when `should_stop()`
    turns true after a step.
    """
    model.train()
    criterion.train()
    meter = Meter(opts.device)
    if progress.meter_state is not None:
        meter.load_state_dict(progress.meter_state)
        progress.meter_state = None
    nonfinite = torch.zeros((), dtype=torch.bool, device=opts.device)
    images_seen, start = 0, time.perf_counter()
    optimizer.zero_grad(set_to_none=True)

    for images, targets in loader:
        if opts.max_iterations is not None and progress.batch_in_epoch >= opts.max_iterations:
            break
        images, targets = to_device(images, targets, opts)
        step_now = (progress.batch_in_epoch + 1) % opts.accum_freq == 0
        # Under DDP, gradients are only all-reduced on the micro-batch that steps.
        sync = contextlib.nullcontext() if step_now or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(opts):
                logits = model(images)
                loss = criterion(logits, targets)
            scaled = loss / opts.accum_freq
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        nonfinite |= ~torch.isfinite(loss.detach())
        meter.update(logits.detach().float(), targets, loss.detach().float())
        images_seen += images.shape[0]
        progress.batch_in_epoch += 1

        if step_now:
            _optimizer_step(model, optimizer, scaler, lr_at(progress.iteration), opts.grad_clip)
            progress.iteration += 1
            if ema is not None:
                ema.update()

        if progress.batch_in_epoch % opts.log_freq == 0:
            _raise_if_nonfinite(nonfinite, progress)
            stats = meter.compute()
            stats["lr"] = optimizer.param_groups[0]["lr"]
            stats["images_per_second"] = images_seen / max(time.perf_counter() - start, 1e-9)
            on_log(stats)
        if should_stop():
            progress.stop_requested = True
            break

    _raise_if_nonfinite(nonfinite, progress)
    if opts.device.type == "cuda":
        torch.cuda.synchronize(opts.device)
    elapsed = time.perf_counter() - start
    if progress.stop_requested:
        progress.meter_state = meter.state_dict()
    stats = meter.compute(dist_info)
    stats["images_per_second"] = images_seen * dist_info.world_size / max(elapsed, 1e-9)
    return stats


def _optimizer_step(model, optimizer, scaler, lr: float, grad_clip: Optional[float]) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
    if grad_clip is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _raise_if_nonfinite(flag: torch.Tensor, progress: Progress) -> None:
    if bool(flag):
        raise NonFiniteLossError(
            f"training loss became NaN/inf in epoch {progress.epoch + 1} (by batch {progress.batch_in_epoch}); "
            "lower the learning rate or set --common.grad-clip"
        )


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable, opts: LoopOptions, dist_info: DistInfo = DistInfo()
) -> Dict[str, float]:
    """Plain cross entropy, top-1 and top-5 over the loader (summed over ranks)."""
    model.eval()
    meter = Meter(opts.device)
    for images, labels in loader:
        images, labels = to_device(images, labels, opts)
        with autocast(opts):
            logits = model(images)
        logits = logits.float()
        meter.update(logits, labels, F.cross_entropy(logits, labels))
    return meter.compute(dist_info)

