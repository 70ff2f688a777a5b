"""Pieces shared by the data package: its errors, the dataset registry, reading one image."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from options.config import ConfigError
from options.registry import Registry

DATASETS = Registry("dataset")

# A child of the engine's "cvnets" logger: long one-off steps (download, unpack, cache build)
# reach its log file; progress bars are for terminals only.
logger = logging.getLogger("cvnets.data")

IMAGE_SIZE = 64  # TinyImageNet's side length; every decoded image has it


class DatasetError(ConfigError):
    """A dataset on disk that cannot be used. The one-line message names the path and the fix.

    A ConfigError, so entry points report it like a bad setting: one line, exit status 2.
    """

    def __init__(self, message: str) -> None:
        super().__init__(_original_line(message, type(self).__name__))


class CorruptImageError(DatasetError):
    """An image file that cannot be decoded."""

    @classmethod
    def for_file(cls, path: str, reason: str) -> "CorruptImageError":
        return cls(
            f"cannot decode image {path} ({reason}); replace or delete the file, "
            f"or set dataset.skip_corrupt: true to skip unreadable images"
        )


def _original_line(message: str, type_name: str) -> str:
    """The error's own line, also when a DataLoader worker re-raised it.

    torch re-raises a worker's exception as `type(text)` where the text holds the whole worker
    traceback; its last line is `<module>.<Type>: <original message>`.
    """
    if "\n" not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    marker = f"{type_name}: "
    return last.split(marker, 1)[1] if marker in last else last


def decode_image(path: str, size: int = IMAGE_SIZE) -> np.ndarray:
    """Decode an image file into a writable uint8 array [size, size, 3] (RGB).

    Grayscale, palette and CMYK files become RGB. An image of another size is resized
    (bilinear) so that the JPEG path and the decoded cache always agree pixel for pixel.
    """
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # PIL reports truncated and garbled files as OSError/SyntaxError; keep its reason.
        raise CorruptImageError.for_file(path, str(e) or type(e).__name__) from None
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.BILINEAR)
    return np.array(rgb)  # a copy: np.asarray of a PIL image is read-only


def progress_bar(enabled: bool, iterable: Any = None, **kwargs: Any) -> tqdm:
    """A tqdm bar shown only when enabled and stderr is a terminal (log files stay clean)."""
    return tqdm(iterable, disable=None if enabled else True, **kwargs)


class SeededList(list):
    """A list (a batch of sampler items, or the samples built from them) with a seed attached.

    Batch samplers yield these so that a batch's augmentations are drawn from its own seed:
    the same (seed, epoch) gives the same augmented batches whatever the number of workers,
    with persistent workers, and after resuming. It pickles to DataLoader workers like a list.
    """

    def __init__(self, items=(), seed: int = 0) -> None:
        super().__init__(items)
        self.seed = seed
