"""The data pipeline: TinyImageNet in its own layout, augmentations, batch samplers, loaders.

The engine uses two builders:

    loaders = data.build_loaders(cfg, rank, world_size, device)   # train + val, for main_train
    loader, dataset = data.build_eval_loader(cfg, "test")          # for main_eval

Batches are (images float32 [B, 3, h, w] in [0, 1] or mean/std-normalised, targets): targets
are int64 class indices [B], soft float [B, num_classes] for a training loader with mixup or
cutmix on, and dataset indices [B] for the unlabelled test split (dataset.file_names[i]).

Where the batches are made depends on the device the builders are given: for the CPU, in the
DataLoader workers; for a CUDA device, the workers ship uint8 batches and the float conversion,
mixing and normalisation run on the device, so batches arrive there already; with
`dataset.cache: gpu` the whole split lives on the device and batches are built there
(data/gpu_cache.py). Either way the engine only moves them (a no-op when already there).

The builders are imported on first use, so that `python -m data.fake` starts without torch.
"""
from typing import Any

_LAZY = {"Loaders", "build_loaders", "build_eval_loader"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from data import loaders

        return getattr(loaders, name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")
