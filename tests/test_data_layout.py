"""TinyImageNet read in its own layout: labels, class order, colour modes, errors, the fake tree."""
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import data.fake
from data.base import CorruptImageError, DatasetError, decode_image
from data.fake import make_fake_tinyimagenet
from data.tinyimagenet import TinyImageNet, read_classes
from helpers import FAKE_TREE


def lines(path):
    with open(path) as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


# ----------------------------------------------------------------------------- parsing
def test_classes_are_sorted_wnids_named_from_words(fake_root):
    listed = [w for (w,) in lines(os.path.join(fake_root, "wnids.txt"))]
    assert listed != sorted(listed), "the fake tree should list wnids unsorted to make this test bite"
    classes = read_classes(fake_root)
    assert classes.wnids == sorted(listed)
    words = dict(lines(os.path.join(fake_root, "words.txt")))
    assert len(words) > len(listed)  # words.txt covers more wnids than the classes
    assert classes.names == [words[w] for w in classes.wnids]


def test_train_labels_follow_class_folders(fake_root):
    ds = TinyImageNet(fake_root, "train")
    assert len(ds) == FAKE_TREE["classes"] * FAKE_TREE["train_per_class"]
    for path, label in zip(ds.paths, ds.labels):
        assert path.split(os.sep)[-3] == ds.wnids[label]


def test_val_labels_come_from_the_annotations(fake_root):
    ds = TinyImageNet(fake_root, "val")
    annotations = lines(os.path.join(fake_root, "val", "val_annotations.txt"))
    assert ds.file_names == [row[0] for row in annotations]
    assert [ds.wnids[label] for label in ds.labels] == [row[1] for row in annotations]
    assert len(set(ds.labels.tolist())) == FAKE_TREE["classes"]


def test_test_split_has_file_names_and_index_targets(fake_root):
    ds = TinyImageNet(fake_root, "test")
    assert ds.labels is None
    assert ds.file_names[:3] == ["test_0.JPEG", "test_1.JPEG", "test_2.JPEG"]  # natural order
    image, target = ds[5]
    assert target == 5 and image.shape == (3, 64, 64) and image.dtype == torch.uint8


def test_a_batch_is_the_raw_pixels_of_its_items(fake_root):
    from data.base import BatchSpec

    ds = TinyImageNet(fake_root, "train")
    spec = BatchSpec((5, 0, 17), crop_size=48, seed=3)
    batch = ds.__getitems__(spec)
    assert batch.spec == spec and batch.images.dtype == torch.uint8 and batch.images.shape == (3, 3, 64, 64)
    for k, i in enumerate(spec.indices):
        assert torch.equal(batch.images[k], ds[i][0]) and batch.labels[k] == ds[i][1]
    assert len(ds.__getitems__([1, 2])) == 2  # a plain DataLoader's list of indices gets items


def test_grayscale_files_in_the_tree_become_rgb(fake_root):
    ds = TinyImageNet(fake_root, "train")
    gray = [i for i, p in enumerate(ds.paths) if Image.open(p).mode == "L"]
    assert gray, "the fake tree should contain grayscale JPEGs"
    image, _ = ds[gray[0]]
    assert image.shape == (3, 64, 64)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


@pytest.mark.parametrize("mode, fmt", [("L", "JPEG"), ("CMYK", "JPEG"), ("P", "PNG"), ("RGB", "PNG")])
def test_decode_converts_every_colour_mode_to_rgb(tmp_path, mode, fmt):
    path = str(tmp_path / f"img.{fmt.lower()}")
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    rgb.convert(mode).save(path, fmt)
    pixels = decode_image(path)
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8 and pixels.flags.writeable


def test_decode_resizes_other_sizes_to_64(tmp_path):
    path = str(tmp_path / "big.JPEG")
    Image.new("RGB", (80, 72), (200, 10, 10)).save(path)
    assert decode_image(path).shape == (64, 64, 3)


