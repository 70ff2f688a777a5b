"""The training and evaluation loops as plain functions; the Trainer only orchestrates them."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from engine.ema import ModelEMA
from engine.utils import DistInfo, Meter

# common.mixed_precision -> the autocast dtype (None: full precision)
AUTOCAST_DTYPES: Dict[str, Optional[torch.dtype]] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def optimizer_steps(batches: int, accum_freq: int) -> int:
    """Optimizer steps taken over `batches` micro-batches: one per accum_freq of them, and one
    more for a shorter group at the end, so that no micro-batch's gradient is thrown away.

    The training loop, the scheduler's run length and resume all count steps with this."""
    return -(-batches // accum_freq)


def group_size(batch: int, batches: int, accum_freq: int) -> int:
    """Micro-batches in the optimizer step that micro-batch `batch` (from 0) belongs to."""
    return min(accum_freq, batches - batch // accum_freq * accum_freq)


@dataclass
class LoopOptions:
    """How each step runs; fixed for the whole run."""

    device: torch.device
    channels_last: bool = False
    autocast_dtype: Optional[torch.dtype] = None
    accum_freq: int = 1
    grad_clip: Optional[float] = None
    log_every_batches: int = 50


@dataclass
class Progress:
    """Where training stands; saved in checkpoint_last.pt."""

    epoch: int = 0  # completed epochs
    iteration: int = 0  # optimizer steps taken
    batch_in_epoch: int = 0  # batches of the current epoch already trained (mid-epoch resume)
    stop_requested: bool = False
    meter_state: Optional[dict] = field(default=None, repr=False)

    def state_dict(self) -> Dict[str, object]:
        return {"epoch": self.epoch, "iteration": self.iteration, "batch_in_epoch": self.batch_in_epoch,
                "meter": self.meter_state}

    @classmethod
    def from_state(cls, state: Dict[str, object]) -> "Progress":
        return cls(epoch=int(state["epoch"]), iteration=int(state["iteration"]),
                   batch_in_epoch=int(state["batch_in_epoch"]), meter_state=state.get("meter"))


def autocast(opts: LoopOptions):
    if opts.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(opts.device.type, dtype=opts.autocast_dtype)


def to_device(images: torch.Tensor, targets: torch.Tensor, opts: LoopOptions):
    """A batch on opts.device in the model's memory format (a no-op move when the data
    pipeline already built it there)."""
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
    epoch_batches: int,
    *,
    dist_info: DistInfo = DistInfo(),
    scaler: Optional[torch.amp.GradScaler] = None,
    ema: Optional[ModelEMA] = None,
    should_stop: Callable[[], bool] = lambda: False,
    on_log: Callable[[Dict[str, float]], None] = lambda stats: None,
) -> Dict[str, float]:
    """Train the batches progress.batch_in_epoch .. epoch_batches - 1 of the epoch (`loader`
    yields them, already skipping the ones trained before a resume).

    The loss is `criterion(logits, targets, images)` (loss_fn/registry.py). Gradients of
    opts.accum_freq micro-batches are summed into one optimizer step, each loss scaled by the
    size of its group (the last group of an epoch may be shorter). Updates
    `progress` in place. Returns loss/top1/top5 over the epoch's batches and
    images_per_second. Stops early, after a step, with progress.stop_requested set, when
    `should_stop()` turns true.
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
    batches = iter(loader)

    while progress.batch_in_epoch < epoch_batches:
        images, targets = to_device(*next(batches), opts)
        batch = progress.batch_in_epoch
        step_now = (batch + 1) % opts.accum_freq == 0 or batch + 1 == epoch_batches
        # Under DDP, gradients are only all-reduced on the micro-batch that steps.
        sync = contextlib.nullcontext() if step_now or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(opts):
                logits = model(images)
                loss = criterion(logits, targets, images)
            scaled = loss / group_size(batch, epoch_batches, opts.accum_freq)
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

        if progress.batch_in_epoch % opts.log_every_batches == 0:
            _raise_if_nonfinite(nonfinite, progress)
            stats = meter.compute()
            stats["lr"] = optimizer.param_groups[0]["lr"]
            stats["images_per_second"] = images_seen / max(time.perf_counter() - start, 1e-9)
            on_log(stats)
        # Only between optimizer steps: a stop mid-group would lose the group's gradients.
        if step_now and progress.batch_in_epoch < epoch_batches and should_stop():
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
    stats["seconds"] = elapsed
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
def predict(model: nn.Module, loader: Iterable, opts: LoopOptions) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(float logits [B, C], the loader's targets) of every batch, the model in eval mode."""
    model.eval()
    for images, targets in loader:
        images, targets = to_device(images, targets, opts)
        with autocast(opts):
            logits = model(images)
        yield logits.float(), targets


def evaluate(
    model: nn.Module, loader: Iterable, opts: LoopOptions, dist_info: DistInfo = DistInfo()
) -> Dict[str, float]:
    """Plain cross entropy, top-1 and top-5 over the loader (summed over ranks)."""
    meter = Meter(opts.device)
    for logits, labels in predict(model, loader, opts):
        meter.update(logits, labels, F.cross_entropy(logits, labels))
    return meter.compute(dist_info)
