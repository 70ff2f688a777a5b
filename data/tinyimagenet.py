"""TinyImageNet read in the archive's own layout (README, "Training on TinyImageNet").

Class index = position of the wnid in sorted(wnids.txt); names come from words.txt; val labels
come from val/val_annotations.txt, so nobody has to reorganise the val folder by hand. Every
problem found on opening is a one-line DatasetError naming the path and the fix.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from data import cache as decoded
from data.archive import OFFICIAL, download_archive, unpack_archive, where_to_get_it
from data.base import (DATASETS, IMAGE_SIZE, BatchSpec, CorruptImageError, DatasetError, RawBatch, decode_image,
                       lock_beside, logger)
from data.fake import make_fake_tinyimagenet
from options.schema import DatasetConfig
from utils.files import waiting_lock

SPLITS = ("train", "val", "test")
_IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
_REFETCH = "re-unpack the archive (delete the folder and set dataset.download: true or dataset.archive)"


@dataclass(frozen=True)
class SplitFiles:
    paths: List[str]
    labels: Optional[np.ndarray]  # int64 class indices; None for the unlabelled test split


@dataclass(frozen=True)
class Classes:
    wnids: List[str]  # sorted; the position is the class index
    names: List[str]  # words.txt names in class order (the wnid itself when words.txt lacks it)


# ----------------------------------------------------------------------------- preparing the root
def prepare_root(cfg: DatasetConfig, progress: bool = True) -> str:
    """Make sure cfg.root exists: generate sample data, unpack cfg.archive or download, as configured."""
    root = cfg.root
    if os.path.isdir(root):
        return root
    # Two runs started together (a sweep with --parallel) must not both write the root: the
    # second waits for the first and adopts what it wrote.
    where = os.path.abspath(root)
    with waiting_lock(lock_beside(root), lambda: logger.info("waiting for another process preparing %s", where)):
        if os.path.isdir(root):
            return root
        _prepare_missing_root(cfg, progress)
    return root


def _prepare_missing_root(cfg: DatasetConfig, progress: bool) -> None:
    root = cfg.root
    if cfg.fake.enable:
        f = cfg.fake
        logger.info("writing a generated sample dataset (%d classes) to %s", f.classes, os.path.abspath(root))
        make_fake_tinyimagenet(root, f.classes, f.train_per_class, f.val_per_class, f.test_per_class, f.seed)
    elif cfg.archive:
        unpack_archive(cfg.archive, root, progress)
    elif cfg.download:
        zip_path = os.path.join(os.path.dirname(os.path.abspath(root)), os.path.basename(OFFICIAL.url))
        unpack_archive(download_archive(zip_path, root, OFFICIAL, progress), root, progress)
    else:
        raise DatasetError(f"dataset.root: {root} does not exist; {where_to_get_it(root)}")


# ----------------------------------------------------------------------------- reading the layout
def read_classes(root: str) -> Classes:
    """Sorted wnids from wnids.txt and their names from words.txt."""
    if not os.path.isdir(root):
        raise DatasetError(f"dataset.root: {root} does not exist; {where_to_get_it(root)}")
    wnids_path = os.path.join(root, "wnids.txt")
    if not os.path.isfile(wnids_path):
        raise DatasetError(
            f"{wnids_path} not found; dataset.root must be the unpacked tiny-imagenet-200 folder "
            f"(the one holding wnids.txt, train/, val/)"
        )
    wnids = sorted({line.strip() for line in _lines(wnids_path) if line.strip()})
    if not wnids:
        raise DatasetError(f"{wnids_path} lists no classes; {_REFETCH}")
    words = _read_words(os.path.join(root, "words.txt"))
    return Classes(wnids, [words.get(w, w) for w in wnids])


def read_split(root: str, split: str, wnids: Sequence[str]) -> SplitFiles:
    """Image paths (and labels, except for test) of one split."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    index = {w: i for i, w in enumerate(wnids)}
    files = {"train": _train_files, "val": _val_files, "test": _test_files}[split](root, index)
    if not files.paths:
        raise DatasetError(f"{os.path.join(root, split)} holds no images; {_REFETCH}")
    return files