# ----------------------------------------------------------------------------- errors
def _remove_wnids(root):
    os.remove(os.path.join(root, "wnids.txt"))
    return os.path.join(root, "wnids.txt")


def _remove_class_folder(root):
    wnid = read_classes(root).wnids[1]
    shutil.rmtree(os.path.join(root, "train", wnid))
    return os.path.join(root, "train", wnid, "images")


def _annotate(root, line):
    path = os.path.join(root, "val", "val_annotations.txt")
    with open(path, "a") as f:
        f.write(line)
    return path


def _unknown_wnid(root):
    return _annotate(root, "val_0.JPEG\tn99999999\t0\t0\t5\t5\n") + ":"


def _missing_val_file(root):
    wnid = read_classes(root).wnids[0]
    _annotate(root, f"val_999.JPEG\t{wnid}\t0\t0\t5\t5\n")
    return os.path.join(root, "val", "images", "val_999.JPEG")


def _missing_annotations(root):
    os.remove(os.path.join(root, "val", "val_annotations.txt"))
    return os.path.join(root, "val", "val_annotations.txt")


def _empty_test_split(root):
    folder = os.path.join(root, "test", "images")
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    return os.path.join(root, "test")


def _missing_root(root):
    shutil.rmtree(root)
    return root


def _empty_class_folder(root):
    folder = os.path.join(root, "train", read_classes(root).wnids[2], "images")
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    return folder


def _latin1(name):
    def damage(root):
        path = os.path.join(root, *name.split("/"))
        with open(path, "ab") as f:
            f.write("caf\xe9\n".encode("latin-1"))  # not UTF-8
        return path
    damage.__name__ = f"_latin1_{name}"
    return damage


@pytest.mark.parametrize("split, damage, fix", [
    ("train", _missing_root, "dataset.archive"),
    ("train", _remove_wnids, "dataset.root"),
    ("train", _remove_class_folder, "re-unpack"),
    ("val", _unknown_wnid, "re-unpack"),
    ("val", _missing_val_file, "re-unpack"),
    ("val", _missing_annotations, "re-unpack"),
    ("test", _empty_test_split, "re-unpack"),
    ("train", _empty_class_folder, "holds no images"),
    ("train", _latin1("wnids.txt"), "is not UTF-8 text"),
    ("train", _latin1("words.txt"), "is not UTF-8 text"),
    ("val", _latin1("val/val_annotations.txt"), "is not UTF-8 text"),
])
def test_layout_problems_are_one_line_errors_naming_path_and_fix(fake_copy, split, damage, fix):
    where = damage(fake_copy)
    with pytest.raises(DatasetError) as err:
        TinyImageNet(fake_copy, split)
    message = str(err.value)
    assert not isinstance(err.value, ValueError)  # the data package's own kind: the front door maps it
    assert "\n" not in message and where in message and fix in message


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(200)


def test_corrupt_image_fails_naming_the_file(fake_copy):
    ds = TinyImageNet(fake_copy, "train")
    _truncate(ds.paths[3])
    with pytest.raises(CorruptImageError, match="skip_corrupt") as err:
        ds[3]
    assert ds.paths[3] in str(err.value) and "\n" not in str(err.value)


def test_corrupt_image_error_stays_one_line_from_a_worker(fake_copy):
    ds = TinyImageNet(fake_copy, "train")
    _truncate(ds.paths[0])
    batches = iter(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1))
    try:
        with pytest.raises(CorruptImageError) as err:
            next(batches)
    finally:
        # After a worker error torch leaves the iterator in a reference cycle; shutting the
        # worker down from the garbage collector later stalls whichever test runs then.
        batches._shutdown_workers()
    message = str(err.value)
    assert message.startswith(f"cannot decode image {ds.paths[0]}") and "\n" not in message


