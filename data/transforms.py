"""Batch augmentations, registered by name and built from image_augmentation.train / .val.

A transform works on a whole batch of float32 images [B, 3, H, W] in [0, 1], on any device,
and returns the transformed batch without modifying its input. It runs in two steps:
`draw(rng, batch, height, width, crop_size)` makes every random choice, one per sample, on the
CPU from a numpy Generator the pipeline seeds from the batch's seed (data/augment.py), and
`apply(images, params)` carries them out with tensor ops on the images' device. So a batch
is the same, up to float rounding, whether it is augmented in a DataLoader worker or on the
training device. Transforms whose output size follows the batch's crop size (given by the
sampler) say so with `uses_crop_size`; those that keep the image size may be nested in
random_order.

A config entry is `{name: <registered name>, <setting>: value, ...}`; settings are the keyword
arguments of the transform's constructor, checked against its type hints, so a typo is an
error with a "did you mean". Every problem is a ValueError whose message starts with the
entry's config key.
"""
from __future__ import annotations

import inspect
import math
import typing
from typing import Any, Callable, Dict, List, Literal, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.transforms import InterpolationMode

from data.base import on_device
from options.config import coerce
from options.registry import Registry, did_you_mean

TRANSFORMS = Registry("transform")

Interpolation = Literal["nearest", "bilinear", "bicubic"]
PhotometricStyle = Literal["torchvision", "cvnets"]
Params = Dict[str, Any]  # a transform's draws for one batch: CPU tensors / arrays, one row per sample
_BATCH_LEVEL = {  # names users may try to list as transforms, and where they live instead
    "normalization": "set image_augmentation.mean and image_augmentation.std instead",
    "normalize": "set image_augmentation.mean and image_augmentation.std instead",
    "to_tensor": "images become float [0, 1] batches by themselves; remove the entry",
    "mixup": "set image_augmentation.mixup.mixup_alpha instead",
    "cutmix": "set image_augmentation.mixup.cutmix_alpha instead",
}
_GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


class Transform:
    """Base class; see the module docstring for the contract."""

    uses_crop_size = False  # the output size follows the batch's crop size
    keeps_size = True  # the output has the input's height and width
    renamed: Dict[str, str] = {}  # old setting name -> what to write instead

    def draw(self, rng: np.random.Generator, batch: int, height: int, width: int, crop_size: int) -> Params:
        return {}

    def apply(self, images: Tensor, params: Params) -> Tensor:
        raise NotImplementedError

    def __call__(self, images: Tensor, crop_size: int, rng: np.random.Generator) -> Tensor:
        return self.apply(images, self.draw(rng, len(images), images.shape[-2], images.shape[-1], crop_size))

    def __repr__(self) -> str:
        shown = {k: v for k, v in vars(self).items() if not k.startswith("_") and k != "uses_crop_size"}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


# ----------------------------------------------------------------------------- building from config
def build_transforms(entries: Sequence[Mapping[str, Any]], where: str) -> List[Transform]:
    """The transforms listed at config key `where`, in order."""
    return [build_transform(entry, f"{where}[{i}]") for i, entry in enumerate(entries)]


