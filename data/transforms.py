"""Per-image augmentations, registered by name and built from image_augmentation.train / .val.

Contract: a transform is called as `t(image, crop_size)` with a CHW tensor [3, H, W], either
uint8 (what the datasets produce) or float in [0, 1], and returns a tensor of the same dtype
and value range without modifying its input (which may be a view). Transforms whose output size follows the batch's crop size (given by the
sampler) say so with `uses_crop_size`. Randomness comes from torch's global generator only,
which the dataset seeds per batch (see data.base.SeededList).

Scaling to float [0, 1], the optional mean/std normalisation and mixup/cutmix act on whole
batches in data.collate. A config entry is `{name: <registered name>, <setting>: value, ...}`;
settings are the keyword arguments of the transform's constructor, checked against its type
hints, so a typo is an error with a "did you mean".
"""
from __future__ import annotations

import inspect
import math
import typing
from typing import Any, Dict, Literal, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as F
from torchvision.transforms import InterpolationMode

from options.config import ConfigError, coerce
from options.registry import Registry, did_you_mean

TRANSFORMS = Registry("transform")

Interpolation = Literal["nearest", "bilinear", "bicubic"]
_TORCH_MODES = {"nearest": "nearest-exact", "bilinear": "bilinear", "bicubic": "bicubic"}
_BATCH_LEVEL = {  # names users may try to list per image, and where they live instead
    "normalization": "set image_augmentation.mean and image_augmentation.std instead",
    "normalize": "set image_augmentation.mean and image_augmentation.std instead",
    "to_tensor": "images are tensors already and become float [0, 1] per batch; remove the entry",
    "mixup": "set image_augmentation.mixup.mixup_alpha instead",
    "cutmix": "set image_augmentation.mixup.cutmix_alpha instead",
}


class Transform:
    """Base class; see the module docstring for the contract."""

    uses_crop_size = False  # True when the output size follows the batch's crop size

    def __call__(self, image: torch.Tensor, crop_size: int) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        shown = {k: v for k, v in vars(self).items() if not k.startswith("_") and k != "uses_crop_size"}
        settings = ", ".join(f"{k}={v!r}" for k, v in shown.items())
        return f"{type(self).__name__}({settings})"


class Compose(Transform):
    """Apply steps in order."""

    def __init__(self, steps: Sequence[Transform]) -> None:
        self.steps = list(steps)
        self.uses_crop_size = any(s.uses_crop_size for s in self.steps)

    def __call__(self, image: torch.Tensor, crop_size: int) -> torch.Tensor:
        for step in self.steps:
            image = step(image, crop_size)
        return image


# ----------------------------------------------------------------------------- building from config
def build_pipeline(entries: Sequence[Mapping[str, Any]], where: str) -> Compose:
    """A Compose of the transforms listed at config key `where`."""
    return Compose([build_transform(entry, f"{where}[{i}]") for i, entry in enumerate(entries)])


def build_transform(entry: Mapping[str, Any], where: str) -> Transform:
    """One transform from `{name: ..., settings}`; every problem is a ConfigError naming `where`."""
    name = entry.get("name")
    if name in _BATCH_LEVEL:
        raise ConfigError(f"{where}: {name} is not a per-image transform; {_BATCH_LEVEL[name]}")
    if name not in TRANSFORMS:
        raise ConfigError(
            f"{where}: unknown transform {name!r}; known: {', '.join(TRANSFORMS.names())}"
            f"{did_you_mean(name, TRANSFORMS.names())}"
        )
    cls = TRANSFORMS.get(name)
    try:
        return cls(**_settings(cls, entry))
    except ValueError as e:  # ConfigError included: nested entries (random_order) get this prefix too
        raise ConfigError(f"{where} ({name}): {e}") from None


def _settings(cls: type, entry: Mapping[str, Any]) -> Dict[str, Any]:
    """The entry's settings, validated against the type hints of cls.__init__."""
    hints = typing.get_type_hints(cls.__init__)
    known = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    settings = {}
    for raw_key, value in entry.items():
        key = str(raw_key).replace("-", "_")
        if key == "name":
            continue
        if key not in known:
            raise ValueError(
                f"unknown setting {raw_key!r}{did_you_mean(key, known)} (settings: {', '.join(known) or 'none'})"
            )
        settings[key] = coerce(value, hints[key], key)
    return settings


