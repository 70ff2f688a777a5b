"""The one batch-level augmentation pipeline: uint8 batches in, training or evaluation batches out.

    images uint8 [B, 3, 64, 64] -> float [0, 1] -> the transforms of image_augmentation.train
    (or .val), in order -> mixup / cutmix (training) -> mean/std -> float32 [B, 3, h, w]

It runs wherever the batch is: in the DataLoader workers' collator, or on the training device
(data/loaders.py decides). Every random draw is made on the CPU from generators seeded with
the batch's seed (one stream per transform, one for the mixing), so both placements give the
same batches from the same seed, up to float rounding.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from data.base import RawBatch
from data.transforms import Transform, build_transforms
from options.schema import AugmentationConfig

Batch = Tuple[Tensor, Tensor]  # (images float32 [B, 3, h, w], targets)
_TRANSFORMS, _MIXING = 0, 1  # random streams of one batch seed


class Normalize:
    """(images - mean) / std per channel, mean and std in [0, 1] pixel units."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        # Copies per device, made once: copying them for every batch would wait on the device.
        self._on_device: Dict[torch.device, Tuple[Tensor, Tensor]] = {}

    def __call__(self, images: Tensor) -> Tensor:
        if images.device not in self._on_device:
            self._on_device[images.device] = (self.mean.to(images.device), self.std.to(images.device))
        mean, std = self._on_device[images.device]
        return (images - mean) / std


class MixupCutmix:
    """Mix each image with its partner in the reversed batch; targets become soft [B, C].

    With probability prob a batch is mixed: by cutmix with probability switch_prob when both
    alphas are > 0, otherwise by whichever is on. The mixing weight is drawn from
    Beta(alpha, alpha); for cutmix it is then set to the exact share of pixels kept.
    Batches of epochs >= off_from_epoch (counted from 0; None: never) are not mixed: their
    targets are the one-hot labels, as those of a batch the prob draw left alone.
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 prob: float = 1.0, switch_prob: float = 0.5, off_from_epoch: Optional[int] = None) -> None:
        self.num_classes, self.mixup_alpha, self.cutmix_alpha = num_classes, mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob = prob, switch_prob
        self.off_from_epoch = off_from_epoch

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def __call__(self, images: Tensor, labels: Tensor, rng: np.random.Generator,
                 epoch: int = 0) -> Tuple[Tensor, Tensor]:
        """images float [B, 3, H, W], labels int64 [B] of a batch of `epoch` -> (mixed images,
        targets float [B, C])."""
        targets = torch.nn.functional.one_hot(labels, self.num_classes).float()
        off = self.off_from_epoch is not None and epoch >= self.off_from_epoch
        if off or not self.enabled or rng.random() >= self.prob:
            return images, targets
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or rng.random() < self.switch_prob)
        partner = images.flip(0)  # a copy: flip never returns a view
        if use_cutmix:
            images, lam = self._paste_box(images, partner, rng.beta(self.cutmix_alpha, self.cutmix_alpha), rng)
        else:
            lam = float(rng.beta(self.mixup_alpha, self.mixup_alpha))
            images = images * lam + partner * (1.0 - lam)
        return images, lam * targets + (1.0 - lam) * targets.flip(0)

    @staticmethod
    def _paste_box(images: Tensor, partner: Tensor, lam: float, rng: np.random.Generator) -> Tuple[Tensor, float]:
        """Paste a box of about (1 - lam) of the area from partner; return the share kept."""
        height, width = images.shape[-2:]
        cut = np.sqrt(1.0 - lam)
        cy, cx = rng.integers(height), rng.integers(width)
        y0, y1 = np.clip([cy - int(height * cut) // 2, cy + int(height * cut) // 2], 0, height)
        x0, x1 = np.clip([cx - int(width * cut) // 2, cx + int(width * cut) // 2], 0, width)
        images = images.clone()
        images[:, :, y0:y1, x0:x1] = partner[:, :, y0:y1, x0:x1]
        return images, 1.0 - float((y1 - y0) * (x1 - x0)) / (height * width)


class Augmentation:
    """RawBatch (on any device) -> (images float32 [B, 3, h, w], targets) on the same device.

    Targets: the labels, or soft [B, C] when mixing is on. Also the DataLoader's collate_fn
    for worker placement: the dataset's __getitems__ already returns a RawBatch.
    """

    def __init__(self, transforms: Sequence[Transform], normalize: Optional[Normalize] = None,
                 mix: Optional[MixupCutmix] = None) -> None:
        self.transforms = list(transforms)
        self.normalize = normalize
        self.mix = mix if mix is not None and mix.enabled else None

    def __call__(self, batch: RawBatch) -> Batch:
        spec = batch.spec
        images = batch.images.float().div_(255.0)
        for i, transform in enumerate(self.transforms):
            images = transform(images, spec.crop_size, np.random.default_rng((spec.seed, _TRANSFORMS, i)))
        targets = batch.labels
        if self.mix is not None:
            images, targets = self.mix(images, targets, np.random.default_rng((spec.seed, _MIXING)), spec.epoch)
        if self.normalize is not None:
            images = self.normalize(images)
        return images.contiguous(), targets


def build_augmentation(cfg: AugmentationConfig, num_classes: int, train: bool,
                       max_epochs: Optional[int] = None) -> Augmentation:
    """The training (image_augmentation.train, mixing allowed) or evaluation (.val) pipeline.

    max_epochs: the run's length, which mixup.off_epochs counts back from (needed when it is set).
    A bad setting is a ValueError whose message starts with its config key.
    """
    where = "image_augmentation.train" if train else "image_augmentation.val"
    transforms = build_transforms(cfg.train if train else cfg.val, where)
    normalize = Normalize(cfg.mean, cfg.std) if cfg.mean is not None else None
    m = cfg.mixup
    if not train:
        return Augmentation(transforms, normalize, None)
    if m.off_epochs and max_epochs is None:
        raise ValueError("image_augmentation.mixup.off_epochs counts back from the run's end: "
                         "build_augmentation needs max_epochs")
    off_from = max_epochs - m.off_epochs if m.off_epochs else None
    mix = MixupCutmix(num_classes, m.mixup_alpha, m.cutmix_alpha, m.prob, m.switch_prob, off_from)
    return Augmentation(transforms, normalize, mix)