def describe_transforms() -> List[str]:
    """One line per registered transform: its name and its settings with their defaults (--help)."""
    lines = []
    for name in TRANSFORMS.names():
        params = inspect.signature(TRANSFORMS.get(name).__init__).parameters.values()
        settings = ", ".join(f"{p.name}: {_plain(p.default)}" for p in params
                             if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        lines.append(f"{{name: {name}{', ' + settings if settings else ''}}}")
    return lines


def _plain(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_plain(v) for v in value) + "]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def build_transform(entry: Mapping[str, Any], where: str) -> Transform:
    """One transform from `{name: ..., settings}`; every problem is a ValueError naming `where`."""
    name = entry.get("name")
    if name in _BATCH_LEVEL:
        raise ValueError(f"{where}: {name} is not a transform; {_BATCH_LEVEL[name]}")
    if name not in TRANSFORMS:
        raise ValueError(
            f"{where}: unknown transform {name!r}; known: {', '.join(TRANSFORMS.names())}"
            f"{did_you_mean(name, TRANSFORMS.names())}"
        )
    cls = TRANSFORMS.get(name)
    try:
        return cls(**_settings(cls, entry))
    except ValueError as e:  # nested entries (random_order) get this prefix too
        raise ValueError(f"{where} ({name}): {e}") from None


def _settings(cls: type, entry: Mapping[str, Any]) -> Dict[str, Any]:
    """The entry's settings, validated against the type hints of cls.__init__."""
    hints = typing.get_type_hints(cls.__init__)
    known = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    settings = {}
    for raw_key, value in entry.items():
        key = str(raw_key).replace("-", "_")
        if key == "name":
            continue
        if key in cls.renamed:
            raise ValueError(f"setting {raw_key!r} was renamed: {cls.renamed[key]}")
        if key not in known:
            raise ValueError(
                f"unknown setting {raw_key!r}{did_you_mean(key, known)} (settings: {', '.join(known) or 'none'})"
            )
        settings[key] = coerce(value, hints[key], key)
    return settings


# ----------------------------------------------------------------------------- setting checks
def _pair(name: str, value: Sequence[float], low: float = 0.0, high: float = math.inf) -> Tuple[float, float]:
    """A (min, max) setting with low <= min <= max <= high."""
    if len(value) != 2 or not low <= value[0] <= value[1] <= high:
        raise ValueError(f"{name} must be [min, max] with {low} <= min <= max <= {high}, got {list(value)}")
    return float(value[0]), float(value[1])


def _int_range(name: str, value: Sequence[int]) -> Tuple[int, int]:
    """An int setting given as one value (exactly that) or [min, max] (uniform in between), >= 1."""
    low, high = (value[0], value[0]) if len(value) == 1 else tuple(value) if len(value) == 2 else (0, -1)
    if not 1 <= low <= high:
        raise ValueError(f"{name} must be one int >= 1 or [min, max] with 1 <= min <= max, got {list(value)}")
    return int(low), int(high)


def _probability(p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    return p


def _positive(name: str, value: Any) -> Any:
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _pixel(name: str, value: float) -> float:
    """A fill value, in [0, 1] pixel units."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} is a pixel value in [0, 1], got {value}")
    return value


# ----------------------------------------------------------------------------- draws and helpers
def _chance(rng: np.random.Generator, batch: int, p: float) -> np.ndarray:
    """bool [B]: which samples a transform with probability p acts on."""
    return rng.random(batch) < p


def _uniform(rng: np.random.Generator, batch: int, bounds: Tuple[float, float]) -> np.ndarray:
    return rng.uniform(bounds[0], bounds[1], batch)


def _on(images: Tensor, values: Any, dtype: torch.dtype = torch.float32) -> Tensor:
    """CPU draws as a tensor on the images' device."""
    return on_device(values, images.device, dtype)


def _per_sample(values: Tensor) -> Tensor:
    """[B] -> [B, 1, 1, 1], to broadcast over a batch of images."""
    return values.view(-1, 1, 1, 1)


def _sample_boxes(rng: np.random.Generator, batch: int, height: int, width: int, scale: Tuple[float, float],
                  ratio: Tuple[float, float], attempts: int = 10,
                  strict: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """(boxes float [B, 4] as top, left, h, w; found bool [B]) of random boxes with an area
    fraction in `scale` and an aspect ratio w/h in `ratio`: per sample the first of `attempts`
    draws that fits in the image (found is False where none did). strict: a box must also be
    smaller than the image on both sides (torchvision's RandomErasing rule)."""
    s, r, u, v = rng.random((4, batch, attempts))
    area = height * width * (scale[0] + (scale[1] - scale[0]) * s)
    aspect = np.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * r)
    w, h = np.round(np.sqrt(area * aspect)), np.round(np.sqrt(area / aspect))
    fits = (w > 0) & (w <= width - strict) & (h > 0) & (h <= height - strict)
    first = fits.argmax(axis=1)[:, None]  # argmax returns the first of equal maxima
    h, w, u, v = (np.take_along_axis(a, first, axis=1)[:, 0] for a in (h, w, u, v))
    top, left = np.floor(u * (height - h + 1)), np.floor(v * (width - w + 1))
    return np.stack([top, left, h, w], axis=1), fits.any(axis=1)


def _box_mask(images: Tensor, boxes: Tensor, active: Tensor) -> Tensor:
    """bool [B, 1, H, W]: pixels inside any active box; boxes float [B, K, 4] (top, left, h, w),
    active bool [B, K]."""
    height, width = images.shape[-2:]
    ys = torch.arange(height, device=images.device)[:, None]  # [H, 1]
    xs = torch.arange(width, device=images.device)  # [W]
    top, left, h, w = (boxes[..., k, None, None] for k in range(4))  # [B, K, 1, 1] each
    # [B, K, 1, 1] against [H, 1] and [W] -> [B, K, H, W] -> any box -> [B, 1, H, W]
    inside = (ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w)
    return (inside & active[..., None, None]).any(dim=1, keepdim=True)


def _gray(images: Tensor) -> Tensor:
    """[B, 3, H, W] -> luma [B, 1, H, W]."""
    r, g, b = images.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def _blend(images: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """factor * images + (1 - factor) * other, clipped; factor [B] (1 leaves a sample as it was)."""
    factor = _per_sample(factor)
    return (factor * images + (1.0 - factor) * other).clamp_(0.0, 1.0)


def _adjust_hsv(images: Tensor, hue_shift: Tensor, saturation_scale: Optional[Tensor] = None,
                floor_hue: bool = False) -> Tensor:
    """Through HSV, per sample: rotate the hue by hue_shift [B] (in turns, [-0.5, 0.5]) as
    torchvision's adjust_hue does, and scale the saturation by saturation_scale [B] (clipped
    at 1). floor_hue: a hue pushed below 0 stays at 0 instead of wrapping round, as OpenCV's
    uint8 HSV in the paper's code does (its hue is clipped to [0, 255] before converting back)."""
    value, _ = images.max(dim=1)  # [B, H, W]
    chroma = value - images.min(dim=1)[0]
    r, g, b = images.unbind(1)
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(value == r, (g - b) / safe, torch.where(value == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = (hue / 6.0) % 1.0 + hue_shift.view(-1, 1, 1)
    hue = (hue.clamp(min=0.0) if floor_hue else hue) % 1.0
    saturation = chroma / torch.where(value > 0, value, torch.ones_like(value))
    if saturation_scale is not None:
        saturation = (saturation * saturation_scale.view(-1, 1, 1)).clamp_(max=1.0)
    # HSV -> RGB: channel n of (R, G, B) = (5, 3, 1) is v - v*s*clip(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6
    k = (torch.tensor([5.0, 3.0, 1.0], device=images.device).view(1, 3, 1, 1) + 6.0 * hue[:, None]) % 6.0
    return value[:, None] * (1.0 - saturation[:, None] * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))


# ----------------------------------------------------------------------------- resampling
def _triangle(x: Tensor) -> Tensor:
    return (1.0 - x.abs()).clamp_(min=0.0)


def _cubic(a: float) -> Callable[[Tensor], Tensor]:
    """Keys' cubic convolution kernel with parameter a."""
    def kernel(x: Tensor) -> Tensor:
        x = x.abs()
        near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        far = ((x - 5.0) * x + 8.0) * x * a - 4.0 * a
        return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))
    return kernel


# (filter, radius in input pixels) per interpolation and antialias setting, as torch's interpolate
# uses them: antialiased bicubic is PIL's (a = -0.5), plain bicubic the classic a = -0.75.
_FILTERS = {("bilinear", True): (_triangle, 1), ("bilinear", False): (_triangle, 1),
            ("bicubic", True): (_cubic(-0.5), 2), ("bicubic", False): (_cubic(-0.75), 2)}


def resample(images: Tensor, boxes: np.ndarray, out_h: int, out_w: int, interpolation: str,
             antialias: bool) -> Tensor:
    """Resize box b (top, left, h, w of boxes float [B, 4], whole pixels) of each image b to
    out_h x out_w; the result equals torch's interpolate(align_corners=False, antialias) of the
    cropped image, up to float rounding.

    Bilinear samples that do not shrink (antialiasing then changes nothing) read 4 input pixels
    per output pixel in one grid_sample call, the fastest form on CPU and GPU alike; the others
    are multiplied by per-sample resampling matrices built from the filter's taps.
    """
    if interpolation == "bilinear":
        shrinks = (boxes[:, 2] > out_h) | (boxes[:, 3] > out_w) if antialias else np.zeros(len(boxes), bool)
        if shrinks.all():
            return _resample_by_matrices(images, boxes, out_h, out_w, interpolation, antialias)
        top, left, h, w = _on(images, boxes).unbind(1)
        gy = _grid_axis(top, h, out_h, images.shape[-2])
        gx = _grid_axis(left, w, out_w, images.shape[-1])
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # [B, h, w, (x, y)]
        if not shrinks.any():
            return nnf.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
        out = torch.empty(len(images), images.shape[1], out_h, out_w, device=images.device)
        rest, wide = (_on(images, np.flatnonzero(chosen), torch.int64) for chosen in (~shrinks, shrinks))
        out[rest] = nnf.grid_sample(images[rest], grid[rest], mode="bilinear", padding_mode="border",
                                    align_corners=False)
        out[wide] = _resample_by_matrices(images[wide], boxes[shrinks], out_h, out_w, interpolation, antialias)
        return out
    return _resample_by_matrices(images, boxes, out_h, out_w, interpolation, antialias)


def _resample_by_matrices(images: Tensor, boxes: np.ndarray, out_h: int, out_w: int, interpolation: str,
                          antialias: bool) -> Tensor:
    top, left, h, w = _on(images, boxes).unbind(1)
    taps = _tap_count(boxes, out_h, out_w, interpolation, antialias)
    rows = _resample_matrix(top, h, out_h, images.shape[-2], interpolation, antialias, taps)  # [B, h, H]
    cols = _resample_matrix(left, w, out_w, images.shape[-1], interpolation, antialias, taps)  # [B, w, W]
    batch, channels, height, width = images.shape
    # [B, 3H, W] @ [B, W, w] -> [B, 3, H, w] -> [B, H, 3w]; [B, h, H] @ that -> [B, h, 3w] -> [B, 3, h, w]
    wide = torch.bmm(images.reshape(batch, channels * height, width), cols.transpose(1, 2))
    wide = wide.view(batch, channels, height, out_w).transpose(1, 2).reshape(batch, height, channels * out_w)
    out = torch.bmm(rows, wide).view(batch, out_h, channels, out_w).transpose(1, 2).contiguous()
    return out.clamp_(0.0, 1.0) if interpolation == "bicubic" else out  # bicubic overshoots


def _grid_axis(start: Tensor, length: Tensor, out: int, size: int) -> Tensor:
    """grid_sample coordinates [B, out] of an axis: output pixel i samples the box at
    start + (i + 0.5) * length / out - 0.5, kept inside the box (interpolate's edge rule)."""
    src = start[:, None] + (torch.arange(out, device=start.device) + 0.5) * (length / out)[:, None] - 0.5
    src = torch.minimum(torch.maximum(src, start[:, None]), (start + length - 1)[:, None])
    return (2.0 * src + 1.0) / size - 1.0  # pixel -> [-1, 1], align_corners=False


def _tap_count(boxes: np.ndarray, out_h: int, out_w: int, interpolation: str, antialias: bool) -> int:
    """Input pixels one output pixel reads at most (from the CPU-side boxes: no device sync)."""
    if interpolation == "nearest":
        return 1
    radius = _FILTERS[interpolation, antialias][1]
    if not antialias:
        return 2 * radius
    stretch = max(1.0, float((boxes[:, 2] / out_h).max()), float((boxes[:, 3] / out_w).max()))
    return math.ceil(2 * radius * stretch) + 1


def _resample_matrix(start: Tensor, length: Tensor, out: int, size: int, interpolation: str, antialias: bool,
                     taps: int) -> Tensor:
    """Per-sample matrices [B, out, size] resizing the span [start, start + length) of an axis.

    Output pixel i is centred at (i + 0.5) * scale in the span (scale = length / out) and reads
    `taps` neighbouring pixels. Antialiased (torch's and PIL's rule): the filter widens by the
    scale when shrinking and weights are renormalised inside the span. Plain: a fixed-width
    filter at i's source position, edge pixels repeated. Nearest: pixel floor((i + 0.5) * scale).
    """
    scale = (length / out)[:, None, None]  # [B, 1, 1]
    centre = (torch.arange(out, device=start.device)[None, :, None] + 0.5) * scale  # [B, out, 1]
    ks = torch.arange(taps, device=start.device)
    length = length[:, None, None]
    if interpolation == "nearest":
        index, weights = torch.minimum(centre.floor(), length - 1), torch.ones_like(centre)
    elif antialias:
        kernel, radius = _FILTERS[interpolation, True]
        stretch = scale.clamp(min=1.0)
        support = radius * stretch
        first = (centre - support + 0.5).floor().clamp(min=0.0)
        index = first + ks  # [B, out, taps]
        end = torch.minimum((centre + support + 0.5).floor(), length)
        weights = kernel((index - centre + 0.5) / stretch) * (index < end)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        index = torch.minimum(index, length - 1)  # taps past the end carry weight 0
    else:
        kernel, radius = _FILTERS[interpolation, False]
        source = centre - 0.5
        index = source.floor() - (radius - 1) + ks
        weights = kernel(index - source)
        index = torch.minimum(index.clamp(min=0.0), length - 1)
    index = (index + start[:, None, None]).long()
    return torch.zeros(len(start), out, size, device=start.device).scatter_add_(2, index, weights)


# ----------------------------------------------------------------------------- geometry
@TRANSFORMS.register("random_resized_crop")
class RandomResizedCrop(Transform):
    """A random box (area fraction in scale, aspect ratio in ratio) resized to the crop size.

    antialias: low-pass filter when shrinking (torch's and PIL's resize); the paper's code
    resized with OpenCV, which does not (set false to match it).
    """

    uses_crop_size = True
    keeps_size = False

    def __init__(self, scale: Tuple[float, ...] = (0.08, 1.0), ratio: Tuple[float, ...] = (3 / 4, 4 / 3),
                 interpolation: Interpolation = "bilinear", antialias: bool = True) -> None:
        self.scale = _pair("scale", scale, 0.0, 1.0)
        self.ratio = _pair("ratio", ratio)
        _positive("ratio", self.ratio[0])
        self.interpolation, self.antialias = interpolation, antialias

    def draw(self, rng: np.random.Generator, batch: int, height: int, width: int, crop_size: int) -> Params:
        boxes, found = _sample_boxes(rng, batch, height, width, self.scale, self.ratio)
        side = min(height, width)  # where no box fits the aspect range: the central square
        boxes[~found] = ((height - side) // 2, (width - side) // 2, side, side)
        return {"boxes": boxes, "size": crop_size}

    def apply(self, images: Tensor, params: Params) -> Tensor:
        size = params["size"]
        return resample(images, params["boxes"], size, size, self.interpolation, self.antialias)


@TRANSFORMS.register("resize")
class Resize(Transform):
    """Resize the shorter side to `size` (default: the crop size + 8, the paper's val setting)."""

    keeps_size = False

    def __init__(self, size: Optional[int] = None, interpolation: Interpolation = "bilinear",
                 antialias: bool = True) -> None:
        self.size = size if size is None else _positive("size", size)
        self.interpolation, self.antialias = interpolation, antialias
        self.uses_crop_size = size is None

    def draw(self, rng: np.random.Generator, batch: int, height: int, width: int, crop_size: int) -> Params:
        size = crop_size + 8 if self.size is None else self.size
        short = min(height, width)
        return {"boxes": np.tile([0.0, 0.0, height, width], (batch, 1)),
                "out": (round(height * size / short), round(width * size / short))}

    def apply(self, images: Tensor, params: Params) -> Tensor:
        return resample(images, params["boxes"], *params["out"], self.interpolation, self.antialias)


@TRANSFORMS.register("center_crop")
class CenterCrop(Transform):
    """The central size x size box (default size: the crop size); pads with zeros if smaller."""

    keeps_size = False

    def __init__(self, size: Optional[int] = None) -> None:
        self.size = size if size is None else _positive("size", size)
        self.uses_crop_size = size is None

    def draw(self, rng: np.random.Generator, batch: int, height: int, width: int, crop_size: int) -> Params:
        return {"size": crop_size if self.size is None else self.size}

    def apply(self, images: Tensor, params: Params) -> Tensor:
        return TF.center_crop(images, [params["size"]] * 2)


class _Flip(Transform):
    """Flips chosen per sample: draw() picks the horizontal and vertical ones."""

    def apply(self, images: Tensor, params: Params) -> Tensor:
        for axis, key in ((-1, "horizontal"), (-2, "vertical")):
            chosen = params[key]
            if chosen.any():
                images = torch.where(_per_sample(_on(images, chosen, torch.bool)), images.flip(axis), images)
        return images


@TRANSFORMS.register("random_horizontal_flip")
class RandomHorizontalFlip(_Flip):
    """With probability p, mirror left to right."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = _probability(p)

    def draw(self, rng: np.random.Generator, batch: int, height: int, width: int, crop_size: int) -> Params:
        return {"horizontal": _chance(rng, batch, self.p), "vertical": np.zeros(batch, bool)}


@TRANSFORMS.register("random_vertical_flip")
class RandomVerticalFlip(_Flip):
    """With probability p, flip upside down."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = _probability(p)

    def draw(self, rng: np.random.Generator, batch: int, height: int, width: int, crop_size: int) -> Params:
        return {"horizontal": np.zeros(batch, bool), "vertical": _chance(rng, batch, self.p)}


@TRANSFORMS.register("random_flip")
class RandomFlip(_Flip):
    """One of: horizontal flip, vertical flip, none, each with probability 1/3 (augment tiny)."""

    def draw(self, rng: np.random.Generator, batch: int, height: int, width: int, crop_size: int) -> Params:
        choice = rng.integers(3, size=batch)  # 0 horizontal, 1 vertical, 2 none
        return {"horizontal": choice == 0, "vertical": choice == 1}


@TRANSFORMS.register("random_translate")
class RandomTranslate(Transform):
    """With probability p, shift by whole pixels, filling the gap with `fill`.

    Default: each axis by a uniform integer in [-translate, translate] of its side. diagonal:
    the paper's code's shift, ceil(U(0, translate) * side) pixels per axis, both axes in the
    same direction (down-right or up-left, half the time each).
    """

    def __init__(self, translate: float = 0.1, p: float = 0.5, fill: float = 0.0, diagonal: bool = False) -> None:
        if not 0.0 <= translate < 1.0:
            raise ValueError(f"translate must be in [0, 1), got {translate}")
        self.translate, self.p, self.fill, self.diagonal = translate, _probability(p), _pixel("fill", fill), diagonal

    def draw(self, rng: np.random.Generator, batch: int, height: int, width: int, crop_size: int) -> Params:
        applies = _chance(rng, batch, self.p)
        sides = np.array([height, width])
        if self.diagonal:
            shift = np.ceil(rng.uniform(0.0, self.translate, (batch, 2)) * sides)
            shift *= np.where(rng.random(batch) < 0.5, 1, -1)[:, None]
        else:
            reach = np.floor(self.translate * sides)
            shift = np.floor(rng.random((batch, 2)) * (2 * reach + 1)) - reach
        return {"shift": shift * applies[:, None]}  # [B, (dy, dx)]

    def apply(self, images: Tensor, params: Params) -> Tensor:
        batch, channels, height, width = images.shape
        dy, dx = _on(images, params["shift"], torch.int64).unbind(1)
        rows = torch.arange(height, device=images.device) - dy[:, None]  # source row of each row [B, H]
        cols = torch.arange(width, device=images.device) - dx[:, None]
        out = images.gather(2, rows.clamp(0, height - 1)[:, None, :, None].expand(batch, channels, height, width))
        out = out.gather(3, cols.clamp(0, width - 1)[:, None, None, :].expand(batch, channels, height, width))
        inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
        return out.masked_fill_(~inside[:, None], self.fill)


# ----------------------------------------------------------------------------- occlusion
@TRANSFORMS.register("cutout")
class Cutout(Transform):
    """With probability p, fill `holes` boxes of `height` x `width` pixels with `fill` (boxes
    may overlap). Each of the three is one int (exactly that) or [min, max] (uniform, per image
    for holes, per hole for the sizes). The paper's code: 4 holes of 4 x 4, p 0.5."""

    renamed = {old: f"use {new}: [1, N] for up to N (one int means exactly N)"
               for old, new in (("max_holes", "holes"), ("max_height", "height"), ("max_width", "width"))}

    def __init__(self, holes: Tuple[int, ...] = (4,), height: Tuple[int, ...] = (4,), width: Tuple[int, ...] = (4,),
                 p: float = 0.5, fill: float = 0.0) -> None:
        self.holes, self.height, self.width = (_int_range(n, v) for n, v in
                                               (("holes", holes), ("height", height), ("width", width)))
        self.p, self.fill = _probability(p), _pixel("fill", fill)

    def draw(self, rng: np.random.Generator, batch: int, height: int, width: int, crop_size: int) -> Params:
        most = self.holes[1]
        count = rng.integers(self.holes[0], most + 1, size=batch)
        active = _chance(rng, batch, self.p)[:, None] & (np.arange(most) < count[:, None])  # [B, most]
        h = np.minimum(rng.integers(self.height[0], self.height[1] + 1, size=(batch, most)), height)
        w = np.minimum(rng.integers(self.width[0], self.width[1] + 1, size=(batch, most)), width)
        top = rng.integers(0, height - h + 1)
        left = rng.integers(0, width - w + 1)
        return {"boxes": np.stack([top, left, h, w], axis=-1), "active": active}

    def apply(self, images: Tensor, params: Params) -> Tensor:
        mask = _box_mask(images, _on(images, params["boxes"]), _on(images, params["active"], torch.bool))
        return images.masked_fill(mask, self.fill)


@TRANSFORMS.register("random_erasing")
class RandomErasing(Transform):
    """torchvision's RandomErasing: with probability p, fill one random box with value; the box
    has an area fraction in scale and an aspect ratio h/w in ratio (log-uniform), is smaller
    than the image on both sides, and is the first of 10 draws that fits (none: no erasing).

    value is a pixel value in [0, 1] before normalisation (the pipeline normalises last), so
    0 erases to black; torchvision's reference recipe erases after normalising, to the mean
    colour: give value the mean (e.g. 0.45) for that."""

    def __init__(self, p: float = 0.5, scale: Tuple[float, ...] = (0.02, 0.33),
                 ratio: Tuple[float, ...] = (0.3, 3.3), value: float = 0.0) -> None:
        self.p, self.scale, self.ratio = _probability(p), _pair("scale", scale, 0.0, 1.0), _pair("ratio", ratio)
        _positive("ratio", self.ratio[0])
        self.value = _pixel("value", value)

    def draw(self, rng: np.random.Generator, batch: int, height: int, width: int, crop_size: int) -> Params:
        # h/w log-uniform in ratio is w/h log-uniform in (1 / ratio[1], 1 / ratio[0])
        boxes, found = _sample_boxes(rng, batch, height, width, self.scale, (1 / self.ratio[1], 1 / self.ratio[0]),
                                     strict=True)
        return {"boxes": boxes[:, None], "active": (_chance(rng, batch, self.p) & found)[:, None]}

    def apply(self, images: Tensor, params: Params) -> Tensor:
        mask = _box_mask(images, _on(images, params["boxes"]), _on(images, params["active"], torch.bool))
        return images.masked_fill(mask, self.value)


# ----------------------------------------------------------------------------- photometric
@TRANSFORMS.register("random_gauss_noise")
class RandomGaussNoise(Transform):
    """With probability p, add Gaussian noise whose std (in [0, 1] pixel units) is drawn from std.

    The noise itself is drawn on the CPU too, so both placements add the same noise.
    """

    def __init__(self, std: Tuple[float, ...] = (0.01, 0.05), p: float = 0.5) -> None:
        self.std, self.p = _pair("std", std), _probability(p)

    def draw(self, rng: np.random.Generator, batch: int, height: int, width: int, crop_size: int) -> Params:
        applies = _chance(rng, batch, self.p)
        std = torch.as_tensor(_uniform(rng, batch, self.std), dtype=torch.float32)
        noise = torch.zeros(batch, 3, height, width)
        generator = torch.Generator().manual_seed(int(rng.integers(2**63)))
        noise[applies] = torch.randn((int(applies.sum()), 3, height, width), generator=generator)
        return {"noise": noise.mul_(_per_sample(std))}

    def apply(self, images: Tensor, params: Params) -> Tensor:
        return (images + _on(images, params["noise"])).clamp_(0.0, 1.0)


@TRANSFORMS.register("random_blur")
class RandomBlur(Transform):
    """With probability p, a Gaussian blur with sigma drawn from sigma (reflected edges, as
    torchvision's gaussian_blur)."""

    def __init__(self, kernel_size: int = 3, sigma: Tuple[float, ...] = (0.1, 1.5), p: float = 0.5) -> None:
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
        self.kernel_size, self.sigma, self.p = kernel_size, _pair("sigma", sigma), _probability(p)
        _positive("sigma", self.sigma[0])

    def draw(self, rng: np.random.Generator, batch: int, height: int, width: int, crop_size: int) -> Params:
        applies, sigma = _chance(rng, batch, self.p), _uniform(rng, batch, self.sigma)
        x = np.arange(self.kernel_size) - (self.kernel_size - 1) / 2
        kernels = np.exp(-0.5 * (x / sigma[:, None]) ** 2)
        kernels /= kernels.sum(axis=1, keepdims=True)
        kernels[~applies] = x == 0  # the identity kernel
        return {"kernels": kernels}  # [B, kernel_size]

    def apply(self, images: Tensor, params: Params) -> Tensor:
        batch, channels, height, width = images.shape
        kernels = _on(images, params["kernels"]).repeat_interleave(channels, dim=0)  # [B*3, k]
        pad = self.kernel_size // 2
        # one group per (sample, channel): [1, B*3, H, W], a row pass then a column pass
        x = nnf.pad(images.reshape(1, batch * channels, height, width), [pad] * 4, mode="reflect")
        x = nnf.conv2d(x, kernels[:, None, None, :], groups=batch * channels)
        x = nnf.conv2d(x, kernels[:, None, :, None], groups=batch * channels)
        return x.view(batch, channels, height, width)


@TRANSFORMS.register("random_gamma")
class RandomGamma(Transform):
    """With probability p, gamma correction (pixels ** gamma) with gamma drawn from gamma."""

    def __init__(self, gamma: Tuple[float, ...] = (0.8, 1.25), p: float = 0.5) -> None:
        self.gamma, self.p = _pair("gamma", gamma), _probability(p)
        _positive("gamma", self.gamma[0])

    def draw(self, rng: np.random.Generator, batch: int, height: int, width: int, crop_size: int) -> Params:
        applies = _chance(rng, batch, self.p)
        return {"gamma": np.where(applies, _uniform(rng, batch, self.gamma), 1.0)}

    def apply(self, images: Tensor, params: Params) -> Tensor:
        return images.pow(_per_sample(_on(images, params["gamma"])))


@TRANSFORMS.register("photometric_distort")
class PhotometricDistort(Transform):
    """A photometric distortion per sample: brightness, contrast, saturation, hue and a channel
    permutation, each applied with probability p, factors drawn from the [min, max] settings.

    style torchvision (RandomPhotometricDistort): brightness, then contrast (a blend with the
    mean grey) before or after the colour steps, half the time each, then saturation (a blend
    with the grey image) and hue (in turns), then the permutation.

    style cvnets (ml-cvnets v0.1's PhotometricDistort, the paper's code; SSD's distortion):
    contrast as a gain (pixels times the factor), brightness added, then saturation scaled and
    hue shifted in HSV, then, for a sample the first contrast left alone, contrast again with
    probability p; then the permutation. hue is the fork's delta: the shift is trunc(255 * delta)
    of OpenCV's 180 hue steps (up to 12 steps, 24 degrees, for delta 0.05), and a shift below
    hue 0 stops there. Brightness must be additive. The fork rounds to uint8 between the steps;
    this does not.

    additive_brightness: brightness is an offset added to the pixels (in [0, 1] units, e.g.
    [-0.2, 0.2], the paper's code) instead of a factor.
    """

    def __init__(self, brightness: Optional[Tuple[float, ...]] = None, contrast: Tuple[float, ...] = (0.5, 1.5),
                 saturation: Tuple[float, ...] = (0.5, 1.5), hue: Tuple[float, ...] = (-0.05, 0.05),
                 p: float = 0.5, additive_brightness: bool = False, style: PhotometricStyle = "torchvision") -> None:
        if style == "cvnets" and not additive_brightness:
            raise ValueError("style cvnets adds its brightness: set additive_brightness: true")
        default = (-0.125, 0.125) if additive_brightness else (0.875, 1.125)
        brightness = default if brightness is None else brightness
        self.brightness = _pair("brightness", brightness, -1.0, 1.0) if additive_brightness \
            else _pair("brightness", brightness)
        self.contrast, self.saturation = _pair("contrast", contrast), _pair("saturation", saturation)
        self.hue, self.p, self.additive_brightness = _pair("hue", hue, -0.5, 0.5), _probability(p), additive_brightness
        self.style = style

    def draw(self, rng: np.random.Generator, batch: int, height: int, width: int, crop_size: int) -> Params:
        acts = {k: _chance(rng, batch, self.p) for k in ("brightness", "contrast", "saturation", "hue", "permute")}

        def factor(key: str, identity: float) -> np.ndarray:
            return np.where(acts[key], _uniform(rng, batch, getattr(self, key)), identity)

        if self.style == "cvnets":
            before = factor("contrast", 1.0)
            again = _chance(rng, batch, self.p) & ~acts["contrast"]
            after = np.where(again, _uniform(rng, batch, self.contrast), 1.0)
        else:
            first = rng.random(batch) < 0.5
            contrast = factor("contrast", 1.0)
            before, after = np.where(first, contrast, 1.0), np.where(first, 1.0, contrast)
        permutation = np.where(acts["permute"][:, None], rng.permuted(np.tile(np.arange(3), (batch, 1)), axis=1),
                               np.arange(3))
        params = {"brightness": factor("brightness", 0.0 if self.additive_brightness else 1.0),
                  "contrast_before": before, "contrast_after": after,
                  "saturation": factor("saturation", 1.0), "hue": factor("hue", 0.0), "permutation": permutation}
        if self.style == "cvnets":
            params["hue"] = np.trunc(params["hue"] * 255.0) / 180.0  # whole OpenCV hue steps, in turns
        return params

    def apply(self, images: Tensor, params: Params) -> Tensor:
        brightness = _per_sample(_on(images, params["brightness"]))
        before, after = _on(images, params["contrast_before"]), _on(images, params["contrast_after"])
        saturation, hue = _on(images, params["saturation"]), _on(images, params["hue"])
        if self.style == "cvnets":
            x = (images * _per_sample(before) + brightness).clamp_(0.0, 1.0)
            x = _adjust_hsv(x, hue, saturation, floor_hue=True)
            x = (x * _per_sample(after)).clamp_(0.0, 1.0)
        else:
            x = (images + brightness if self.additive_brightness else images * brightness).clamp_(0.0, 1.0)
            x = self._contrast(x, before)
            x = _blend(x, _gray(x), saturation)
            if (params["hue"] != 0).any():
                x = _adjust_hsv(x, hue)
            x = self._contrast(x, after)
        permutation = _on(images, params["permutation"], torch.int64)[:, :, None, None]
        return x.gather(1, permutation.expand_as(x))

    @staticmethod
    def _contrast(images: Tensor, factor: Tensor) -> Tensor:
        return _blend(images, _gray(images).mean(dim=(1, 2, 3), keepdim=True), factor)


class _Torchvision(Transform):
    """A torchvision v2 transform that only exists per image: run once per sample, each run with
    torch's CPU generator seeded from the sample's draw (torchvision draws its parameters there
    whatever the image's device); the caller's random stream is left as it was."""

    def __init__(self, op: v2.Transform) -> None:
        self._op = op

    def draw(self, rng: np.random.Generator, batch: int, height: int, width: int, crop_size: int) -> Params:
        return {"seeds": rng.integers(2**63, size=batch)}

    def apply(self, images: Tensor, params: Params) -> Tensor:
        out = torch.empty_like(images)
        with torch.random.fork_rng(devices=[]):
            for b, seed in enumerate(params["seeds"].tolist()):
                torch.default_generator.manual_seed(seed)  # the CPU one only: CUDA streams stay untouched
                out[b] = self._op(images[b])
        return out

    def __repr__(self) -> str:
        return repr(self._op)


@TRANSFORMS.register("color_jitter")
class ColorJitter(_Torchvision):
    """torchvision ColorJitter (factors drawn from [max(0, 1 - x), 1 + x]; hue from [-h, h])."""

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
                 hue: float = 0.0) -> None:
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue}")
        super().__init__(v2.ColorJitter(brightness, contrast, saturation, hue))


@TRANSFORMS.register("rand_augment")
class RandAugment(_Torchvision):
    """torchvision's RandAugment (Cubuk et al. 2020): num_ops ops per image, each drawn from the
    paper's 14 (identity, shear x/y, translate x/y, rotate, brightness, color, contrast,
    sharpness, posterize, solarize, autocontrast, equalize) at bin `magnitude` of
    num_magnitude_bins, signed ops negated half the time. Geometric ops fill with 0 (black).
    It runs on the pipeline's float images (after the crop), not on uint8 ones: posterize
    floors at float levels and equalize bins to 256 levels, as torchvision does for floats."""

    def __init__(self, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31,
                 interpolation: Interpolation = "nearest") -> None:
        if not 0 <= magnitude < num_magnitude_bins:
            raise ValueError(f"magnitude must be in [0, num_magnitude_bins), got {magnitude}")
        super().__init__(v2.RandAugment(num_ops, magnitude, num_magnitude_bins, InterpolationMode(interpolation)))


@TRANSFORMS.register("trivial_augment")
class TrivialAugment(_Torchvision):
    """torchvision's TrivialAugmentWide (Mueller & Hutter 2021): one of RandAugment's 14 ops
    per image at a magnitude bin drawn uniformly, over the paper's wide ranges (shear 0.99,
    translate 32 px whatever the image size, rotate 135 degrees, enhance 0.99). Float images,
    as rand_augment."""

    def __init__(self, num_magnitude_bins: int = 31, interpolation: Interpolation = "nearest") -> None:
        super().__init__(v2.TrivialAugmentWide(_positive("num_magnitude_bins", num_magnitude_bins),
                                               InterpolationMode(interpolation)))


# ----------------------------------------------------------------------------- composition
@TRANSFORMS.register("random_order")
class RandomOrder(Transform):
    """Apply the nested list `transforms` in a random order drawn per sample (the paper's
    "augment tiny"). They must keep the image size, so that every order gives one batch."""

    def __init__(self, transforms: Tuple[Dict[str, Any], ...] = ()) -> None:
        self.steps = [build_transform(entry, f"transforms[{i}]") for i, entry in enumerate(transforms)]
        for i, (entry, step) in enumerate(zip(transforms, self.steps)):
            if not step.keeps_size:
                raise ValueError(f"transforms[{i}]: {entry['name']} changes the image size; "
                                 f"list it before random_order instead")

    def draw(self, rng: np.random.Generator, batch: int, height: int, width: int, crop_size: int) -> Params:
        order = np.argsort(rng.random((batch, len(self.steps))), axis=1)  # [B, position] -> step
        seeds = rng.integers(2**63, size=len(self.steps))
        steps = [step.draw(np.random.default_rng(int(seed)), batch, height, width, crop_size)
                 for step, seed in zip(self.steps, seeds)]
        return {"order": order, "steps": steps}

    def apply(self, images: Tensor, params: Params) -> Tensor:
        order = params["order"]
        out = images.clone()
        for position in range(order.shape[1]):
            for k, step in enumerate(self.steps):
                chosen = np.flatnonzero(order[:, position] == k)  # samples whose step at this position is k
                if len(chosen):
                    index = _on(images, chosen, torch.int64)
                    out[index] = step.apply(out[index], select(params["steps"][k], chosen))
        return out


def select(params: Any, chosen: np.ndarray) -> Any:
    """The chosen samples' rows of a transform's draws (nested ones, e.g. random_order's, too)."""
    if isinstance(params, dict):
        return {key: select(value, chosen) for key, value in params.items()}
    if isinstance(params, list):
        return [select(value, chosen) for value in params]
    return params[torch.as_tensor(chosen)] if isinstance(params, Tensor) else params[chosen]

