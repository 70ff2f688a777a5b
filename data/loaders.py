"""The engine's entry points: check_config, build_loaders, build_eval_loader (see data/__init__.py).

One loader type, Loader, in three arrangements, chosen by `dataset.augment_on` (auto = device
on CUDA, workers otherwise) and `dataset.cache`:

- workers: DataLoader workers read the pixels and run the whole batch pipeline; batches come
  out on the CPU (pinned when feeding CUDA) and the engine moves them;
- device, cache none: the workers only decode and ship uint8 batches (a quarter of the bytes);
  the pipeline runs on the training device;
- device, cache memory or disk: the decoded split is uploaded to the device once and each
  batch is gathered there by index: no workers, no per-batch host copies.

The pipeline and its random draws are the same in all three (data/augment.py), so the same
seed gives the same batches up to float rounding.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, Optional, Tuple, TypeVar, Union

import torch
import torch.distributed as dist

from data.augment import Augmentation, Batch, build_augmentation
from data.base import DATASETS, IMAGE_SIZE, RawBatch, WorkerDataLoader, logger, on_device, worker_init
from data.samplers import SAMPLERS, ShardedBatchSampler, batch_sampler, vbs_schedule
from data.tinyimagenet import TinyImageNet, prepare_root
from options.schema import Config

T = TypeVar("T")
_UPLOAD_CHUNK = 4096  # images staged on the host at a time while uploading a split


class Loader:
    """Batches (images float32 [B, 3, h, w], targets) of one split, in the sampler's order.

    batch_sampler: set_epoch(epoch, start_batch) before iterating, epoch_length(epoch);
    len(): batches of the current epoch; device: where the batches arrive (the training
    device with device placement, the CPU with worker placement); dataset: the split.
    """

    def __init__(self, dataset: TinyImageNet, batch_sampler: ShardedBatchSampler,
                 batches: Iterable[Union[Batch, RawBatch]], finish: Optional[Augmentation],
                 device: torch.device) -> None:
        self.dataset, self.batch_sampler, self.device = dataset, batch_sampler, device
        self._batches, self._finish = batches, finish  # finish: the pipeline, when it runs here

    @property
    def placement(self) -> str:
        return "workers" if self._finish is None else "device"

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[Batch]:
        if self._finish is None:
            yield from self._batches
            return
        for raw in self._batches:
            yield self._finish(raw.to(self.device))


class DeviceSplit:
    """A decoded split held whole on a device; iterating yields the sampler's RawBatches there."""

    def __init__(self, dataset: TinyImageNet, batch_sampler: ShardedBatchSampler, device: torch.device) -> None:
        self.batch_sampler = batch_sampler
        # [N, 64, 64, 3] uint8 (1.2 GB for TinyImageNet's train split), filled chunk by chunk so
        # that the host never holds a second full copy
        self.images = torch.empty((len(dataset), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8, device=device)
        self.targets = torch.empty(len(dataset), dtype=torch.int64, device=device)
        for rows, pixels, targets in dataset.chunks(_UPLOAD_CHUNK):
            self.images[rows] = torch.from_numpy(pixels).to(device)
            self.targets[rows] = torch.from_numpy(targets).to(device)

    def __iter__(self) -> Iterator[RawBatch]:
        device = self.images.device
        for spec in self.batch_sampler:
            index = on_device(spec.indices, device, torch.int64)
            # [B, 64, 64, 3] -> [B, 3, 64, 64] (a view)
            yield RawBatch(self.images[index].permute(0, 3, 1, 2), self.targets[index], spec)


@dataclass
class Loaders:
    train: Loader  # train.batch_sampler.set_epoch(epoch) before each epoch
    val: Loader
    num_classes: int
    class_names: List[str]  # words.txt names, in class order
    wnids: List[str]  # sorted; position = class index


# ----------------------------------------------------------------------------- checks
def check_config(cfg: Config) -> None:
    """Every data setting that cannot work, as a ValueError whose message starts with its key.

    Cheap (no dataset access): builds every transform of image_augmentation.train and .val
    (their settings validated), the normalisation and mixing, and the sampler's schedule.
    Any cache and placement combination works; none is refused.
    """
    train = build_augmentation(cfg.image_augmentation, num_classes=1, train=True,
                               max_epochs=cfg.scheduler.max_epochs)
    off, epochs = cfg.image_augmentation.mixup.off_epochs, cfg.scheduler.max_epochs
    if off >= epochs:
        raise ValueError(f"image_augmentation.mixup.off_epochs: {off} would switch mixing off for the whole run "
                         f"(scheduler.max_epochs is {epochs}); give fewer epochs than that")
    build_augmentation(cfg.image_augmentation, num_classes=1, train=False)
    sampler = cfg.sampler
    if sampler.name == "variable_batch_sampler":
        vbs_schedule(sampler, cfg.dataset.train_batch_size)
        if not any(t.uses_crop_size for t in train.transforms):
            raise ValueError(
                "sampler.name: variable_batch_sampler varies the crop size, but no transform in "
                "image_augmentation.train follows it; add random_resized_crop (or center_crop or resize "
                "without a size) or use sampler.name: batch_sampler"
            )


def placement(cfg: Config, device: torch.device) -> str:
    """'device' or 'workers': where the batch augmentation runs for `device`."""
    chosen = cfg.dataset.augment_on
    if chosen == "auto":
        return "device" if device.type == "cuda" else "workers"
    return chosen


# ----------------------------------------------------------------------------- builders
def build_loaders(cfg: Config, rank: int = 0, world_size: int = 1,
                  device: torch.device = torch.device("cpu")) -> Loaders:
    """Training and validation loaders, sharded for `rank` of `world_size` processes."""
    check_config(cfg)
    train_set = _dataset(cfg, "train", rank, log_root=True)
    val_set = _dataset(cfg, "val", rank)
    train_sampler = SAMPLERS.get(cfg.sampler.name)(
        len(train_set), cfg.sampler, cfg.dataset.train_batch_size,
        shuffle=True, seed=cfg.common.seed, rank=rank, world_size=world_size, training=True,
    )
    train_augment = build_augmentation(cfg.image_augmentation, train_set.num_classes, train=True,
                                       max_epochs=cfg.scheduler.max_epochs)
    val_augment = build_augmentation(cfg.image_augmentation, train_set.num_classes, train=False)
    return Loaders(
        train=_loader(cfg, train_set, train_sampler, train_augment, device),
        val=_eval_loader(cfg, val_set, val_augment, rank, world_size, device),
        num_classes=train_set.num_classes,
        class_names=list(train_set.class_names),
        wnids=list(train_set.wnids),
    )


def build_eval_loader(cfg: Config, split: str, rank: int = 0, world_size: int = 1,
                      device: torch.device = torch.device("cpu")) -> Tuple[Loader, TinyImageNet]:
    """A loader over `split` ('train', 'val' or 'test') with the validation transforms.

    For 'test' the targets are dataset indices: dataset.file_names[i] names each image.
    """
    augment = build_augmentation(cfg.image_augmentation, num_classes=0, train=False)  # no mixing: no classes needed
    dataset = _dataset(cfg, split, rank, log_root=True)
    return _eval_loader(cfg, dataset, augment, rank, world_size, device), dataset


# ----------------------------------------------------------------------------- pieces
def _dataset(cfg: Config, split: str, rank: int, log_root: bool = False) -> TinyImageNet:
    def build() -> TinyImageNet:
        root = prepare_root(cfg.dataset, progress=rank == 0)
        if log_root and rank == 0:  # a run started elsewhere must still say where its data is
            logger.info("dataset root: %s", os.path.abspath(root))
        return DATASETS.get(cfg.dataset.name).from_config(cfg.dataset, split, progress=rank == 0)

    return _rank_zero_first(rank, build)


def _eval_loader(cfg: Config, dataset: TinyImageNet, augment: Augmentation, rank: int, world_size: int,
                 device: torch.device) -> Loader:
    # Not shuffled, fixed size, and uneven shards allowed: every sample is seen exactly once
    # across ranks, so summing per-rank totals gives exact metrics.
    sampler = batch_sampler(len(dataset), cfg.sampler, cfg.dataset.val_batch_size,
                            shuffle=False, seed=cfg.common.seed, rank=rank, world_size=world_size, training=False)
    return _loader(cfg, dataset, sampler, augment, device)


def _loader(cfg: Config, dataset: TinyImageNet, sampler: ShardedBatchSampler, augment: Augmentation,
            device: torch.device) -> Loader:
    if placement(cfg, device) == "workers":
        return Loader(dataset, sampler, _data_loader(cfg, dataset, sampler, augment, device), None, torch.device("cpu"))
    if dataset.cached:
        return Loader(dataset, sampler, DeviceSplit(dataset, sampler, device), augment, device)
    return Loader(dataset, sampler, _data_loader(cfg, dataset, sampler, _keep, device), augment, device)


def _keep(batch: RawBatch) -> RawBatch:
    """collate_fn of workers that only decode: __getitems__ already made the batch."""
    return batch


def _data_loader(cfg: Config, dataset: TinyImageNet, sampler: ShardedBatchSampler,
                 collate: Callable[[RawBatch], object], device: torch.device) -> WorkerDataLoader:
    data_cfg = cfg.dataset
    workers = data_cfg.workers
    return WorkerDataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        # The batches seed their own augmentations; a private generator for the loader's worker
        # base seed keeps iterating from advancing the caller's (the training loop's) RNG.
        generator=torch.Generator().manual_seed(cfg.common.seed),
        num_workers=workers,
        worker_init_fn=worker_init(os.getpid()) if workers > 0 else None,
        pin_memory=data_cfg.pin_memory and device.type == "cuda",
        persistent_workers=data_cfg.persistent_workers and workers > 0,
        prefetch_factor=data_cfg.prefetch_factor if workers > 0 else None,
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