def _lines(path: str) -> List[str]:
    """The lines of a text file of the layout; one that is not UTF-8 is a DatasetError.

    A byte-order mark (what Windows editors write) is dropped and CRLF line ends are accepted:
    otherwise the invisible mark would become part of the first wnid or file name."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path} is not UTF-8 text (byte {e.start}); {_REFETCH}") from None


def _read_words(path: str) -> Dict[str, str]:
    if not os.path.isfile(path):
        return {}  # names are a nicety: fall back to the wnids
    words = {}
    for line in _lines(path):
        wnid, _, names = line.partition("\t")
        words[wnid.strip()] = names.strip()
    return words


def _train_files(root: str, index: Dict[str, int]) -> SplitFiles:
    paths, labels = [], []
    for wnid, label in index.items():
        folder = os.path.join(root, "train", wnid, "images")
        if not os.path.isdir(folder):
            raise DatasetError(f"{folder!r} is missing but wnids.txt lists {wnid!r}; {_REFETCH}")
        names = _image_names(folder)
        if not names:  # a class without images would train as if it did not exist
            raise DatasetError(f"{folder} holds no images but wnids.txt lists {wnid!r}; {_REFETCH}")
        paths += [os.path.join(folder, n) for n in names]
        labels += [label] * len(names)
    return SplitFiles(paths, np.asarray(labels, np.int64))


def _val_files(root: str, index: Dict[str, int]) -> SplitFiles:
    folder = os.path.join(root, "val", "images")
    annotations = os.path.join(root, "val", "val_annotations.txt")
    if not os.path.isfile(annotations):
        raise DatasetError(f"{annotations} not found (it holds the val labels); {_REFETCH}")
    present = set(_image_names(folder)) if os.path.isdir(folder) else set()
    paths, labels = [], []
    for number, line in enumerate(_lines(annotations), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        where = f"{annotations}:{number}"
        if len(fields) < 2:
            raise DatasetError(f"{where}: expected '<file>\\t<wnid>\\t...', got {line.strip()!r}; {_REFETCH}")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise DatasetError(f"{where}: wnid {wnid!r} is not in wnids.txt; {_REFETCH}")
        if name not in present:  # repr: an invisible character in the name shows
            raise DatasetError(f"{where}: {os.path.join(folder, name)!r} does not exist; {_REFETCH}")
        paths.append(os.path.join(folder, name))
        labels.append(index[wnid])
    return SplitFiles(paths, np.asarray(labels, np.int64))


def _test_files(root: str, index: Dict[str, int]) -> SplitFiles:
    folder = os.path.join(root, "test", "images")
    if not os.path.isdir(folder):
        raise DatasetError(f"{folder} is missing; {_REFETCH}")
    return SplitFiles([os.path.join(folder, n) for n in _image_names(folder)], None)


def _image_names(folder: str) -> List[str]:
    """Image file names in natural order (img_2 before img_10)."""
    names = [n for n in os.listdir(folder) if n.lower().endswith(_IMAGE_EXTENSIONS)]
    return sorted(names, key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])


# ----------------------------------------------------------------------------- the dataset
@DATASETS.register("tinyimagenet")
class TinyImageNet(Dataset):
    """One split of TinyImageNet, as raw pixels: augmentation happens per batch (data/augment.py).

    Item i is (image uint8 [3, 64, 64], target); a batch (DataLoader's __getitems__ with a
    BatchSpec) is a RawBatch. The target is the int64 class index, or for the unlabelled test
    split the item's index (file_names[index] is then its file).
    """

    def __init__(
        self,
        root: str,
        split: str,
        cache: str = "none",
        cache_dir: Optional[str] = None,
        skip_corrupt: bool = False,
        workers: int = 0,
        progress: bool = True,
    ) -> None:
        self.root, self.split = root, split
        classes = read_classes(root)
        self.wnids, self.class_names = classes.wnids, classes.names
        files = read_split(os.path.abspath(root), split, self.wnids)
        cached = self._decoded(files.paths, cache, cache_dir, workers, progress)
        keep = self._readable(files.paths, cached, skip_corrupt, workers, progress)
        self._images = cached.images if cached is not None else None
        self.paths = [files.paths[i] for i in keep]
        self.labels = files.labels[keep] if files.labels is not None else None
        self._rows = np.asarray(keep, np.int64)  # row in the decoded array of each item

    @classmethod
    def from_config(cls, cfg: DatasetConfig, split: str, progress: bool = True) -> "TinyImageNet":
        return cls(cfg.root, split, cfg.cache, cfg.cache_dir, cfg.skip_corrupt, cfg.workers, progress)

    @property
    def num_classes(self) -> int:
        return len(self.wnids)

    @property
    def file_names(self) -> List[str]:
        """File names (no folder) in item order, e.g. for a test-split predictions CSV."""
        return [os.path.basename(p) for p in self.paths]

    @property
    def cached(self) -> bool:
        """Whether the pixels are decoded already (dataset.cache memory or disk)."""
        return self._images is not None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        image = torch.from_numpy(self.pixels([index])[0]).permute(2, 0, 1)  # [H, W, 3] -> [3, H, W] (a view)
        return image, int(self.targets([index])[0])

    def __getitems__(self, items: Union[BatchSpec, Sequence[int]]) -> Union[RawBatch, List[Tuple[torch.Tensor, int]]]:
        """A batch (DataLoader calls this once per batch): a RawBatch for a sampler's BatchSpec,
        else a list of items (for a plain DataLoader)."""
        if not isinstance(items, BatchSpec):
            return [self[i] for i in items]
        indices = np.asarray(items.indices, np.int64)
        images = torch.from_numpy(self.pixels(indices)).permute(0, 3, 1, 2)  # [B, H, W, 3] -> [B, 3, H, W]
        return RawBatch(images, torch.from_numpy(self.targets(indices)), items)

    def pixels(self, indices: Sequence[int]) -> np.ndarray:
        """Items `indices` as a new uint8 array [len, 64, 64, 3], from the cache or their files."""
        if self._images is not None:
            return self._images[self._rows[np.asarray(indices, np.int64)]]  # fancy indexing copies
        out = np.empty((len(indices), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        for k, i in enumerate(indices):
            out[k] = decode_image(self.paths[i])
        return out

    def targets(self, indices: Sequence[int]) -> np.ndarray:
        """int64 targets of items `indices` (class indices, or the indices for the test split)."""
        indices = np.asarray(indices, np.int64)
        return self.labels[indices] if self.labels is not None else indices

    def chunks(self, size: int) -> Iterator[Tuple[slice, np.ndarray, np.ndarray]]:
        """(slice of items, pixels uint8 [k, 64, 64, 3], targets [k]) over the split in order."""
        for start in range(0, len(self), size):
            part = np.arange(start, min(start + size, len(self)))
            yield slice(start, start + len(part)), self.pixels(part), self.targets(part)

    def _decoded(self, paths: List[str], cache: str, cache_dir: Optional[str], workers: int,
                 progress: bool) -> Optional[decoded.DecodedImages]:
        if cache == "none":
            return None
        if cache == "memory":
            return decoded.decode_all(paths, workers, progress, f"decode {self.split}")
        if cache == "disk":
            folder = cache_dir or os.path.join(self.root, "cache")
            return decoded.disk_cache(paths, os.path.join(folder, f"{self.split}-u8"), workers, progress)
        raise ValueError(f"cache {cache!r} is not one of none, memory, disk")

    def _readable(self, paths: List[str], cached: Optional[decoded.DecodedImages], skip_corrupt: bool,
                  workers: int, progress: bool) -> List[int]:
        """Positions to keep: an unreadable file fails here, or is skipped with a warning."""
        if cached is not None:
            unreadable = cached.unreadable
        elif skip_corrupt:  # JPEG path: only decoding everything finds them up front
            unreadable = decoded.find_unreadable(paths, workers, progress)
        else:
            return list(range(len(paths)))  # found (and raised) when the image is loaded
        if unreadable and not skip_corrupt:
            decode_image(paths[unreadable[0]])  # raises with the decoder's own reason
            raise CorruptImageError.for_file(paths[unreadable[0]], "unreadable when the cache was built")
        if unreadable:
            warnings.warn(
                f"skipped {len(unreadable)} unreadable image(s) of {os.path.join(self.root, self.split)} "
                f"(dataset.skip_corrupt), first: {paths[unreadable[0]]}",
                stacklevel=2,
            )
        bad = set(unreadable)
        return [i for i in range(len(paths)) if i not in bad]
