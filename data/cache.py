"""Decode a split's images once into one uint8 array [N, 64, 64, 3].

Decoding 100,000 small JPEGs every epoch is the main cost of a TinyImageNet loader; slicing
an array is not. `memory` decodes at start-up into RAM; `disk` writes an .npy file (opened
memory-mapped, so the page cache shares it between DataLoader workers) and reuses it while a
fingerprint of the file list, sizes and modification times still matches. Pixels come from
the same decode_image as the JPEG path, so both paths agree exactly.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data.base import IMAGE_SIZE, CorruptImageError, DatasetError, decode_image, logger, progress_bar

CACHE_VERSION = 1  # bump when the decoded pixels or the file format change
_CHUNK = 256  # images decoded per worker task


@dataclass
class DecodedImages:
    images: np.ndarray  # [N, S, S, 3] uint8; rows of unreadable files stay zero
    unreadable: List[int]  # positions (into the path list) of files that could not be decoded


def decode_all(paths: Sequence[str], workers: int = 0, progress: bool = True, desc: str = "decode") -> DecodedImages:
    """Decode every file into a new in-memory array, using `workers` processes."""
    images = np.zeros((len(paths), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    unreadable = _decode_into(paths, images.__setitem__, workers, progress, desc)
    return DecodedImages(images, unreadable)


def find_unreadable(paths: Sequence[str], workers: int = 0, progress: bool = True) -> List[int]:
    """Positions of files that cannot be decoded (decodes everything, keeps nothing)."""
    return _decode_into(paths, lambda rows, pixels: None, workers, progress, "check images")


def disk_cache(paths: Sequence[str], prefix: str, workers: int = 0, progress: bool = True) -> DecodedImages:
    """The decoded images stored at `<prefix>.npy` (+ `.json`), rebuilt when the files changed."""
    meta_path, array_path = prefix + ".json", prefix + ".npy"
    expected = {"version": CACHE_VERSION, "size": IMAGE_SIZE, "count": len(paths), "fingerprint": fingerprint(paths)}
    meta = _read_json(meta_path)
    if meta is not None and all(meta.get(k) == v for k, v in expected.items()) and os.path.isfile(array_path):
        return DecodedImages(np.load(array_path, mmap_mode="r"), list(meta["unreadable"]))
    unreadable = _write_array(paths, array_path, meta_path, workers, progress)
    _write_json(meta_path, {**expected, "unreadable": unreadable})
    return DecodedImages(np.load(array_path, mmap_mode="r"), unreadable)


def fingerprint(paths: Sequence[str]) -> str:
    """Hash of the file list in dataset order with each file's size and modification time."""
    digest = hashlib.sha256(f"v{CACHE_VERSION}:{IMAGE_SIZE}\n".encode())
    for path in paths:
        st = os.stat(path)
        digest.update(f"{path}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class _FileDecoder(Dataset):
    """Item i: (pixels uint8 [S, S, 3], whether file i could be decoded)."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, bool]:
        try:
            return torch.from_numpy(decode_image(self.paths[i])), True
        except CorruptImageError:
            return torch.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8), False


def _decode_into(paths: Sequence[str], store: Callable[[slice, np.ndarray], None], workers: int,
                 progress: bool, desc: str) -> List[int]:
    """Decode in chunks on DataLoader worker processes (threads do not help: decoding a small
    JPEG is mostly Python-side work under the GIL) and store each chunk; return unreadable rows."""
    logger.info("%s: decoding %d images", desc, len(paths))
    chunks = DataLoader(_FileDecoder(paths), batch_size=_CHUNK, num_workers=workers)
    unreadable: List[int] = []
    with progress_bar(progress, total=len(paths), desc=desc, unit="img") as bar:
        for start, (pixels, readable) in zip(range(0, len(paths), _CHUNK), chunks):
            store(slice(start, start + len(readable)), pixels.numpy())
            unreadable += (start + np.flatnonzero(~readable.numpy())).tolist()
            bar.update(len(readable))
    return unreadable


def _write_array(paths: Sequence[str], array_path: str, meta_path: str, workers: int, progress: bool) -> List[int]:
    folder = os.path.dirname(array_path)
    try:
        os.makedirs(folder, exist_ok=True)
        _remove(meta_path)  # from here on no stale metadata can vouch for a half-replaced array
        tmp = f"{array_path}.tmp-{os.getpid()}"
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                          shape=(len(paths), IMAGE_SIZE, IMAGE_SIZE, 3))
    except OSError as e:
        raise DatasetError(
            f"cannot write the decoded cache in {folder} ({e.strerror}); make it writable, "
            f"set dataset.cache_dir to a writable folder, or use dataset.cache: memory"
        ) from None
    try:
        unreadable = _decode_into(paths, array.__setitem__, workers, progress, f"cache {os.path.basename(array_path)}")
        array.flush()
        del array
        os.replace(tmp, array_path)
    except BaseException:
        _remove(tmp)
        raise
    return unreadable


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
