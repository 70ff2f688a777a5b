"""From a validated config to a ready Trainer, in two steps.

`setup_process(cfg)` does what a process does once (pick the device, join the process group,
seed the generators, set the CUDA backend flags); `build_trainer(cfg, process)` only builds
components (data, model, loss, optimizer, schedule, EMA) and touches no global state, so a
benchmark can build several trainers in one process. `check_config(cfg)` runs every
component's own settings check before any of that, so a bad value is reported in one line
before data or models are touched (also by --print-config).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

import cvnets
import data
import loss_fn
import optim
from cvnets.fuse import fold_batchnorm
from engine import checkpoint as ckpt
from engine.ema import ModelEMA
from engine.loggers import check_trackers
from engine.loops import AUTOCAST_DTYPES, LoopOptions, optimizer_steps
from engine.run_folder import RESTART
from engine.teacher import check_teacher_path, load_teacher
from engine.trainer import Components, Trainer
from engine.utils import DistInfo, init_distributed, resolve_device, seed_everything
from options.config import override
from options.schema import Config

logger = logging.getLogger("cvnets")


@dataclass(frozen=True)
class Process:
    """What setup_process decided for this process."""

    device: torch.device
    dist: DistInfo


def check_config(cfg: Config, training: bool = True) -> None:
    """Every check that needs a component's knowledge: a ValueError naming the key (the entry points
    make it one line and exit status 2).

    training=False (main_eval, main_export) skips what only training needs: the teacher file and
    the packages of the experiment trackers."""
    cvnets.check_config(cfg.model)
    data.check_config(cfg)
    optim.check_config(cfg)
    if training:
        check_teacher_path(cfg)
        check_trackers(cfg)


def with_absolute_paths(cfg: Config) -> Config:
    """cfg with its dataset paths made absolute, as the run stores them (config.yaml and every
    checkpoint): main_eval and main_export then find the run's data from any folder."""
    d = cfg.dataset
    paths = {f"dataset.{key}": os.path.abspath(value) for key, value in
             (("root", d.root), ("cache_dir", d.cache_dir), ("archive", d.archive)) if value is not None}
    return override(cfg, paths)


def check_startable(cfg: Config) -> None:
    """What training needs from the machine and the disk, checked before the run folder is
    made: the checkpoint files it names exist, and the device it asks for is there."""
    for key, path in (("model.checkpoint", cfg.model.checkpoint), ("common.resume", cfg.common.resume)):
        if path not in (None, "auto", RESTART) and not os.path.isfile(path):
            raise ValueError(f"{key}: {path} does not exist; give the path of a checkpoint_*.pt file"
                             + (" (or auto: continue this run folder's own)" if key == "common.resume" else ""))
    if cfg.common.device == "cuda" and not torch.cuda.is_available():
        resolve_device("cuda")  # its ValueError says what to use instead


def check_fits_dataset(cfg: Config, train_images: int, classes: int, world_size: int) -> None:
    """ValueError when the batch or the classifier cannot fit the dataset: a batch larger than a
    process's share of the training images would repeat images within the batch, and fewer
    outputs than classes would fail at the first label beyond them."""
    share = train_images // world_size
    batch = cfg.dataset.train_batch_size
    if batch > share:
        per = f" shared by {world_size} processes ({share:,} each)" if world_size > 1 else ""
        raise ValueError(f"dataset.train_batch_size: {batch:,} is larger than the dataset's {train_images:,} "
                         f"training images{per}; set it to at most {share:,}")
    wanted = cfg.model.num_classes
    if wanted is not None and wanted < classes:
        raise ValueError(f"model.num_classes: {wanted} is smaller than the dataset's {classes} classes; set it to "
                         f"at least {classes}, or null to take the dataset's")


def setup_process(cfg: Config) -> Process:
    """Once per process: device, process group (under torchrun), seeds and backend flags."""
    device = resolve_device(cfg.common.device, int(os.environ.get("LOCAL_RANK", "0")))
    if cfg.common.mixed_precision == "fp16" and device.type != "cuda":
        raise ValueError("common.mixed_precision: fp16 needs CUDA; use bf16 or none on the CPU")
    dist_info = init_distributed(device)
    seed_everything(cfg.common.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes per crop size: let cuDNN pick its fastest kernels
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for the fp32 parts (attention, linears)
    return Process(device, dist_info)


def describe_process(process: Process) -> str:
    """The software and hardware a run ran on, for its log: what a result needs to be compared."""
    import platform

    import torchvision

    device = process.device.type
    if device == "cuda":
        device = f"cuda ({torch.cuda.get_device_name(process.device)}, CUDA {torch.version.cuda})"
    return (f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}; "
            f"device {device}; world size {process.dist.world_size}")


