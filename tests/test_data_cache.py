"""The decoded cache: same pixels as decoding the JPEGs, reused while valid, rebuilt when stale
or damaged, no temporary file left behind, a full disk found before decoding."""
import errno
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import data.cache
from data.base import DatasetError, decode_image
from data.tinyimagenet import TinyImageNet
from helpers import REPO
from utils.files import DiskFullError


def cache_files(root, split="train"):
    return os.path.join(root, "cache", f"{split}-u8.npy"), os.path.join(root, "cache", f"{split}-u8.json")


def assert_same_pixels(cached, jpeg):
    assert len(cached) == len(jpeg) and cached.paths == jpeg.paths
    for i in range(len(jpeg)):
        image, label = cached[i]
        assert torch.equal(image, jpeg[i][0]) and label == jpeg[i][1], jpeg.paths[i]


def no_rebuild(monkeypatch):
    def refuse(*args):
        raise AssertionError("a valid cache must not be rebuilt")

    monkeypatch.setattr(data.cache, "_write_array", refuse)


@pytest.mark.parametrize("cache", ["memory", "disk"])
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_cached_pixels_equal_jpeg_decoding(fake_copy, cache, split):
    assert_same_pixels(TinyImageNet(fake_copy, split, cache=cache, progress=False), TinyImageNet(fake_copy, split))


def test_disk_cache_is_memory_mapped_and_reused(fake_copy, monkeypatch):
    TinyImageNet(fake_copy, "val", cache="disk", progress=False)
    array_path, _ = cache_files(fake_copy, "val")
    assert np.load(array_path).shape == (16, 64, 64, 3)
    no_rebuild(monkeypatch)
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


# ----------------------------------------------------------------------------- damage
def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _garbage_header(path):
    with open(path, "r+b") as f:
        f.write(b"definitely not an npy header")


def _zero_pixels(path):
    array = np.load(path, mmap_mode="r+")
    array[:] = 0
    array.flush()


