"""The data pipeline: TinyImageNet in its own layout, batch augmentations, batch samplers, loaders.

The engine uses three entry points:

    data.check_config(cfg)                                          # before any work; ValueError
    loaders = data.build_loaders(cfg, rank, world_size, device)     # train + val, for training
    loader, dataset = data.build_eval_loader(cfg, "test", rank, world_size, device)

A loader yields (images float32 [B, 3, h, w] in [0, 1] or mean/std-normalised, targets):
targets are int64 class indices [B], soft float [B, num_classes] for a training loader with
mixup or cutmix on, and dataset indices [B] for the unlabelled test split
(dataset.file_names[i]). `loader.batch_sampler.set_epoch(epoch, start_batch)` picks the
epoch; `loader.batch_sampler.epoch_length(epoch)` tells any epoch's number of batches.

Where the augmentation runs is `dataset.augment_on` (data/loaders.py): in the DataLoader
workers (batches arrive on the CPU; the engine moves them) or on the training device (batches
arrive there already; with a decoded cache the whole split lives on the device).

The builders are imported on first use, so that `python -m data.fake` starts without torch.
"""
from typing import Any

IMAGE_SIZE = 64  # TinyImageNet's side length; every decoded image has it (here: data.fake needs no torch)
_LAZY = {"Loader", "Loaders", "build_loaders", "build_eval_loader", "check_config"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from data import loaders

        return getattr(loaders, name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")