def run_dir_for(cfg: Config) -> str:
    """<results_loc>/<run_label>, the label defaulting to the config file's stem."""
    label = cfg.common.run_label
    if label is None:
        label = os.path.splitext(os.path.basename(cfg.common.config_file))[0] if cfg.common.config_file else "run"
    return os.path.join(cfg.common.results_loc, label)


def seeded_model(cfg: Config, num_classes: int) -> nn.Module:
    """The model with initial weights drawn from common.seed alone, on a private generator.

    Whatever ran before (a decoded cache built, a dataset generated or downloaded) may have drawn
    from torch's global generator; the initial weights must not depend on it, or a speed setting
    such as dataset.cache would change the run. The global generator is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.common.seed)
        return cvnets.build_model(cfg.model, num_classes)


def build_criterion(cfg: Config, wnids: Sequence[str],
                    device: torch.device) -> Tuple[nn.Module, Optional[Dict[str, str]]]:
    """(the training loss, the teacher's {"path", "sha256"} or None). Distillation's teacher is
    loaded here, once the dataset is known: its class list must be the teacher's."""
    if cfg.loss.name != "distillation":
        return loss_fn.build_loss(cfg.loss), None
    teacher, identity = load_teacher(cfg, wnids, device)
    logger.info("distilling from %s (%s, %s parameters, weights sha256 %s)", identity["path"],
                type(teacher.model).__name__, f"{sum(p.numel() for p in teacher.parameters()):,}",
                identity["sha256"][:12])
    return loss_fn.build_loss(cfg.loss, teacher), identity


def build_trainer(cfg: Config, process: Process) -> Trainer:
    """Build every component the config names and return a Trainer (no global state changes)."""
    common, device, dist_info = cfg.common, process.device, process.dist
    loaders = data.build_loaders(cfg, rank=dist_info.rank, world_size=dist_info.world_size, device=device)
    check_fits_dataset(cfg, len(loaders.train.dataset), loaders.num_classes, dist_info.world_size)
    model = seeded_model(cfg, loaders.num_classes)
    if cfg.model.checkpoint is not None:
        loaded = ckpt.load_pretrained(model, cfg.model.checkpoint, cfg.model)
        logger.info(loaded.describe(cfg.model.checkpoint, loaders.num_classes if cfg.model.num_classes is None
                                    else cfg.model.num_classes))
        other = ckpt.class_list_difference(loaded.wnids, loaders.wnids)
        if other:  # fine-tuning onto other classes is what --model.checkpoint is for; say it
            logger.info("fine-tuning %s on another class list (%s)", cfg.model.checkpoint, other)
    if cfg.model.freeze == "backbone":
        model.freeze_backbone()
        logger.info("backbone frozen: training the classifier alone (%d parameters)",
                    sum(p.numel() for p in model.parameters() if p.requires_grad))
    if dist_info.enabled and common.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    fmt = torch.channels_last if common.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=fmt)

    train_model: nn.Module = model
    if dist_info.enabled:
        ids = [device.index] if device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if common.compile:
        train_model = torch.compile(train_model)

    sampler = loaders.train.batch_sampler
    cap = common.max_batches_per_epoch

    def epoch_batches(epoch: int) -> int:
        length = sampler.epoch_length(epoch)
        return length if cap is None else min(length, cap)

    # The exact number of optimizer steps of the whole run, so iteration-based schedules end
    # on their last value at the last step even when epoch lengths vary (variable batch sampler).
    total_steps = sum(optimizer_steps(epoch_batches(e), common.accum_freq) for e in range(cfg.scheduler.max_epochs))
    scheduler = optim.build_scheduler(cfg.scheduler, total_steps)
    criterion, teacher = build_criterion(cfg, loaders.wnids, device)
    parts = Components(
        model=model,
        train_model=train_model,
        train_loader=loaders.train,
        val_loader=loaders.val,
        criterion=criterion,
        optimizer=optim.build_optimizer(model, cfg.optim),
        scheduler=scheduler,
        num_classes=loaders.num_classes,
        wnids=loaders.wnids,
        class_names=loaders.class_names,
        epoch_batches=epoch_batches,
        scaler=torch.amp.GradScaler("cuda") if common.mixed_precision == "fp16" else None,
        ema=ModelEMA(model, cfg.ema.momentum, cfg.ema.warmup) if cfg.ema.enable else None,
        eval_copy=lambda module: fold_batchnorm(module)[0],  # evaluation without BatchNorm passes
        teacher=teacher,
    )
    opts = LoopOptions(device=device, channels_last=common.channels_last,
                       autocast_dtype=AUTOCAST_DTYPES[common.mixed_precision], accum_freq=common.accum_freq,
                       grad_clip=common.grad_clip, log_every_batches=common.log_every_batches)
    return Trainer(cfg, parts, opts, dist_info)