def _random_pixels(path):
    array = np.load(path, mmap_mode="r+")
    array[: len(array) // 2] = np.random.default_rng(0).integers(0, 256, array[: len(array) // 2].shape)
    array.flush()


def _other_shape(path):
    np.save(path, np.zeros((3, 64, 64, 3), np.uint8))


def _appended_bytes(path):
    with open(path, "ab") as f:
        f.write(b"\0" * 1000)


@pytest.mark.parametrize("damage", [_truncate, _garbage_header, _zero_pixels, _random_pixels, _other_shape,
                                    _appended_bytes])
def test_a_damaged_cache_is_detected_and_rebuilt(fake_copy, damage, caplog):
    TinyImageNet(fake_copy, "train", cache="disk", progress=False)
    array_path, _ = cache_files(fake_copy)
    damage(array_path)
    with caplog.at_level("WARNING", logger="cvnets.data"):
        cached = TinyImageNet(fake_copy, "train", cache="disk", progress=False)
    assert any("rebuilding it" in r.getMessage() and array_path in r.getMessage() for r in caplog.records)
    assert_same_pixels(cached, TinyImageNet(fake_copy, "train"))


@pytest.mark.parametrize("text", ["[1, 2]", "\"text\"", "not json"])
def test_metadata_that_is_not_a_json_object_makes_a_rebuild(fake_copy, text):
    TinyImageNet(fake_copy, "val", cache="disk", progress=False)
    with open(cache_files(fake_copy, "val")[1], "w") as f:
        f.write(text)
    cached = TinyImageNet(fake_copy, "val", cache="disk", progress=False)
    assert_same_pixels(cached, TinyImageNet(fake_copy, "val"))
    with open(cache_files(fake_copy, "val")[1]) as f:
        assert json.load(f)["count"] == 16


def test_a_damaged_cache_that_cannot_be_rebuilt_is_one_line(fake_copy, monkeypatch):
    TinyImageNet(fake_copy, "val", cache="disk", progress=False)
    _zero_pixels(cache_files(fake_copy, "val")[0])

    def read_only(path, *args, **kwargs):  # as a read-only folder answers (root ignores chmod)
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(data.cache, "atomic_open", read_only)
    with pytest.raises(DatasetError, match="cannot write the decoded cache in .*Permission denied.*dataset.cache_dir") \
            as err:
        TinyImageNet(fake_copy, "val", cache="disk", progress=False)
    assert os.path.join(fake_copy, "cache") in str(err.value) and "\n" not in str(err.value)


def test_checksum_covers_every_byte_of_every_row():
    images = np.zeros((100_000, 2, 2, 3), np.uint8)
    reference = data.cache.checksum(images)
    for row in (0, 50, 31_337, 77_001, 99_999):  # a sample of 1,024 evenly spaced rows misses most
        for byte in (0, 11):
            changed = images.copy()
            changed.reshape(len(images), -1)[row, byte] ^= 0x10
            assert data.cache.checksum(changed) != reference, (row, byte)
    assert data.cache.checksum(np.zeros((99_999, 2, 2, 3), np.uint8)) != reference  # the shape counts


def test_bytes_flipped_inside_one_row_are_found_and_the_cache_rebuilt(fake_copy, caplog):
    jpeg = TinyImageNet(fake_copy, "train")
    TinyImageNet(fake_copy, "train", cache="disk", progress=False)
    array_path, _ = cache_files(fake_copy)
    array = np.load(array_path, mmap_mode="r+")
    array[len(array) // 2 + 1].reshape(-1)[:2000] ^= 0xFF  # 2,000 bytes of one row
    array.flush()
    del array
    with caplog.at_level("WARNING", logger="cvnets.data"):
        cached = TinyImageNet(fake_copy, "train", cache="disk", progress=False)
    assert any("do not match their checksum" in r.getMessage() and "rebuilding it" in r.getMessage()
               for r in caplog.records)
    assert_same_pixels(cached, jpeg)


# ----------------------------------------------------------------------------- building
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


@pytest.mark.slow
def test_a_killed_builders_temporary_file_is_removed_by_the_next_build(fake_copy):
    """kill -9 during the build leaves the temporary file; the next build removes it."""
    script = textwrap.dedent(f"""
        import os, signal
        import data.cache
        from data.tinyimagenet import TinyImageNet
        calls = []
        def decode_then_die(path):
            calls.append(path)
            if len(calls) > 5:
                os.kill(os.getpid(), signal.SIGKILL)
            return data.base.decode_image(path)
        data.cache.decode_image = decode_then_die
        TinyImageNet({fake_copy!r}, "train", cache="disk", progress=False)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=120)
    assert done.returncode == -9
    folder = os.path.join(fake_copy, "cache")
    (left,) = [n for n in os.listdir(folder) if n != ".train-u8.lock"]  # the killed builder's lock file stays
    assert left.startswith(".train-u8.npy.") and left.endswith(".tmp")
    assert os.path.getsize(os.path.join(folder, left)) >= 48 * 64 * 64 * 3  # reserved in full up front
    TinyImageNet(fake_copy, "train", cache="disk", progress=False)
    assert sorted(os.listdir(folder)) == ["train-u8.json", "train-u8.npy"]


def test_a_leftover_of_a_killed_0_1_build_is_removed_too(fake_copy):
    """Version 0.1 named its temporary array `<name>.npy.tmp-<pid>`; one from a dead builder goes."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder = os.path.join(fake_copy, "cache")
    os.makedirs(folder)
    leftovers = [f"train-u8.npy.tmp-{int(dead.stdout)}", f"train-u8.json.tmp-{int(dead.stdout)}"]
    for name in leftovers:
        with open(os.path.join(folder, name), "wb") as f:
            f.write(b"\0" * 1000)
    alive = f"val-u8.npy.tmp-{os.getpid()}"  # a live builder's file stays
    open(os.path.join(folder, alive), "wb").close()
    TinyImageNet(fake_copy, "train", cache="disk", progress=False)
    assert sorted(os.listdir(folder)) == ["train-u8.json", "train-u8.npy", alive]


def test_a_full_disk_is_found_before_decoding(fake_copy, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    monkeypatch.setattr(data.cache, "_decode_into", lambda *args: pytest.fail("decoded before reserving the space"))
    with pytest.raises(DiskFullError) as err:
        TinyImageNet(fake_copy, "train", cache="disk", progress=False)
    folder = os.path.join(fake_copy, "cache")
    needed = 48 * 64 * 64 * 3
    message = str(err.value)
    assert folder in message and "\n" not in message
    assert any(int(n.replace(",", "")) >= needed for n in message.split() if n.replace(",", "").isdigit())
    assert os.listdir(folder) == []  # no temporary file left


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
