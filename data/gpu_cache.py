"""`dataset.cache: gpu`: a whole decoded split on the training device, augmented there in batches.

The split is decoded once (staged through the disk cache, see data/cache.py) and uploaded as one
uint8 tensor [N, 64, 64, 3]: 1.2 GB for TinyImageNet's train split. Each batch the sampler draws
is gathered by index on the device and its transforms run on the whole batch at once, so there
are no DataLoader workers and no per-batch host-to-device image copies.

Every random draw follows the distribution of the CPU transform it replaces (data/transforms.py:
crop boxes, flips, cutout holes) and comes from a generator seeded with the sampler's per-batch
seed, so the batches are a pure function of (seed, epoch), as on the CPU path, and DDP shards
come from the same samplers. The random streams differ from the CPU path's, so the pixels of a
given epoch do too. Resampling uses the same antialiased filters as torch's interpolate on the
CPU path and rounds to uint8 levels like it does. Everything also runs on CPU tensors, which
makes `cache: gpu` a device-resident cache on the CPU (and is how the tests exercise it).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterator, List, Sequence, Tuple, Type

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from data.base import SeededList
from data.collate import BatchCollator
from data.transforms import (
    CenterCrop, Cutout, RandomHorizontalFlip, RandomResizedCrop, Resize, Transform, build_transform,
)
from options.config import ConfigError

MAX_LEVEL = 255.0  # batches are transformed as float pixel levels 0..255, like the uint8 CPU path
_UPLOAD_CHUNK = 4096  # images staged on the host at a time while uploading a split
_ATTEMPTS = 10  # random_resized_crop's box attempts, as in data/transforms.py


# ----------------------------------------------------------------------------- resampling
def _triangle(x: Tensor) -> Tensor:
    return (1.0 - x.abs()).clamp_(min=0.0)


def _cubic(x: Tensor, a: float = -0.5) -> Tensor:
    """Keys' cubic with a = -0.5, the kernel of torch's antialiased bicubic interpolation."""
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


_FILTERS: Dict[str, Callable[[Tensor], Tensor]] = {"bilinear": _triangle, "bicubic": _cubic}


def resample_weights(start: Tensor, length: Tensor, out_size: int, in_size: int, interpolation: str) -> Tensor:
    """Per-sample matrices [B, out_size, in_size] resizing the span [start, start + length) of an
    axis of in_size pixels to out_size pixels.

    They reproduce torch's interpolate(antialias=True) on the cropped span (the CPU path):
    output pixel i is centred at start + (i + 0.5) * scale with scale = length / out_size; when
    shrinking, the filter widens by the scale; weights outside the span are dropped and each row
    is renormalised. "nearest" picks pixel floor((i + 0.5) * scale), as nearest-exact does.
    """
    start, length = start.float()[:, None, None], length.float()[:, None, None]  # [B, 1, 1]
    scale = length / out_size
    centre = scale * (torch.arange(out_size, device=start.device)[:, None] + 0.5)  # [B, out, 1]
    offset = torch.arange(in_size, device=start.device) - start  # [B, 1, in], relative to the span
    if interpolation == "nearest":
        return (offset == torch.minimum(centre.floor(), length - 1)).float()
    stretch = scale.clamp(min=1.0)  # a shrinking resize low-pass filters (antialias)
    weights = _FILTERS[interpolation]((offset + 0.5 - centre) / stretch) * ((offset >= 0) & (offset < length))
    return weights / weights.sum(dim=-1, keepdim=True)


def resample(images: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """images [B, C, H, W] -> [B, C, h, w] through rows [B, h, H] and cols [B, w, W].

    Like torch's uint8 kernel on the CPU path: the horizontal pass first, each pass rounded to
    whole levels and clipped (which matters where bicubic overshoots).
    """
    wide = _to_levels(torch.matmul(images, cols.transpose(1, 2)[:, None]))  # [B, C, H, w]
    return _to_levels(torch.matmul(rows[:, None], wide))  # [B, C, h, w]


def _to_levels(values: Tensor) -> Tensor:
    return values.round_().clamp_(0.0, MAX_LEVEL)


# ----------------------------------------------------------------------------- batched transforms
class BatchTransform:
    """A CPU transform applied to a whole batch of float levels [B, 3, H, W] at once.

    `cpu` is the transform it mirrors: it holds the validated settings, so both paths read the
    same configuration. Random draws come from `gen`, on the batch's device.
    """

    def __init__(self, cpu: Transform) -> None:
        self.cpu = cpu

    def __call__(self, images: Tensor, crop_size: int, gen: torch.Generator) -> Tensor:
        raise NotImplementedError


def _uniform(gen: torch.Generator, device: torch.device, *shape: int) -> Tensor:
    return torch.rand(shape, generator=gen, device=device)


class BatchRandomResizedCrop(BatchTransform):
    cpu: RandomResizedCrop

    def __call__(self, images: Tensor, crop_size: int, gen: torch.Generator) -> Tensor:
        height, width = images.shape[-2:]
        top, left, h, w = self.sample_boxes(len(images), height, width, gen, images.device)
        rows = resample_weights(top, h, crop_size, height, self.cpu.interpolation)
        cols = resample_weights(left, w, crop_size, width, self.cpu.interpolation)
        return resample(images, rows, cols)

    def sample_boxes(self, batch: int, height: int, width: int, gen: torch.Generator,
                     device: torch.device) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """(top, left, h, w) [B] each, drawn as data/transforms.py's _sample_box draws one box:
        the first of 10 attempts that fits, else the central square."""
        s, r, u, v = _uniform(gen, device, batch, _ATTEMPTS, 4).unbind(-1)  # [B, attempts] each
        (s_low, s_high), (r_low, r_high) = self.cpu.scale, self.cpu.ratio
        target = height * width * (s_low + (s_high - s_low) * s)
        aspect = torch.exp(math.log(r_low) + (math.log(r_high) - math.log(r_low)) * r)
        w, h = torch.sqrt(target * aspect).round(), torch.sqrt(target / aspect).round()
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = fits.float().argmax(dim=1, keepdim=True)  # argmax returns the first of equal maxima
        h, w, u, v = (t.gather(1, first).squeeze(1) for t in (h, w, u, v))
        top, left = (u * (height - h + 1)).floor(), (v * (width - w + 1)).floor()
        side = min(height, width)
        none_fit = ~fits.any(dim=1)
        top = torch.where(none_fit, (height - side) // 2, top)
        left = torch.where(none_fit, (width - side) // 2, left)
        h, w = torch.where(none_fit, side, h), torch.where(none_fit, side, w)
        return top, left, h, w


class BatchResize(BatchTransform):
    cpu: Resize

    def __call__(self, images: Tensor, crop_size: int, gen: torch.Generator) -> Tensor:
        size = crop_size + 8 if self.cpu.size is None else self.cpu.size
        height, width = images.shape[-2:]
        short = min(height, width)
        out_h, out_w = round(height * size / short), round(width * size / short)
        if (out_h, out_w) == (height, width):
            return images
        zeros, batch = images.new_zeros(len(images)), len(images)
        rows = resample_weights(zeros, images.new_full((batch,), height), out_h, height, self.cpu.interpolation)
        cols = resample_weights(zeros, images.new_full((batch,), width), out_w, width, self.cpu.interpolation)
        return resample(images, rows, cols)


class BatchCenterCrop(BatchTransform):
    cpu: CenterCrop

    def __call__(self, images: Tensor, crop_size: int, gen: torch.Generator) -> Tensor:
        size = crop_size if self.cpu.size is None else self.cpu.size
        return TF.center_crop(images, [size, size])  # the CPU path's function; it takes batches too


class BatchHorizontalFlip(BatchTransform):
    cpu: RandomHorizontalFlip

    def __call__(self, images: Tensor, crop_size: int, gen: torch.Generator) -> Tensor:
        flip = _uniform(gen, images.device, len(images)) < self.cpu.p
        return torch.where(flip[:, None, None, None], images.flip(-1), images)


class BatchCutout(BatchTransform):
    cpu: Cutout

    def __call__(self, images: Tensor, crop_size: int, gen: torch.Generator) -> Tensor:
        batch, (height, width), device = len(images), images.shape[-2:], images.device
        holes = self.cpu.max_holes
        applies = _uniform(gen, device, batch) < self.cpu.p
        count = _randint(gen, device, 1, holes, batch)
        h = _randint(gen, device, 1, self.cpu.max_height, batch, holes).clamp(max=height)
        w = _randint(gen, device, 1, self.cpu.max_width, batch, holes).clamp(max=width)
        top = (_uniform(gen, device, batch, holes) * (height - h + 1)).floor()
        left = (_uniform(gen, device, batch, holes) * (width - w + 1)).floor()
        active = applies[:, None] & (torch.arange(holes, device=device) < count[:, None])  # [B, holes]
        ys = torch.arange(height, device=device)[:, None]  # [H, 1]
        xs = torch.arange(width, device=device)  # [W]
        # [B, holes, 1, 1] against [H, 1] and [W] -> [B, holes, H, W] -> any hole -> [B, 1, H, W]
        inside = ((ys >= top[..., None, None]) & (ys < (top + h)[..., None, None])
                  & (xs >= left[..., None, None]) & (xs < (left + w)[..., None, None]))
        mask = (inside & active[..., None, None]).any(dim=1, keepdim=True)
        return images.masked_fill(mask, self.cpu.fill * MAX_LEVEL)


def _randint(gen: torch.Generator, device: torch.device, low: int, high: int, *shape: int) -> Tensor:
    """Uniform integers in [low, high] (as floats)."""
    return (_uniform(gen, device, *shape) * (high - low + 1)).floor() + low


_BATCHED: Dict[Type[Transform], Type[BatchTransform]] = {
    RandomResizedCrop: BatchRandomResizedCrop,
    Resize: BatchResize,
    CenterCrop: BatchCenterCrop,
    RandomHorizontalFlip: BatchHorizontalFlip,
    Cutout: BatchCutout,
}
SUPPORTED = ("random_resized_crop", "random_horizontal_flip", "cutout", "resize", "center_crop")


def build_batch_pipeline(entries: Sequence, where: str) -> List[BatchTransform]:
    """The batched form of the transforms listed at config key `where`.

    Settings are validated by the CPU transforms' own constructors; a transform without a
    batched form is a ConfigError naming it.
    """
    pipeline = []
    for i, entry in enumerate(entries):
        cpu = build_transform(entry, f"{where}[{i}]")
        batched = _BATCHED.get(type(cpu))
        if batched is None:
            raise ConfigError(
                f"{where}[{i}]: {entry.get('name')} is not supported with dataset.cache: gpu (supported: "
                f"{', '.join(SUPPORTED)}); use dataset.cache: memory or disk for this pipeline"
            )
        pipeline.append(batched(cpu))
    return pipeline


# ----------------------------------------------------------------------------- the loader
class DeviceCachedLoader:
    """Batches (images float [B, 3, h, w], targets) over a split held whole on `images.device`.

    Stands in for a DataLoader: the engine uses `batch_sampler` (set_epoch), `dataset` and len().
    """

    def __init__(self, dataset, images: Tensor, targets: Tensor, batch_sampler,
                 transforms: Sequence[BatchTransform], collator: BatchCollator) -> None:
        self.dataset, self.images, self.targets = dataset, images, targets  # images uint8 [N, S, S, 3]
        self.batch_sampler, self.transforms, self.collator = batch_sampler, list(transforms), collator

    @classmethod
    def upload(cls, dataset, batch_sampler, transforms: Sequence[BatchTransform], collator: BatchCollator,
               device: torch.device) -> "DeviceCachedLoader":
        """Copy every image of `dataset` (uint8 [3, S, S] items, no transform) to `device`."""
        images, targets = upload_split(dataset, device)
        return cls(dataset, images, targets, batch_sampler, transforms, collator)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor]]:
        batches: List[SeededList] = list(self.batch_sampler)
        # The epoch's indices go up in one copy, so that no batch waits on the host.
        order = torch.from_numpy(np.fromiter((i for b in batches for i, _ in b), np.int64)).to(self.device)
        start = 0
        for batch in batches:
            index = order[start:start + len(batch)]
            start += len(batch)
            yield self.make_batch(index, crop_size=batch[0][1], seed=batch.seed)

    def make_batch(self, index: Tensor, crop_size: int, seed: int) -> Tuple[Tensor, Tensor]:
        """The transformed, collated batch of items `index` (on the device)."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        # [B, S, S, 3] uint8 -> [B, 3, S, S] float levels (a channels-last view, then a cast)
        images = self.images[index].permute(0, 3, 1, 2).float()
        for transform in self.transforms:
            images = transform(images, crop_size, gen)
        return self.collator.finish(images.div_(MAX_LEVEL), self.targets[index], seed)


def upload_split(dataset, device: torch.device) -> Tuple[Tensor, Tensor]:
    """(images uint8 [N, S, S, 3], targets int64 [N]) of every item of `dataset`, on `device`.

    Goes through the dataset's public items in chunks, so the host never holds a second full copy.
    """
    first, _ = dataset[0]
    size = first.shape[-1]
    images = torch.empty((len(dataset), size, size, 3), dtype=torch.uint8, device=device)
    targets = torch.empty(len(dataset), dtype=torch.int64)
    for start in range(0, len(dataset), _UPLOAD_CHUNK):
        chunk = range(start, min(start + _UPLOAD_CHUNK, len(dataset)))
        items = [dataset[i] for i in chunk]
        # [3, S, S] -> [S, S, 3] per item (views), stacked into one host block per chunk
        images[chunk.start:chunk.stop] = torch.stack([image.permute(1, 2, 0) for image, _ in items]).to(device)
        targets[chunk.start:chunk.stop] = torch.tensor([target for _, target in items])
    return images, targets.to(device)
