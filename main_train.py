"""Train a model from a YAML config.

    python main_train.py --common.config-file config/mobilevit_tiny.yaml [--section.key value ...]
    torchrun --nproc_per_node 2 main_train.py --common.config-file ...    (DDP)
"""
from __future__ import annotations

import logging
import math
import os
import sys
from typing import Optional, Sequence

import torch

from options.cli import fail, parse_args, run_or_exit
from options.config import ConfigError
from options.schema import Config

logger = logging.getLogger("cvnets")


def run_dir_for(cfg: Config) -> str:
    label = cfg.common.run_label
    if label is None:
        label = os.path.splitext(os.path.basename(cfg.common.config_file))[0] if cfg.common.config_file else "run"
    return os.path.join(cfg.common.results_loc, label)


def find_resume_path(cfg: Config, run_dir: str) -> Optional[str]:
    """The checkpoint to continue from, or None for a fresh run (refusing to clobber an old one)."""
    last = os.path.join(run_dir, "checkpoint_last.pt")
    resume = cfg.common.resume
    if resume == "auto":
        return last if os.path.isfile(last) else None
    if resume is not None:
        return resume
    if os.path.isfile(last):
        raise ConfigError(
            f"{run_dir} already holds a run; continue it with --common.resume auto "
            "or start another with --common.run-label NAME"
        )
    return None


def build_trainer(cfg: Config):
    """Build every component the config names and return a ready Trainer."""
    import cvnets
    import data
    import loss_fn
    import optim
    from engine.ema import ModelEMA
    from engine.loops import LoopOptions
    from engine.trainer import Components, Trainer, load_pretrained
    from engine.utils import init_distributed, resolve_device, seed_everything

    common = cfg.common
    device = resolve_device(common.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist_info = init_distributed(device)
    if common.mixed_precision == "fp16" and device.type != "cuda":
        raise ConfigError("common.mixed_precision: fp16 needs CUDA; use bf16 or none on the CPU")
    seed_everything(common.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes per crop size: let cuDNN pick its fastest kernels

    run_dir = run_dir_for(cfg)
    resume_path = find_resume_path(cfg, run_dir)
    loaders = data.build_loaders(cfg, rank=dist_info.rank, world_size=dist_info.world_size, device=device)
    model = cvnets.build_model(cfg.model, loaders.num_classes)
    if cfg.model.checkpoint is not None and resume_path is None:
        skipped = load_pretrained(model, cfg.model.checkpoint)
        logger.info("initialised from %s%s", cfg.model.checkpoint,
                    f" (kept fresh, shapes differ: {', '.join(skipped)})" if skipped else "")
    if dist_info.enabled and common.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    fmt = torch.channels_last if common.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=fmt)

    train_model = model
    if dist_info.enabled:
        ids = [device.index] if device.type == "cuda" else None
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if common.compile:
        train_model = torch.compile(train_model)

    steps_per_epoch = math.ceil(len(loaders.train) / common.accum_freq)
    if common.max_iterations_per_epoch is not None:
        steps_per_epoch = math.ceil(min(len(loaders.train), common.max_iterations_per_epoch) / common.accum_freq)
    parts = Components(
        model=model,
        train_model=train_model,
        train_loader=loaders.train,
        val_loader=loaders.val,
        criterion=loss_fn.build_loss(cfg.loss),
        optimizer=optim.build_optimizer(model, cfg.optim),
        scheduler=optim.build_scheduler(cfg.scheduler, steps_per_epoch),
        num_classes=loaders.num_classes,
        wnids=loaders.wnids,
        scaler=torch.amp.GradScaler("cuda") if common.mixed_precision == "fp16" else None,
        ema=ModelEMA(model, cfg.ema.momentum) if cfg.ema.enable else None,
    )
    autocast = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[common.mixed_precision]
    opts = LoopOptions(device=device, channels_last=common.channels_last, autocast_dtype=autocast,
                       accum_freq=common.accum_freq, grad_clip=common.grad_clip, log_freq=common.log_freq,
                       max_iterations=common.max_iterations_per_epoch)
    trainer = Trainer(cfg, parts, opts, run_dir, dist_info)
    if resume_path is not None:
        trainer.resume(resume_path)
    return trainer


def setup_logging(rank: int) -> None:
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Train; returns the run folder. User errors exit 2 with one line."""
    from engine.loops import NonFiniteLossError
    from engine.trainer import TrainingInterrupted

    cfg = parse_args(argv, prog="main_train.py", description=__doc__)
    setup_logging(int(os.environ.get("RANK", "0")))
    trainer = run_or_exit(lambda: build_trainer(cfg))
    try:
        run_or_exit(trainer.run)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # no rank tears the group down while rank 0 still writes
    except NonFiniteLossError as e:
        fail(f"{e}; checkpoint_last.pt still holds the last good epoch", status=1)
    except TrainingInterrupted as e:
        logger.warning(str(e))
        raise SystemExit(128 + e.signum)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return trainer.run_dir


if __name__ == "__main__":
    main()
