"""Batch-level steps: stack the uint8 samples, scale to float [0, 1], optionally normalise with
mean/std, optionally mix images (mixup / cutmix).

Doing the float conversion once per batch is cheaper than per image, and it keeps the
per-image transforms on small uint8 tensors. They run in the DataLoader workers, except for a
loader feeding a CUDA device: its workers only stack the uint8 samples (4x less to pin and copy)
and `BatchCollator.finish` runs on the device (data/loaders.py); so does the GPU cache's.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from options.config import ConfigError
from options.schema import AugmentationConfig, MixupConfig

Sample = Tuple[torch.Tensor, int]


class Normalize:
    """(images - mean) / std per channel, mean and std in [0, 1] pixel units."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (R, G, B), got {list(mean)} and {list(std)}")
        if min(std) <= 0:
            raise ValueError(f"std values must be > 0, got {list(std)}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        # Copies per device, made once: copying them for every batch would wait on the device.
        self._on_device: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.device.type == "cpu":
            return images.sub_(self.mean).div_(self.std)
        if images.device not in self._on_device:
            self._on_device[images.device] = (self.mean.to(images.device), self.std.to(images.device))
        mean, std = self._on_device[images.device]
        return images.sub_(mean).div_(std)


class MixupCutmix:
    """Mix each image with its partner in the reversed batch; targets become soft [B, C].

    With probability prob a batch is mixed: by cutmix with probability switch_prob when both
    alphas are > 0, otherwise by whichever is on. The mixing weight is drawn from
    Beta(alpha, alpha); for cutmix it is then set to the exact share of pixels kept.
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 prob: float = 1.0, switch_prob: float = 0.5) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"alphas must be >= 0, got mixup {mixup_alpha} and cutmix {cutmix_alpha}")
        if not (0 <= prob <= 1 and 0 <= switch_prob <= 1):
            raise ValueError(f"prob and switch_prob must be in [0, 1], got {prob} and {switch_prob}")
        self.num_classes, self.mixup_alpha, self.cutmix_alpha = num_classes, mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob = prob, switch_prob

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 rng: np.random.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """images float [B, 3, H, W] (mixed in place), labels int64 [B] -> targets float [B, C]."""
        targets = torch.nn.functional.one_hot(labels, self.num_classes).float()
        if not self.enabled or rng.random() >= self.prob:
            return images, targets
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or rng.random() < self.switch_prob)
        partner = images.flip(0)  # a copy: flip never returns a view
        if use_cutmix:
            lam = self._paste_box(images, partner, rng.beta(self.cutmix_alpha, self.cutmix_alpha), rng)
        else:
            lam = float(rng.beta(self.mixup_alpha, self.mixup_alpha))
            images.mul_(lam).add_(partner, alpha=1.0 - lam)
        return images, lam * targets + (1.0 - lam) * targets.flip(0)

    @staticmethod
    def _paste_box(images: torch.Tensor, partner: torch.Tensor, lam: float, rng: np.random.Generator) -> float:
        """Paste a box of about (1 - lam) of the area from partner; return the share kept."""
        height, width = images.shape[-2:]
        cut = np.sqrt(1.0 - lam)
        cy, cx = rng.integers(height), rng.integers(width)
        y0, y1 = np.clip([cy - int(height * cut) // 2, cy + int(height * cut) // 2], 0, height)
        x0, x1 = np.clip([cx - int(width * cut) // 2, cx + int(width * cut) // 2], 0, width)
        images[:, :, y0:y1, x0:x1] = partner[:, :, y0:y1, x0:x1]
        return 1.0 - float((y1 - y0) * (x1 - x0)) / (height * width)


Batch = Tuple[torch.Tensor, torch.Tensor]  # (images float32 [B, 3, h, w], targets)
RawBatch = Tuple[torch.Tensor, torch.Tensor, Optional[int]]  # (images uint8, labels int64 [B], seed)


class BatchCollator:
    """Samples (uint8 [3, h, w], label) -> (float32 [B, 3, h, w], int64 [B] or float [B, C]).

    With defer_finish the collator only stacks: it returns a RawBatch, which `finish` completes
    later, on whichever device the images have moved to.
    """

    def __init__(self, normalize: Optional[Normalize] = None, mix: Optional[MixupCutmix] = None,
                 defer_finish: bool = False) -> None:
        self.normalize = normalize
        self.mix = mix if mix is not None and mix.enabled else None
        self.defer_finish = defer_finish

    def __call__(self, samples: List[Sample]) -> Union[Batch, RawBatch]:
        images = torch.stack([image for image, _ in samples])
        labels = torch.tensor([target for _, target in samples], dtype=torch.int64)
        seed = getattr(samples, "seed", None)  # the sampler's per-batch seed (SeededList)
        return (images, labels, seed) if self.defer_finish else self.finish(images, labels, seed)

    def finish(self, images: torch.Tensor, labels: torch.Tensor, seed: Optional[int]) -> Batch:
        """uint8 (or float [0, 1]) images -> float32, mixed and normalised as configured.

        `seed` seeds the mixing (drawn from torch's generator when None); mixing works in place.
        """
        images = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        targets = labels
        if self.mix is not None:
            images, targets = self.mix(images, labels, _batch_rng(seed))
        if self.normalize is not None:
            images = self.normalize(images)
        return images, targets


def _batch_rng(seed: Optional[int]) -> np.random.Generator:
    """The batch's own generator when the sampler seeded it, else one from torch's."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    return np.random.default_rng((seed, 1))  # stream 1: the per-image transforms used the seed itself


def build_collator(cfg: AugmentationConfig, num_classes: int, train: bool, defer_finish: bool = False) -> BatchCollator:
    """The collator of the train (mixing allowed) or evaluation loader (see BatchCollator)."""
    try:
        normalize = Normalize(cfg.mean, cfg.std) if cfg.mean is not None or cfg.std is not None else None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"image_augmentation.mean/std: {e}; give both, 3 values each, or neither") from None
    return BatchCollator(normalize, _build_mix(cfg.mixup, num_classes) if train else None, defer_finish)


def _build_mix(cfg: MixupConfig, num_classes: int) -> MixupCutmix:
    try:
        return MixupCutmix(num_classes, cfg.mixup_alpha, cfg.cutmix_alpha, cfg.prob, cfg.switch_prob)
    except ValueError as e:
        raise ConfigError(f"image_augmentation.mixup: {e}") from None
