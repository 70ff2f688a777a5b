"""Decode a split's images once into one uint8 array [N, 64, 64, 3].

Decoding 100,000 small JPEGs every epoch is the main cost of a TinyImageNet loader; slicing
an array is not. `memory` decodes at start-up into RAM; `disk` writes an .npy file (opened
memory-mapped, so the page cache shares it between DataLoader workers) and reuses it while a
fingerprint of the file list, sizes and modification times still matches. Pixels come from
the same decode_image as the JPEG path, so both paths agree exactly.

The disk cache checks itself when opened (header, shape, dtype, file size and a CRC-32 of every
pixel, about half a second per GB once the file is in the page cache, where training wants it
anyway) and is rebuilt, with a warning saying why, when any check fails. It is
written through a uniquely named temporary file (utils/files.py) whose full size is reserved up front, so a full disk
is a DiskFullError before any decoding, not a SIGBUS on the memory map; temporary files of
builders that were killed are removed when the next build starts.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import zlib
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from data.base import (IMAGE_SIZE, CorruptImageError, DatasetError, WorkerDataLoader, decode_image, lock_beside,
                       logger, progress_bar, worker_init)
from utils.files import (DiskFullError, atomic_open, is_disk_full, read_json_object, remove_quietly,
                         remove_stale_temp_files, waiting_lock, write_json)

# Bump when the decoded pixels or the file format change (2: checksum in the .json; 3: every
# pixel checksummed, 16-bit and transparent images decoded by their meaning).
CACHE_VERSION = 3
_CHUNK = 256  # images decoded per worker task
_CHECKSUM_BYTES = 64 << 20  # bytes hashed per step: bounded memory on a memory map


@dataclass
class DecodedImages:
    images: np.ndarray  # [N, S, S, 3] uint8; rows of unreadable files stay zero
    unreadable: List[int]  # positions (into the path list) of files that could not be decoded


def decode_all(paths: Sequence[str], workers: int = 0, progress: bool = True, desc: str = "decode") -> DecodedImages:
    """Decode every file into a new in-memory array, using `workers` processes."""
    logger.info("%s: decoding %d images into memory (dataset.cache: memory)", desc, len(paths))
    images = np.zeros((len(paths), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    unreadable = _decode_into(paths, images.__setitem__, workers, progress, desc)
    return DecodedImages(images, unreadable)


def find_unreadable(paths: Sequence[str], workers: int = 0, progress: bool = True) -> List[int]:
    """Positions of files that cannot be decoded (decodes everything, keeps nothing)."""
    return _decode_into(paths, lambda rows, pixels: None, workers, progress, "check images")


def disk_cache(paths: Sequence[str], prefix: str, workers: int = 0, progress: bool = True) -> DecodedImages:
    """The decoded images stored at `<prefix>.npy` (+ `.json`), rebuilt when the files changed
    or the stored array fails its checks. Builders take a lock (`.<name>.lock` beside it): a
    second process waits for the first one's cache and then uses it."""
    with waiting_lock(lock_beside(prefix),
                      lambda: logger.info("waiting for another process building the decoded cache %s.npy", prefix)):
        return _disk_cache(paths, prefix, workers, progress)


def _disk_cache(paths: Sequence[str], prefix: str, workers: int, progress: bool) -> DecodedImages:
    meta_path, array_path = prefix + ".json", prefix + ".npy"
    expected = {"version": CACHE_VERSION, "size": IMAGE_SIZE, "count": len(paths), "fingerprint": fingerprint(paths)}
    meta = read_json_object(meta_path)  # {} when missing or damaged: a rebuild
    if meta and all(meta.get(k) == v for k, v in expected.items()):
        images, problem = _open_checked(array_path, len(paths), meta.get("checksum"))
        if images is not None:
            return DecodedImages(images, list(meta["unreadable"]))
        logger.warning("decoded cache %s %s; rebuilding it", array_path, problem)
    elif meta:
        logger.info("decoded cache %s is stale (the image files changed); rebuilding it", array_path)
    unreadable, checksum = _write_array(paths, array_path, meta_path, workers, progress)
    write_json(meta_path, {**expected, "unreadable": unreadable, "checksum": checksum})
    images, problem = _open_checked(array_path, len(paths), checksum)
    if images is None:  # written just now: the disk or another writer changed it under us
        raise DatasetError(f"decoded cache {array_path} {problem} right after it was written; check the disk, "
                           f"or use dataset.cache: memory")
    return DecodedImages(images, unreadable)


