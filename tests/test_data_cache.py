"""The decoded cache: same pixels as decoding the JPEGs, reused while valid, rebuilt when stale."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data.cache
from data.base import DatasetError, decode_image
from data.tinyimagenet import TinyImageNet


def cache_files(root, split="train"):
    return os.path.join(root, "cache", f"{split}-u8.npy"), os.path.join(root, "cache", f"{split}-u8.json")


def assert_same_pixels(cached, jpeg):
    assert len(cached) == len(jpeg) and cached.paths == jpeg.paths
    for i in range(len(jpeg)):
        image, label = cached[i]
        assert torch.equal(image, jpeg[i][0]) and label == jpeg[i][1], jpeg.paths[i]


@pytest.mark.parametrize("cache", ["memory", "disk"])
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_cached_pixels_equal_jpeg_decoding(fake_copy, cache, split):
    assert_same_pixels(TinyImageNet(fake_copy, split, cache=cache, progress=False), TinyImageNet(fake_copy, split))


def test_disk_cache_is_memory_mapped_and_reused(fake_copy, monkeypatch):
    TinyImageNet(fake_copy, "val", cache="disk", progress=False)
    array_path, meta_path = cache_files(fake_copy, "val")
    assert np.load(array_path).shape == (16, 64, 64, 3)

    def no_decoding(*args):
        raise AssertionError("a valid cache must not be rebuilt")

    monkeypatch.setattr(data.cache, "_write_array", no_decoding)
    again = TinyImageNet(fake_copy, "val", cache="disk", progress=False)
    assert isinstance(again._images, np.memmap)


def _add_image(root):
    ds = TinyImageNet(root, "train")
    wnid = ds.wnids[0]
    Image.open(ds.paths[0]).save(os.path.join(root, "train", wnid, "images", f"{wnid}_999.JPEG"))


def _remove_image(root):
    os.remove(TinyImageNet(root, "train").paths[-1])


def _rewrite_image(root):
    path = TinyImageNet(root, "train").paths[5]
    Image.new("RGB", (64, 64), (0, 255, 0)).save(path)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # coarse clocks


@pytest.mark.parametrize("change", [_add_image, _remove_image, _rewrite_image])
def test_disk_cache_is_rebuilt_when_the_files_change(fake_copy, change):
    TinyImageNet(fake_copy, "train", cache="disk", progress=False)
    with open(cache_files(fake_copy)[1]) as f:
        before = json.load(f)["fingerprint"]
    change(fake_copy)
    cached = TinyImageNet(fake_copy, "train", cache="disk", progress=False)
    with open(cache_files(fake_copy)[1]) as f:
        assert json.load(f)["fingerprint"] != before
    assert_same_pixels(cached, TinyImageNet(fake_copy, "train"))


def test_images_of_another_size_are_resized_into_the_cache(fake_copy):
    path = TinyImageNet(fake_copy, "val").paths[0]
    Image.new("RGB", (80, 96), (10, 200, 30)).save(path)
    cached = TinyImageNet(fake_copy, "val", cache="memory", progress=False)
    assert cached[0][0].shape == (3, 64, 64)
    assert torch.equal(cached[0][0], torch.from_numpy(decode_image(path)).permute(2, 0, 1))


def test_interrupted_build_leaves_no_cache_behind(fake_copy, monkeypatch):
    calls = []

    def decode_then_stop(path):
        calls.append(path)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return decode_image(path)

    monkeypatch.setattr(data.cache, "decode_image", decode_then_stop)
    with pytest.raises(KeyboardInterrupt):
        TinyImageNet(fake_copy, "train", cache="disk", progress=False)
    assert os.listdir(os.path.join(fake_copy, "cache")) == []


def test_cache_dir_setting_and_unwritable_folder(fake_copy, tmp_path):
    folder = str(tmp_path / "elsewhere")
    TinyImageNet(fake_copy, "val", cache="disk", cache_dir=folder, progress=False)
    assert sorted(os.listdir(folder)) == ["val-u8.json", "val-u8.npy"]
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DatasetError, match="cannot write the decoded cache .*dataset.cache_dir"):
        TinyImageNet(fake_copy, "val", cache="disk", cache_dir=str(blocker / "sub"), progress=False)


def test_skip_corrupt_is_applied_when_a_cache_is_reopened(fake_copy):
    victim = TinyImageNet(fake_copy, "val").paths[1]
    with open(victim, "r+b") as f:
        f.truncate(100)
    with pytest.warns(UserWarning, match="skipped 1"):
        TinyImageNet(fake_copy, "val", cache="disk", skip_corrupt=True, progress=False)
    with pytest.raises(DatasetError, match=victim):
        TinyImageNet(fake_copy, "val", cache="disk", progress=False)


def test_gpu_cache_is_refused_clearly(fake_root):
    with pytest.raises(DatasetError, match="gpu is not available yet; use dataset.cache: memory or disk"):
        TinyImageNet(fake_root, "val", cache="gpu")