# ----------------------------------------------------------------------------- helpers
def _chance(p: float) -> bool:
    return p > 0 and torch.rand(()).item() < p


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high]."""
    return int(torch.randint(low, high + 1, ()).item())


def _max_value(image: torch.Tensor) -> float:
    return 255.0 if image.dtype == torch.uint8 else 1.0


def _as_float(image: torch.Tensor) -> torch.Tensor:
    return image.float() / 255.0 if image.dtype == torch.uint8 else image


def _like(values: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Float [0, 1] values back in the dtype and range of `reference`."""
    values = values.clamp(0.0, 1.0)
    return values.mul(255.0).round_().to(torch.uint8) if reference.dtype == torch.uint8 else values.to(reference.dtype)


def _resize(image: torch.Tensor, height: int, width: int, interpolation: str) -> torch.Tensor:
    """Resize with antialiasing (torch's uint8 kernels are fast on channels-last images)."""
    if image.shape[-2:] == (height, width):
        return image
    mode = _TORCH_MODES[interpolation]
    smooth = {"antialias": True, "align_corners": False} if mode != "nearest-exact" else {}
    out = nnf.interpolate(image[None], size=(height, width), mode=mode, **smooth)[0]
    return out.clamp_(0.0, 1.0) if out.is_floating_point() and mode == "bicubic" else out  # bicubic overshoots


def _pair(name: str, value: Sequence[float], low: float = 0.0, high: float = math.inf) -> Tuple[float, float]:
    """A (min, max) setting with low <= min <= max <= high."""
    if len(value) != 2 or not low <= value[0] <= value[1] <= high:
        raise ValueError(f"{name} must be [min, max] with {low} <= min <= max <= {high}, got {list(value)}")
    return float(value[0]), float(value[1])


