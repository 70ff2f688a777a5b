"""Loader builders used by the engine (re-exported by the data package; see its docstring)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Tuple, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from data.base import DATASETS
from data.collate import BatchCollator, build_collator
from data.samplers import SAMPLERS, ShardedBatchSampler, batch_sampler
from data.tinyimagenet import TinyImageNet, prepare_root
from data.transforms import Compose, build_pipeline
from options.config import ConfigError
from options.schema import Config, DatasetConfig, SamplerConfig

T = TypeVar("T")


@dataclass
class Loaders:
    train: DataLoader  # train.batch_sampler.set_epoch(epoch) before each epoch
    val: DataLoader
    num_classes: int
    class_names: List[str]  # words.txt names, in class order
    wnids: List[str]  # sorted; position = class index


def build_loaders(cfg: Config, rank: int = 0, world_size: int = 1,
                  device: torch.device = torch.device("cpu")) -> Loaders:
    """Training and validation loaders, sharded for `rank` of `world_size` processes."""
    _check_loader_settings(cfg.dataset)
    train_transform = build_pipeline(cfg.image_augmentation.train, "image_augmentation.train")
    _check_crop_sizes(cfg.sampler, train_transform)
    train_set = _rank_zero_first(rank, lambda: _dataset(cfg, "train", train_transform, rank))
    val_set = _dataset_for_eval(cfg, "val", rank)

    train_sampler = SAMPLERS.get(cfg.sampler.name)(
        len(train_set), cfg.sampler, cfg.dataset.train_batch_size,
        shuffle=True, seed=cfg.common.seed, rank=rank, world_size=world_size,
    )
    train_collate = build_collator(cfg.image_augmentation, train_set.num_classes, train=True)
    return Loaders(
        train=_loader(train_set, train_sampler, train_collate, cfg.dataset, device, cfg.common.seed),
        val=_eval_loader(cfg, val_set, rank, world_size, device),
        num_classes=train_set.num_classes,
        class_names=list(train_set.class_names),
        wnids=list(train_set.wnids),
    )


def build_eval_loader(cfg: Config, split: str, rank: int = 0, world_size: int = 1,
                      device: torch.device = torch.device("cpu")) -> Tuple[DataLoader, TinyImageNet]:
    """A loader over `split` ('train', 'val' or 'test') with the validation transforms.

    For 'test' the targets are dataset indices: dataset.file_names[i] names each image.
    """
    _check_loader_settings(cfg.dataset)
    dataset = _dataset_for_eval(cfg, split, rank)
    return _eval_loader(cfg, dataset, rank, world_size, device), dataset


# ----------------------------------------------------------------------------- pieces
def _dataset(cfg: Config, split: str, transform: Compose, rank: int) -> TinyImageNet:
    prepare_root(cfg.dataset, progress=rank == 0)
    dataset_cls = DATASETS.get(cfg.dataset.name)
    return dataset_cls.from_config(cfg.dataset, split, transform, cfg.sampler.crop_size, progress=rank == 0)


def _dataset_for_eval(cfg: Config, split: str, rank: int) -> TinyImageNet:
    transform = build_pipeline(cfg.image_augmentation.val, "image_augmentation.val")
    return _rank_zero_first(rank, lambda: _dataset(cfg, split, transform, rank))


def _eval_loader(cfg: Config, dataset: TinyImageNet, rank: int, world_size: int, device: torch.device) -> DataLoader:
    # Not shuffled, fixed size, and uneven shards allowed: every sample is seen exactly once
    # across ranks, so summing per-rank totals gives exact metrics.
    sampler = batch_sampler(len(dataset), cfg.sampler, cfg.dataset.val_batch_size,
                            shuffle=False, rank=rank, world_size=world_size, even=False)
    collate = build_collator(cfg.image_augmentation, dataset.num_classes, train=False)
    return _loader(dataset, sampler, collate, cfg.dataset, device, cfg.common.seed)


def _loader(dataset: TinyImageNet, sampler: ShardedBatchSampler, collate: BatchCollator,
            cfg: DatasetConfig, device: torch.device, seed: int) -> DataLoader:
    workers = cfg.workers
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        # The batches seed their own augmentations; a private generator for the loader's worker
        # base seed keeps iterating from advancing the caller's (the training loop's) RNG.
        generator=torch.Generator().manual_seed(seed),
        num_workers=workers,
        pin_memory=cfg.pin_memory and device.type == "cuda",
        persistent_workers=cfg.persistent_workers and workers > 0,
        prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
    )


def _rank_zero_first(rank: int, build: Callable[[], T]) -> T:
    """Run build() on rank 0 before the other ranks (download, unpack, write caches once)."""
    distributed = dist.is_available() and dist.is_initialized()
    if distributed and rank != 0:
        dist.barrier()
    result = build()
    if distributed and rank == 0:
        dist.barrier()
    return result


def _check_loader_settings(cfg: DatasetConfig) -> None:
    for key in ("train_batch_size", "val_batch_size", "prefetch_factor"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"dataset.{key}: {getattr(cfg, key)} must be >= 1")
    if cfg.workers < 0:
        raise ConfigError(f"dataset.workers: {cfg.workers} must be >= 0 (0 loads in the main process)")


def _check_crop_sizes(sampler: SamplerConfig, train_transform: Compose) -> None:
    if sampler.name == "variable_batch_sampler" and not train_transform.uses_crop_size:
        raise ConfigError(
            "sampler.name: variable_batch_sampler varies the crop size, but no transform in "
            "image_augmentation.train follows it; add random_resized_crop (or center_crop without "
            "a size) or use sampler.name: batch_sampler"
        )
