"""Fetch, check and unpack the TinyImageNet zip without ever leaving a half-unpacked root.

Unpacking goes into a temporary folder beside the root that is renamed into place only once
everything is extracted (zipfile checks each member's CRC on the way), so an interruption or
a damaged archive leaves no root behind and the next run simply starts again.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from typing import Optional

from data.base import DatasetError, logger, progress_bar
from utils.files import DiskFullError, atomic_open, is_disk_full, temp_dir_for


@dataclass(frozen=True)
class ArchiveSpec:
    url: str
    size: int  # bytes
    md5: str


OFFICIAL = ArchiveSpec(
    url="http://cs231n.stanford.edu/tiny-imagenet-200.zip",
    size=248_100_043,
    md5="90528d7ca1a48142e341f4ef8d21d0de",
)
_CHUNK = 1 << 20


def where_to_get_it(root: str, downloading: bool = False) -> str:
    """The shared advice of every missing-dataset message (without the download option when
    downloading is what just failed)."""
    download = "" if downloading else ", or set dataset.download: true"
    return (
        f"get {OFFICIAL.url} ({OFFICIAL.size:,} bytes) and set dataset.archive: PATH_TO_ZIP, "
        f"or unpack it yourself and point dataset.root at the tiny-imagenet-200 folder "
        f"(now {os.path.abspath(root)}){download}"
    )


def download_archive(dest: str, root: str, spec: ArchiveSpec = OFFICIAL, progress: bool = True) -> str:
    """Download `spec.url` to `dest` (verified by size and MD5) unless a good copy is there already.

    `root` is the dataset root the archive is for (named in the error messages).
    """
    if os.path.isfile(dest) and _matches(dest, spec):
        return dest
    logger.info("downloading %s (%s bytes) to %s", spec.url, f"{spec.size:,}", os.path.abspath(dest))
    digest = hashlib.md5()
    with atomic_open(dest, "wb", expected_size=spec.size) as out:
        try:
            with urllib.request.urlopen(spec.url, timeout=60) as response:
                with progress_bar(progress, total=spec.size, unit="B", unit_scale=True, desc="download") as bar:
                    for chunk in iter(lambda: response.read(_CHUNK), b""):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, OSError) as e:
            if is_disk_full(e):
                raise
            reason = getattr(e, "reason", None) or e
            raise DatasetError(
                f"cannot download {spec.url} ({reason}); {where_to_get_it(root, downloading=True)}"
            ) from None
        size = out.tell()
        if size != spec.size or digest.hexdigest() != spec.md5:
            raise DatasetError(
                f"downloaded {spec.url} is damaged ({size:,} bytes, MD5 {digest.hexdigest()}; expected "
                f"{spec.size:,} bytes, MD5 {spec.md5}); run again, or download it by hand and set dataset.archive"
            )
    return dest


def unpack_archive(archive: str, root: str, progress: bool = True) -> None:
    """Extract a TinyImageNet zip so that `root` becomes the folder holding wnids.txt."""
    if not os.path.isfile(archive):
        raise DatasetError(f"dataset.archive: {archive} does not exist; give the path of tiny-imagenet-200.zip")
    root = os.path.abspath(root)
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    try:
        tmp = temp_dir_for(root, "unpack")
    except OSError as e:
        if is_disk_full(e):
            raise DiskFullError(root, None) from None
        raise
    logger.info("unpacking %s into %s", archive, root)
    try:
        _extract(archive, tmp, progress)
        top = _dataset_folder(tmp)
        if top is None:
            raise DatasetError(
                f"{archive} holds no wnids.txt, so it is not a TinyImageNet archive; "
                f"check dataset.archive ({where_to_get_it(root)})"
            )
        os.rename(top, root)
    except OSError as e:
        if is_disk_full(e):  # bytes or inodes: what was unpacked so far goes with the temporary folder
            raise DiskFullError(root, _unpacked_size(archive)) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _unpacked_size(archive: str) -> Optional[int]:
    try:
        with zipfile.ZipFile(archive) as zf:
            return sum(member.file_size for member in zf.infolist())
    except (OSError, zipfile.BadZipFile):
        return None


def _extract(archive: str, out: str, progress: bool) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in progress_bar(progress, zf.infolist(), desc="unpack", unit="file"):
                zf.extract(member, out)  # zipfile strips absolute paths and '..' from names
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error) as e:  # zlib: a member's data
        raise DatasetError(
            f"{archive} is damaged or not a zip file ({e}); delete it and download it again "
            f"({OFFICIAL.url}, MD5 {OFFICIAL.md5})"
        ) from None


def _dataset_folder(tmp: str) -> Optional[str]:
    """The extracted folder that holds wnids.txt: tmp itself or its single top-level folder."""
    if os.path.isfile(os.path.join(tmp, "wnids.txt")):
        return tmp  # once renamed, the cleanup's rmtree finds nothing to remove
    for entry in os.scandir(tmp):
        if entry.is_dir() and os.path.isfile(os.path.join(entry.path, "wnids.txt")):
            return entry.path
    return None


def _matches(path: str, spec: ArchiveSpec) -> bool:
    if os.path.getsize(path) != spec.size:
        return False
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest() == spec.md5

