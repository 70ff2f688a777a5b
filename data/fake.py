"""Write a small, learnable dataset in the exact TinyImageNet layout.

Each class has its own colour, stripe orientation and stripe period; every image adds a
random phase (a shift), brightness and pixel noise, so random crops and flips keep the class
recognisable and a small CNN beats chance within a few epochs. About one image in eight is
saved as a single-channel (grayscale) JPEG, as in the real archive.

    python -m data.fake ROOT --classes 10 --train-per-class 100 --val-per-class 20 [--processes 8]

--processes N writes the classes' training images in N processes (a 100,000-image tree for a
throughput benchmark in seconds, not minutes). Every N >= 2 writes the same tree for a seed, but
not the tree one process writes (each class then draws from its own generator).
"""
from __future__ import annotations

import argparse
import colorsys
import multiprocessing
import os
import shutil
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image

from data import IMAGE_SIZE
from utils.files import temp_dir_for

_GRAY_EVERY = 8  # image k of a class is grayscale when k % _GRAY_EVERY == _GRAY_EVERY - 1
_EXTRA_WORDS = 3  # words.txt also lists wnids that are not classes, like the real one
_PERIODS = (5.0, 8.0, 13.0)  # stripe periods in pixels, cycled over classes


def make_fake_tinyimagenet(
    root: str,
    classes: int = 10,
    train_per_class: int = 100,
    val_per_class: int = 20,
    test_per_class: int = 2,
    seed: int = 0,
    processes: int = 1,
) -> str:
    """Write the tree at `root` (which must not exist) atomically and return `root`.

    The tree is built in a temporary folder beside `root` and renamed into place, so an
    interrupted run never leaves a half-written dataset behind.
    """
    if classes < 1 or train_per_class < 1 or val_per_class < 1 or test_per_class < 0 or processes < 1:
        raise ValueError("need classes, train_per_class, val_per_class, processes >= 1 and test_per_class >= 0")
    root = os.path.abspath(root)
    if os.path.exists(root):
        raise FileExistsError(f"{root} already exists; remove it or pick another folder")
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = temp_dir_for(root, "partial")
    try:
        _write_tree(tmp, classes, train_per_class, val_per_class, test_per_class, np.random.default_rng(seed),
                    processes)
        os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _write_tree(out: str, classes: int, n_train: int, n_val: int, n_test: int, rng: np.random.Generator,
                processes: int = 1) -> None:
    wnids = [f"n{v:08d}" for v in rng.choice(10**8, size=classes + _EXTRA_WORDS, replace=False)]
    class_wnids = wnids[:classes]  # written unsorted: loaders must sort them themselves
    with open(os.path.join(out, "wnids.txt"), "w") as f:
        f.writelines(w + "\n" for w in class_wnids)
    with open(os.path.join(out, "words.txt"), "w") as f:
        f.writelines(f"{w}\tsynthetic class {i}, stripes {i}\n" for i, w in enumerate(wnids))

    jobs = [(out, c, wnid, classes, n_train) for c, wnid in enumerate(class_wnids)]
    if processes == 1:
        for job in jobs:
            _write_class(*job, rng)
    else:
        # One generator per class, seeded from the tree's: the same tree for any number of processes.
        seeds = rng.integers(2**63, size=classes)
        # fork where there is one: the children only write images, and re-importing the package
        # in each (spawn) would cost more than the writing.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with multiprocessing.get_context(method).Pool(min(processes, classes)) as pool:
            pool.starmap(_write_class, [(*job, int(s)) for job, s in zip(jobs, seeds)])

    val_labels = rng.permutation(np.repeat(np.arange(classes), n_val))  # classes interleaved
    val_names = [f"val_{k}.JPEG" for k in range(len(val_labels))]
    _save_images(os.path.join(out, "val", "images"), val_names, _mixed_images(val_labels, classes, rng))
    _write_boxes(os.path.join(out, "val", "val_annotations.txt"), val_names, rng,
                 [class_wnids[c] for c in val_labels])

    test_labels = rng.integers(0, classes, size=classes * n_test)
    test_names = [f"test_{k}.JPEG" for k in range(len(test_labels))]
    _save_images(os.path.join(out, "test", "images"), test_names, _mixed_images(test_labels, classes, rng))


def _write_class(out: str, c: int, wnid: str, classes: int, n: int, rng) -> None:
    """train/<wnid>/images and its boxes file; rng: a generator, or the seed of a new one."""
    rng = np.random.default_rng(rng) if isinstance(rng, int) else rng
    folder = os.path.join(out, "train", wnid)
    names = [f"{wnid}_{k}.JPEG" for k in range(n)]
    _save_images(os.path.join(folder, "images"), names, _class_images(c, classes, n, rng))
    _write_boxes(os.path.join(folder, f"{wnid}_boxes.txt"), names, rng)


def _class_images(c: int, classes: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n images of class c: uint8 [n, 64, 64, 3]."""
    hue = c / classes
    colour = np.array(colorsys.hsv_to_rgb(hue, 0.75, 0.9)) * 255.0
    angle = np.pi * ((c * 0.618034) % 0.5)  # within [0, pi/2): a mirrored stripe never equals another class's
    period = _PERIODS[c % len(_PERIODS)]
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    along = x * np.cos(angle) + y * np.sin(angle)  # [64, 64]
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1))
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * along / period + phase)  # [n, 64, 64]
    brightness = rng.uniform(0.7, 1.1, size=(n, 1, 1, 1))
    pixels = colour * (0.3 + 0.7 * stripes[..., None]) * brightness  # [n, 64, 64, 3]
    pixels += rng.normal(0.0, 12.0, size=pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _mixed_images(labels: np.ndarray, classes: int, rng: np.random.Generator) -> np.ndarray:
    images = np.empty((len(labels), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        images[where] = _class_images(int(c), classes, len(where), rng)
    return images


def _save_images(folder: str, names: Sequence[str], images: np.ndarray) -> None:
    os.makedirs(folder, exist_ok=True)
    for k, (name, pixels) in enumerate(zip(names, images)):
        img = Image.fromarray(pixels)
        if k % _GRAY_EVERY == _GRAY_EVERY - 1:
            img = img.convert("L")
        img.save(os.path.join(folder, name), "JPEG", quality=90)


def _write_boxes(path: str, names: Sequence[str], rng: np.random.Generator,
                 wnids: Optional[Sequence[str]] = None) -> None:
    """`<file>[\\t<wnid>]\\tx0\\ty0\\tx1\\ty1` lines, like *_boxes.txt and val_annotations.txt."""
    corners = np.sort(rng.integers(0, IMAGE_SIZE, size=(len(names), 2, 2)), axis=1)  # [n, (min, max), (x, y)]
    with open(path, "w") as f:
        for k, name in enumerate(names):
            (x0, y0), (x1, y1) = corners[k]
            label = f"\t{wnids[k]}" if wnids is not None else ""
            f.write(f"{name}{label}\t{x0}\t{y0}\t{x1}\t{y1}\n")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.fake", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="folder to create (must not exist)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--val-per-class", type=int, default=20)
    parser.add_argument("--test-per-class", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processes", type=int, default=1, help="processes writing the training images")
    args = parser.parse_args(argv)
    try:
        root = make_fake_tinyimagenet(args.root, args.classes, args.train_per_class, args.val_per_class,
                                      args.test_per_class, args.seed, args.processes)
    except (FileExistsError, ValueError) as e:
        parser.error(str(e))
    total = args.classes * (args.train_per_class + args.val_per_class + args.test_per_class)
    print(f"wrote {total} images in {args.classes} classes to {root}")


if __name__ == "__main__":
    main()