def fingerprint(paths: Sequence[str]) -> str:
    """Hash of the file list in dataset order with each file's size and modification time."""
    digest = hashlib.sha256(f"v{CACHE_VERSION}:{IMAGE_SIZE}\n".encode())
    for path in paths:
        st = os.stat(path)
        digest.update(f"{path}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def checksum(images: np.ndarray) -> str:
    """CRC-32 of every pixel (and the shape): a flipped byte anywhere changes it. zlib's CRC is
    the fastest hash in the standard library (about 0.5 s per GB); the cache needs to catch
    corruption, not an adversary."""
    crc = zlib.crc32(repr(images.shape).encode())
    rows = max(1, _CHECKSUM_BYTES // max(1, int(np.prod(images.shape[1:]))))
    for start in range(0, len(images), rows):
        crc = zlib.crc32(memoryview(np.ascontiguousarray(images[start:start + rows])).cast("B"), crc)
    return f"crc32:{crc:08x}"


def _open_checked(array_path: str, count: int, expected_checksum: Optional[str]) -> Tuple[Optional[np.ndarray], str]:
    """(the memory-mapped array, "") when the file passes every check, else (None, what failed)."""
    try:
        images = np.load(array_path, mmap_mode="r")
    except FileNotFoundError:
        return None, "is missing"
    except (OSError, ValueError, EOFError) as e:  # garbage header, truncated data
        return None, f"cannot be read ({e})"
    shape = (count, IMAGE_SIZE, IMAGE_SIZE, 3)
    if images.shape != shape or images.dtype != np.uint8:
        return None, f"holds {images.dtype} {images.shape}, not uint8 {shape}"
    size = os.path.getsize(array_path)
    if size != images.offset + images.nbytes:
        return None, f"is {size:,} bytes, not {images.offset + images.nbytes:,}"
    if count and checksum(images) != expected_checksum:
        return None, "has pixels that do not match their checksum (the file was changed or damaged)"
    return images, ""


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
    chunks = WorkerDataLoader(_FileDecoder(paths), batch_size=_CHUNK, num_workers=workers,
                        worker_init_fn=worker_init(os.getpid()) if workers > 0 else None)
    unreadable: List[int] = []
    with progress_bar(progress, total=len(paths), desc=desc, unit="img") as bar:
        for start, (pixels, readable) in zip(range(0, len(paths), _CHUNK), chunks):
            store(slice(start, start + len(readable)), pixels.numpy())
            unreadable += (start + np.flatnonzero(~readable.numpy())).tolist()
            bar.update(len(readable))
    return unreadable


def _write_array(paths: Sequence[str], array_path: str, meta_path: str, workers: int,
                 progress: bool) -> Tuple[List[int], str]:
    """Decode `paths` into a new .npy at array_path; (unreadable rows, checksum)."""
    folder = os.path.dirname(os.path.abspath(array_path))
    shape = (len(paths), IMAGE_SIZE, IMAGE_SIZE, 3)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    total = len(header.getvalue()) + int(np.prod(shape))
    try:
        os.makedirs(folder, exist_ok=True)
        removed = remove_stale_temp_files(folder)
        if removed:
            logger.info("removed %d temporary file(s) of interrupted cache builds in %s", removed, folder)
        remove_quietly(meta_path)  # from here on no stale metadata can vouch for a half-replaced array
        logger.info("building the decoded cache %s (%d images, %s bytes)", array_path, len(paths), f"{total:,}")
        with atomic_open(array_path, "w+b", expected_size=total) as f:
            f.write(header.getvalue())
            f.flush()
            _reserve(f.fileno(), total)
            array = np.memmap(f, dtype=np.uint8, mode="r+", offset=len(header.getvalue()), shape=shape)
            unreadable = _decode_into(paths, array.__setitem__, workers, progress,
                                      f"cache {os.path.basename(array_path)}")
            array.flush()
            digest = checksum(array)
            del array
    except OSError as e:  # not DiskFullError: that one names the folder and the bytes itself
        if is_disk_full(e):  # e.g. no inode left for the folder or the temporary file
            raise DiskFullError(array_path, total) from None
        raise DatasetError(
            f"cannot write the decoded cache in {folder} ({e.strerror or e}); make it writable, "
            f"set dataset.cache_dir to a writable folder, or use dataset.cache: memory"
        ) from None
    return unreadable, digest


def _reserve(fd: int, size: int) -> None:
    """Allocate the file's blocks now: a full disk then fails here with ENOSPC, instead of a
    SIGBUS when a page of the memory map is first written."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        os.ftruncate(fd, size)  # a filesystem without fallocate: a sparse file is the best left