def _probability(p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    return p


def _positive(name: str, value: float) -> Any:
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _pixel(name: str, value: float) -> float:
    """A fill value, given in [0, 1] pixel units whatever the image dtype."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} is a pixel value in [0, 1], got {value}")
    return value


def _sample_box(height: int, width: int, scale: Tuple[float, float], ratio: Tuple[float, float],
                attempts: int = 10) -> Optional[Tuple[int, int, int, int]]:
    """(top, left, h, w) of a random box with area fraction in scale and aspect w/h in ratio.

    All attempts are drawn in one call, which is much cheaper than one draw per number.
    """
    area = height * width
    draws = torch.rand(attempts, 4).tolist()
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for s, r, u, v in draws:
        target = area * (scale[0] + (scale[1] - scale[0]) * s)
        aspect = math.exp(log_low + (log_high - log_low) * r)
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(u * (height - h + 1)), int(v * (width - w + 1)), h, w
    return None


# ----------------------------------------------------------------------------- geometry
@TRANSFORMS.register("random_resized_crop")
class RandomResizedCrop(Transform):
    """A random box (area fraction in scale, aspect ratio in ratio) resized to the crop size."""

    uses_crop_size = True

    def __init__(self, scale: Tuple[float, ...] = (0.08, 1.0), ratio: Tuple[float, ...] = (3 / 4, 4 / 3),
                 interpolation: Interpolation = "bilinear") -> None:
        self.scale = _pair("scale", scale, 0.0, 1.0)
        self.ratio = _pair("ratio", ratio)
        _positive("ratio", self.ratio[0])
        self.interpolation = interpolation

    def __call__(self, image: torch.Tensor, crop_size: int) -> torch.Tensor:
        height, width = image.shape[-2:]
        box = _sample_box(height, width, self.scale, self.ratio)
        if box is None:  # the aspect range excludes the whole image: take the central box instead
            side = min(height, width)
            box = ((height - side) // 2, (width - side) // 2, side, side)
        top, left, h, w = box
        return _resize(image[:, top:top + h, left:left + w], crop_size, crop_size, self.interpolation)


@TRANSFORMS.register("resize")
class Resize(Transform):
    """Resize the shorter side to `size` (default: the crop size + 8, the paper's val setting)."""

    def __init__(self, size: Optional[int] = None, interpolation: Interpolation = "bilinear") -> None:
        self.size = size if size is None else _positive("size", size)
        self.interpolation = interpolation
        self.uses_crop_size = size is None

    def __call__(self, image: torch.Tensor, crop_size: int) -> torch.Tensor:
        size = crop_size + 8 if self.size is None else self.size
        height, width = image.shape[-2:]
        short = min(height, width)
        return _resize(image, round(height * size / short), round(width * size / short), self.interpolation)


@TRANSFORMS.register("center_crop")
class CenterCrop(Transform):
    """The central size x size box (default size: the crop size); pads with zeros if smaller."""

    def __init__(self, size: Optional[int] = None) -> None:
        self.size = size if size is None else _positive("size", size)
        self.uses_crop_size = size is None

    def __call__(self, image: torch.Tensor, crop_size: int) -> torch.Tensor:
        size = crop_size if self.size is None else self.size
        return F.center_crop(image, [size, size])


@TRANSFORMS.register("random_horizontal_flip")
class RandomHorizontalFlip(Transform):
    def __init__(self, p: float = 0.5) -> None:
        self.p = _probability(p)

    def __call__(self, image: torch.Tensor, crop_size: int) -> torch.Tensor:
        return image.flip(-1) if _chance(self.p) else image


@TRANSFORMS.register("random_vertical_flip")
class RandomVerticalFlip(Transform):
    def __init__(self, p: float = 0.5) -> None:
        self.p = _probability(p)

    def __call__(self, image: torch.Tensor, crop_size: int) -> torch.Tensor:
        return image.flip(-2) if _chance(self.p) else image


@TRANSFORMS.register("random_translate")
class RandomTranslate(Transform):
    """Shift by up to `translate` of the width/height (whole pixels), filling the gap with `fill`."""

    def __init__(self, translate: float = 0.1, p: float = 0.5, fill: float = 0.0) -> None:
        if not 0.0 <= translate < 1.0:
            raise ValueError(f"translate must be in [0, 1), got {translate}")
        self.translate, self.p, self.fill = translate, _probability(p), _pixel("fill", fill)

    def __call__(self, image: torch.Tensor, crop_size: int) -> torch.Tensor:
        if not _chance(self.p):
            return image
        height, width = image.shape[-2:]
        dy = _randint(-int(self.translate * height), int(self.translate * height))
        dx = _randint(-int(self.translate * width), int(self.translate * width))
        out = torch.full_like(image, self.fill * _max_value(image))
        # source rows [max(0, -dy), height - max(0, dy)) land at [max(0, dy), height - max(0, -dy))
        out[:, max(0, dy):height - max(0, -dy), max(0, dx):width - max(0, -dx)] = \
            image[:, max(0, -dy):height - max(0, dy), max(0, -dx):width - max(0, dx)]
        return out


# ----------------------------------------------------------------------------- occlusion
@TRANSFORMS.register("cutout")
class Cutout(Transform):
    """With probability p, fill 1..max_holes boxes of up to max_height x max_width pixels
    (the paper's code: 4 holes of up to 4x4 pixels, p = 0.5)."""

    def __init__(self, max_holes: int = 4, max_height: int = 4, max_width: int = 4, p: float = 0.5,
                 fill: float = 0.0) -> None:
        self.max_holes, self.max_height = _positive("max_holes", max_holes), _positive("max_height", max_height)
        self.max_width, self.p, self.fill = _positive("max_width", max_width), _probability(p), _pixel("fill", fill)

    def __call__(self, image: torch.Tensor, crop_size: int) -> torch.Tensor:
        if not _chance(self.p):
            return image
        height, width = image.shape[-2:]
        out = image.clone()
        for _ in range(_randint(1, self.max_holes)):
            h, w = min(_randint(1, self.max_height), height), min(_randint(1, self.max_width), width)
            top, left = _randint(0, height - h), _randint(0, width - w)
            out[:, top:top + h, left:left + w] = self.fill * _max_value(image)
        return out


@TRANSFORMS.register("random_erasing")
class RandomErasing(Transform):
    """With probability p, fill one random box (area fraction in scale, aspect in ratio) with value."""

    def __init__(self, p: float = 0.5, scale: Tuple[float, ...] = (0.02, 0.33),
                 ratio: Tuple[float, ...] = (0.3, 3.3), value: float = 0.0) -> None:
        self.p, self.scale, self.ratio = _probability(p), _pair("scale", scale, 0.0, 1.0), _pair("ratio", ratio)
        _positive("ratio", self.ratio[0])
        self.value = _pixel("value", value)

    def __call__(self, image: torch.Tensor, crop_size: int) -> torch.Tensor:
        if not _chance(self.p):
            return image
        box = _sample_box(*image.shape[-2:], self.scale, self.ratio)
        if box is None:
            return image
        top, left, h, w = box
        out = image.clone()
        out[:, top:top + h, left:left + w] = self.value * _max_value(image)
        return out


# ----------------------------------------------------------------------------- photometric
@TRANSFORMS.register("random_gauss_noise")
class RandomGaussNoise(Transform):
    """With probability p, add Gaussian noise whose std (in [0, 1] pixel units) is drawn from std."""

    def __init__(self, std: Tuple[float, ...] = (0.01, 0.05), p: float = 0.5) -> None:
        self.std, self.p = _pair("std", std), _probability(p)

    def __call__(self, image: torch.Tensor, crop_size: int) -> torch.Tensor:
        if not _chance(self.p):
            return image
        values = _as_float(image)
        return _like(values + torch.randn_like(values) * _uniform(*self.std), image)


@TRANSFORMS.register("random_blur")
class RandomBlur(Transform):
    """With probability p, a Gaussian blur with sigma drawn from sigma."""

    def __init__(self, kernel_size: int = 3, sigma: Tuple[float, ...] = (0.1, 1.5), p: float = 0.5) -> None:
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
        self.kernel_size, self.sigma, self.p = kernel_size, _pair("sigma", sigma), _probability(p)
        _positive("sigma", self.sigma[0])

    def __call__(self, image: torch.Tensor, crop_size: int) -> torch.Tensor:
        if not _chance(self.p):
            return image
        sigma = _uniform(*self.sigma)
        return F.gaussian_blur(image, [self.kernel_size, self.kernel_size], [sigma, sigma])


@TRANSFORMS.register("random_gamma")
class RandomGamma(Transform):
    """With probability p, gamma correction with gamma drawn from gamma."""

    def __init__(self, gamma: Tuple[float, ...] = (0.8, 1.25), p: float = 0.5) -> None:
        self.gamma, self.p = _pair("gamma", gamma), _probability(p)
        _positive("gamma", self.gamma[0])

    def __call__(self, image: torch.Tensor, crop_size: int) -> torch.Tensor:
        return F.adjust_gamma(image, _uniform(*self.gamma)) if _chance(self.p) else image


class _Torchvision(Transform):
    """A torchvision v2 transform; they accept uint8 and float images alike."""

    def __init__(self, op: v2.Transform) -> None:
        self._op = op

    def __call__(self, image: torch.Tensor, crop_size: int) -> torch.Tensor:
        return self._op(image)

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


@TRANSFORMS.register("photometric_distort")
class PhotometricDistort(_Torchvision):
    """torchvision RandomPhotometricDistort: brightness, contrast, saturation, hue and channel
    order, each applied with probability p."""

    def __init__(self, brightness: Tuple[float, ...] = (0.875, 1.125), contrast: Tuple[float, ...] = (0.5, 1.5),
                 saturation: Tuple[float, ...] = (0.5, 1.5), hue: Tuple[float, ...] = (-0.05, 0.05),
                 p: float = 0.5) -> None:
        super().__init__(v2.RandomPhotometricDistort(
            _pair("brightness", brightness), _pair("contrast", contrast), _pair("saturation", saturation),
            _pair("hue", hue, -0.5, 0.5), _probability(p),
        ))


@TRANSFORMS.register("rand_augment")
class RandAugment(_Torchvision):
    """torchvision RandAugment."""

    def __init__(self, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31,
                 interpolation: Interpolation = "nearest") -> None:
        if not 0 <= magnitude < num_magnitude_bins:
            raise ValueError(f"magnitude must be in [0, num_magnitude_bins), got {magnitude}")
        super().__init__(v2.RandAugment(num_ops, magnitude, num_magnitude_bins, InterpolationMode(interpolation)))


@TRANSFORMS.register("trivial_augment")
class TrivialAugment(_Torchvision):
    """torchvision TrivialAugmentWide."""

    def __init__(self, num_magnitude_bins: int = 31, interpolation: Interpolation = "nearest") -> None:
        super().__init__(v2.TrivialAugmentWide(_positive("num_magnitude_bins", num_magnitude_bins),
                                               InterpolationMode(interpolation)))


# ----------------------------------------------------------------------------- composition
@TRANSFORMS.register("random_order")
class RandomOrder(Transform):
    """Apply the nested list `transforms` in a random order (the paper's "augment tiny")."""

    def __init__(self, transforms: Tuple[Dict[str, Any], ...] = ()) -> None:
        self.steps = [build_transform(entry, f"transforms[{i}]") for i, entry in enumerate(transforms)]
        self.uses_crop_size = any(s.uses_crop_size for s in self.steps)

    def __call__(self, image: torch.Tensor, crop_size: int) -> torch.Tensor:
        for k in torch.randperm(len(self.steps)).tolist():
            image = self.steps[k](image, crop_size)
        return image