@pytest.mark.parametrize("cache", ["none", "memory"])
def test_skip_corrupt_warns_and_counts(fake_copy, cache):
    victim = TinyImageNet(fake_copy, "val").paths[2]
    _truncate(victim)
    if cache != "none":  # the cache finds the file while decoding everything
        with pytest.raises(CorruptImageError, match=victim):
            TinyImageNet(fake_copy, "val", cache=cache, progress=False)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        ds = TinyImageNet(fake_copy, "val", cache=cache, skip_corrupt=True, progress=False)
    assert victim not in ds.paths and len(ds) == len(ds.labels) == FAKE_TREE["classes"] * FAKE_TREE["val_per_class"] - 1


# ----------------------------------------------------------------------------- the fake tree
def test_fake_cli_writes_the_layout(tmp_path, capsys):
    root = str(tmp_path / "tiny")
    argv = [root, "--classes", "3", "--train-per-class", "2", "--val-per-class", "2", "--test-per-class", "1",
            "--seed", "3"]
    data.fake.main(argv)  # what `python -m data.fake ...` runs
    assert "wrote 15 images in 3 classes" in capsys.readouterr().out
    assert len(TinyImageNet(root, "train")) == 6 and len(TinyImageNet(root, "val")) == 6
    assert len(TinyImageNet(root, "test")) == 3
    wnid = read_classes(root).wnids[0]
    assert lines(os.path.join(root, "train", wnid, f"{wnid}_boxes.txt"))[0][0] == f"{wnid}_0.JPEG"
    with pytest.raises(SystemExit) as again:
        data.fake.main(argv)
    assert again.value.code == 2 and "already exists" in capsys.readouterr().err


def test_fake_tree_is_written_atomically(tmp_path, monkeypatch):
    def fail(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(data.fake, "_write_boxes", fail)
    with pytest.raises(KeyboardInterrupt):
        make_fake_tinyimagenet(str(tmp_path / "tiny"), classes=2, train_per_class=2, val_per_class=1)
    assert os.listdir(tmp_path) == []


def test_fake_tree_written_by_several_processes_is_one_tree_whatever_their_number(tmp_path):
    trees = [make_fake_tinyimagenet(str(tmp_path / f"p{n}"), classes=5, train_per_class=3, val_per_class=2,
                                    test_per_class=0, seed=4, processes=n) for n in (2, 3)]
    for root in trees:
        train = TinyImageNet(root, "train")
        assert train.num_classes == 5 and len(train) == 15 and len(TinyImageNet(root, "val")) == 10
        for path, label in zip(train.paths, train.labels):
            assert path.split(os.sep)[-3] == train.wnids[label]
    files = sorted(os.path.relpath(os.path.join(d, f), trees[0]) for d, _, fs in os.walk(trees[0]) for f in fs)
    assert files == sorted(os.path.relpath(os.path.join(d, f), trees[1]) for d, _, fs in os.walk(trees[1]) for f in fs)
    for name in files:
        with open(os.path.join(trees[0], name), "rb") as a, open(os.path.join(trees[1], name), "rb") as b:
            assert a.read() == b.read(), name


def test_fake_images_are_learnable_by_a_small_cnn(fake_root):
    """A tiny CNN on random resized crops + flips beats chance (25%) on val within a few epochs."""
    import numpy as np

    from data.augment import Augmentation
    from data.base import BatchSpec
    from data.transforms import build_transforms

    torch.manual_seed(0)
    augment = Augmentation(build_transforms([{"name": "random_resized_crop", "scale": [0.25, 1.0]},
                                             {"name": "random_horizontal_flip"}], "train"))
    train, val = TinyImageNet(fake_root, "train"), TinyImageNet(fake_root, "val")
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, stride=2),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 4),
    )
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    rng = np.random.default_rng(0)
    for step in range(6 * len(train) // 16):
        images, labels = augment(train.__getitems__(BatchSpec(tuple(rng.permutation(len(train))[:16]), 32, step)))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        opt.step()
    images, labels = next(iter(torch.utils.data.DataLoader(val, batch_size=len(val))))
    accuracy = (model(images.float() / 255).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.6
