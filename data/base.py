"""Pieces shared by the data package: its errors, the dataset registry, reading one image, the
batch types that travel from the sampler through the DataLoader to the augmentation, and the
DataLoader workers' signal handling."""
from __future__ import annotations

import functools
import logging
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from data import IMAGE_SIZE
from options.registry import Registry

DATASETS = Registry("dataset", config_key="dataset.name")

# A child of the engine's "cvnets" logger: long one-off steps (download, unpack, cache build)
# reach its log file; progress bars are for terminals only.
logger = logging.getLogger("cvnets.data")


class DatasetError(Exception):
    """A dataset on disk that cannot be used. The one-line message names the path and the fix."""

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

    Every colour mode becomes 8-bit RGB by its meaning, not by PIL's clipping convert("RGB"):
    16-bit grayscale (I;16*, and I holding 0..65535) is scaled by 255/65535; an image with
    transparency (RGBA, LA, PA, or a transparent colour in a palette, grayscale or RGB PNG) is composited over black, so
    whatever colour hides under alpha 0 never reaches training; grayscale, palette, bilevel,
    CMYK, YCbCr and HSV convert as PIL defines them. Float pixels (F) have no agreed range and
    Lab needs a colour profile: such files are refused, naming the file. An image of another
    size is resized (bilinear) so that the JPEG path and the decoded cache agree pixel for pixel.
    """
    try:
        with Image.open(path) as img:
            img.load()
            rgb = _to_rgb(img, path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # PIL reports truncated and garbled files as OSError/SyntaxError; keep its reason.
        raise CorruptImageError.for_file(path, str(e) or type(e).__name__) from None
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.BILINEAR)
    return np.array(rgb)  # a copy: np.asarray of a PIL image is read-only


_PLAIN_MODES = ("RGB", "RGBX", "L", "1", "P", "CMYK", "YCbCr", "HSV")  # PIL's convert("RGB") is right for these
_ALPHA_MODES = ("RGBA", "LA", "PA")
_UNSUPPORTED_MODE = "mode {mode} ({what}) is not supported; save it as 8-bit RGB, grayscale or palette"


def _to_rgb(img: Image.Image, path: str) -> Image.Image:
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(img, dtype=np.int64)  # I;16B and friends arrive in native order
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(_UNSUPPORTED_MODE.format(mode=mode, what="32-bit integers beyond 16 bits"))
        gray = ((values * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB", "1") and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint32)
        over_black = (rgba[..., :3] * rgba[..., 3:] + 127) // 255  # round(c * a / 255)
        return Image.fromarray(over_black.astype(np.uint8), "RGB")
    if mode in _PLAIN_MODES:
        return img.convert("RGB")
    what = {"F": "32-bit float pixels have no agreed range", "LAB": "Lab colour needs a colour profile"}
    raise ValueError(_UNSUPPORTED_MODE.format(mode=mode, what=what.get(mode, "an unusual pixel format")))


def lock_beside(path: str) -> str:
    """The lock file that the writers of `path` (a dataset root, a decoded cache) take: `.<name>.lock`
    in the same folder."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}.lock")


def progress_bar(enabled: bool, iterable: Any = None, **kwargs: Any) -> tqdm:
    """A tqdm bar shown only when enabled and stderr is a terminal (log files stay clean)."""
    return tqdm(iterable, disable=None if enabled else True, **kwargs)


# ----------------------------------------------------------------------------- batches
@dataclass(frozen=True)
class BatchSpec:
    """One batch as a sampler draws it: which samples, at which crop size, and the seed of all
    its random augmentation draws. Batches are a pure function of their spec, so the number of
    DataLoader workers, persistent workers or a resume cannot change them."""

    indices: Tuple[int, ...]  # dataset indices
    crop_size: int
    seed: int
    epoch: int = 0  # the training epoch it belongs to (mixup's off_epochs reads it)

    def __len__(self) -> int:
        return len(self.indices)


class RawBatch(NamedTuple):
    """A batch before augmentation: what the dataset (or a device-resident split) delivers."""

    images: torch.Tensor  # uint8 [B, 3, 64, 64], any strides (often a view of [B, 64, 64, 3])
    labels: torch.Tensor  # int64 [B]: class indices, or dataset indices for the unlabelled test split
    spec: BatchSpec

    def to(self, device: torch.device) -> "RawBatch":
        """On `device`; asynchronous from pinned memory (a no-op when already there)."""
        return RawBatch(self.images.to(device, non_blocking=True), self.labels.to(device, non_blocking=True),
                        self.spec)


def on_device(values: Any, device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Host values (a tensor, array or list) as a tensor on `device`. For a CUDA device the copy
    goes through pinned memory asynchronously, so that the host never waits for the device to
    catch up (a copy from pageable memory would)."""
    tensor = torch.as_tensor(values, dtype=dtype)
    if device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


# ----------------------------------------------------------------------------- workers
def worker_init(parent_pid: int) -> Callable[[int], None]:
    """A DataLoader worker_init_fn that leaves SIGINT, SIGTERM, SIGUSR1 and SIGHUP to the main process
    (`parent_pid`, the process building the DataLoader).

    timeout, SLURM and Ctrl-C signal every process of the job; a worker that died of it would
    break the main process's iteration before it could save and exit (a closed terminal sends
    SIGHUP to all of them). SIGINT, SIGUSR1 and SIGHUP are ignored. SIGTERM is ignored too,
    except from the main process itself: multiprocessing ends workers that way (terminate() at
    interpreter exit, or when they fail to join), and a worker deaf to it would keep the main
    process waiting for ever.
    """
    return functools.partial(_leave_signals, parent_pid)


# The signals that stop a run (engine.signals.STOP_SIGNALS, which this layer may not import).
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP}


class WorkerDataLoader(DataLoader):
    """A DataLoader whose workers never meet a stop signal before worker_init has set them up.

    A worker is a fork of the main process and runs its signal handlers until worker_init
    replaces them; a signal to the process group in that window could kill the worker (and
    with it the main process's iteration) instead of letting the main process save. So the
    stop signals are blocked in the calling thread while the iterator forks its workers: the
    workers inherit the block and worker_init takes it from there; the main process gets its
    pending signal the moment the block is lifted."""

    def _get_iterator(self):
        if self.num_workers == 0 or threading.current_thread() is not threading.main_thread():
            return super()._get_iterator()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            return super()._get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _leave_signals(parent_pid: int, worker_id: int) -> None:
    for sig in _STOP_SIGNALS - {signal.SIGTERM}:
        signal.signal(sig, signal.SIG_IGN)
    # Blocked in this thread and so in every thread it starts: a SIGTERM stays pending until the
    # watcher takes it, with its sender.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_exit_on_terminate, args=(parent_pid,), name="sigterm-watch", daemon=True).start()


def _exit_on_terminate(parent_pid: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent_pid:
            os._exit(0)  # as a worker terminated by the default action would, minus the signal status
