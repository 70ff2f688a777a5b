"""Loader builders used by the engine (re-exported by the data package; see its docstring).

Three kinds of loader, all iterables of (images, targets) with `batch_sampler`, `dataset` and
len(): a DataLoader (CPU training: workers decode, augment and convert to float); the same
wrapped in DeviceFinishedLoader when feeding a CUDA device (workers ship uint8 batches, the
device converts them); and DeviceCachedLoader for `dataset.cache: gpu` (data/gpu_cache.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple, TypeVar, Union

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from data.base import DATASETS
from data.collate import Batch, BatchCollator, build_collator
from data.gpu_cache import DeviceCachedLoader, build_batch_pipeline
from data.samplers import SAMPLERS, ShardedBatchSampler, batch_sampler
from data.tinyimagenet import TinyImageNet, prepare_root
from data.transforms import Compose, build_pipeline
from options.config import ConfigError
from options.schema import Config, DatasetConfig, SamplerConfig

T = TypeVar("T")
# `dataset.cache: gpu` stages the decoded split through the disk cache: it is decoded once for
# all runs and all DDP ranks (rank 0 writes it), then each rank uploads it to its device.
_GPU_STAGING_CACHE = "disk"


class DeviceFinishedLoader:
    """A DataLoader whose collator defers its float conversion, mixing and normalisation
    (BatchCollator.finish) to `device`: the workers ship uint8 batches, a quarter of the bytes
    to pin and copy, and the host does no per-pixel float work."""

    def __init__(self, loader: DataLoader, device: torch.device) -> None:
        self.loader, self.device = loader, device

    @property
    def batch_sampler(self) -> ShardedBatchSampler:
        return self.loader.batch_sampler

    @property
    def dataset(self) -> TinyImageNet:
        return self.loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        finish = self.loader.collate_fn.finish
        for images, labels, seed in self.loader:
            # Pinned by the DataLoader (dataset.pin_memory), so both copies are asynchronous.
            yield finish(images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True), seed)


BatchLoader = Union[DataLoader, DeviceFinishedLoader, DeviceCachedLoader]


@dataclass
class Loaders:
    train: BatchLoader  # train.batch_sampler.set_epoch(epoch) before each epoch
    val: BatchLoader
    num_classes: int
    class_names: List[str]  # words.txt names, in class order
    wnids: List[str]  # sorted; position = class index


def build_loaders(cfg: Config, rank: int = 0, world_size: int = 1,
                  device: torch.device = torch.device("cpu")) -> Loaders:
    """Training and validation loaders, sharded for `rank` of `world_size` processes."""
    _check_loader_settings(cfg)
    train_transform = build_pipeline(cfg.image_augmentation.train, "image_augmentation.train")
    _check_crop_sizes(cfg.sampler, train_transform)
    train_set = _rank_zero_first(rank, lambda: _dataset(cfg, "train", train_transform, rank))
    val_set = _dataset_for_eval(cfg, "val", rank)

    train_sampler = SAMPLERS.get(cfg.sampler.name)(
        len(train_set), cfg.sampler, cfg.dataset.train_batch_size,
        shuffle=True, seed=cfg.common.seed, rank=rank, world_size=world_size,
    )
    return Loaders(
        train=_loader(cfg, train_set, train_sampler, device, train=True),
        val=_eval_loader(cfg, val_set, rank, world_size, device),
        num_classes=train_set.num_classes,
        class_names=list(train_set.class_names),
        wnids=list(train_set.wnids),
    )


def build_eval_loader(cfg: Config, split: str, rank: int = 0, world_size: int = 1,
                      device: torch.device = torch.device("cpu")) -> Tuple[BatchLoader, TinyImageNet]:
    """A loader over `split` ('train', 'val' or 'test') with the validation transforms.

    For 'test' the targets are dataset indices: dataset.file_names[i] names each image.
    """
    _check_loader_settings(cfg)
    dataset = _dataset_for_eval(cfg, split, rank)
    return _eval_loader(cfg, dataset, rank, world_size, device), dataset


# ----------------------------------------------------------------------------- pieces
def _dataset(cfg: Config, split: str, transform: Compose, rank: int) -> TinyImageNet:
    prepare_root(cfg.dataset, progress=rank == 0)
    dataset_cls = DATASETS.get(cfg.dataset.name)
    data_cfg: DatasetConfig = cfg.dataset
    per_image: Optional[Compose] = transform
    if data_cfg.cache == "gpu":  # the device transforms whole batches instead of the per-image pipeline
        data_cfg, per_image = dataclasses.replace(data_cfg, cache=_GPU_STAGING_CACHE), None
    return dataset_cls.from_config(data_cfg, split, per_image, cfg.sampler.crop_size, progress=rank == 0)


def _dataset_for_eval(cfg: Config, split: str, rank: int) -> TinyImageNet:
    transform = build_pipeline(cfg.image_augmentation.val, "image_augmentation.val")
    return _rank_zero_first(rank, lambda: _dataset(cfg, split, transform, rank))


def _eval_loader(cfg: Config, dataset: TinyImageNet, rank: int, world_size: int, device: torch.device) -> BatchLoader:
    # Not shuffled, fixed size, and uneven shards allowed: every sample is seen exactly once
    # across ranks, so summing per-rank totals gives exact metrics.
    sampler = batch_sampler(len(dataset), cfg.sampler, cfg.dataset.val_batch_size,
                            shuffle=False, rank=rank, world_size=world_size, even=False)
    return _loader(cfg, dataset, sampler, device, train=False)


def _loader(cfg: Config, dataset: TinyImageNet, sampler: ShardedBatchSampler, device: torch.device,
            train: bool, defer_finish: Optional[bool] = None) -> BatchLoader:
    """The loader of the train (mixing allowed) or an evaluation split.

    defer_finish: ship uint8 batches and finish them on `device`; default: when it is a CUDA device.
    """
    if cfg.dataset.cache == "gpu":
        where = "image_augmentation.train" if train else "image_augmentation.val"
        augmentation = cfg.image_augmentation.train if train else cfg.image_augmentation.val
        collator = build_collator(cfg.image_augmentation, dataset.num_classes, train)
        return DeviceCachedLoader.upload(dataset, sampler, build_batch_pipeline(augmentation, where), collator, device)
    if defer_finish is None:
        defer_finish = device.type == "cuda"
    collator = build_collator(cfg.image_augmentation, dataset.num_classes, train, defer_finish)
    loader = _data_loader(dataset, sampler, collator, cfg.dataset, device, cfg.common.seed)
    return DeviceFinishedLoader(loader, device) if defer_finish else loader


def _data_loader(dataset: TinyImageNet, sampler: ShardedBatchSampler, collate: BatchCollator,
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


def _check_loader_settings(cfg: Config) -> None:
    data_cfg = cfg.dataset
    for key in ("train_batch_size", "val_batch_size", "prefetch_factor"):
        if getattr(data_cfg, key) < 1:
            raise ConfigError(f"dataset.{key}: {getattr(data_cfg, key)} must be >= 1")
    if data_cfg.workers < 0:
        raise ConfigError(f"dataset.workers: {data_cfg.workers} must be >= 0 (0 loads in the main process)")
    if data_cfg.cache == "gpu":  # before any decoding: every transform must have a batched form
        build_batch_pipeline(cfg.image_augmentation.train, "image_augmentation.train")
        build_batch_pipeline(cfg.image_augmentation.val, "image_augmentation.val")


def _check_crop_sizes(sampler: SamplerConfig, train_transform: Compose) -> None:
    if sampler.name == "variable_batch_sampler" and not train_transform.uses_crop_size:
        raise ConfigError(
            "sampler.name: variable_batch_sampler varies the crop size, but no transform in "
            "image_augmentation.train follows it; add random_resized_crop (or center_crop without "
            "a size) or use sampler.name: batch_sampler"
        )
