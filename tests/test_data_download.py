"""Getting the dataset: local archive, download (from a file:// URL, never the network), atomicity."""
import dataclasses
import hashlib
import os
import pathlib
import shutil
import zipfile

import pytest

import data.archive
import data.tinyimagenet
from data.archive import ArchiveSpec, download_archive, unpack_archive
from data.base import DatasetError
from data.tinyimagenet import TinyImageNet, prepare_root
from options.schema import DatasetConfig


def spec_of(path):
    with open(path, "rb") as f:
        md5 = hashlib.md5(f.read()).hexdigest()
    return ArchiveSpec(pathlib.Path(path).as_uri(), os.path.getsize(path), md5)


def assert_nothing_left(folder, allowed=()):
    assert sorted(os.listdir(folder)) == sorted(allowed), "no half-unpacked root or temporary folder"


def test_local_archive_unpacks_into_root(fake_zip, fake_root, tmp_path):
    root = str(tmp_path / "datasets" / "tiny-imagenet-200")
    assert prepare_root(DatasetConfig(root=root, archive=fake_zip), progress=False) == root
    assert_nothing_left(tmp_path / "datasets", ["tiny-imagenet-200"])
    assert TinyImageNet(root, "val").file_names == TinyImageNet(fake_root, "val").file_names


def test_archive_with_files_at_the_top_level_works_too(fake_root, tmp_path):
    flat = shutil.make_archive(str(tmp_path / "flat"), "zip", fake_root)
    root = str(tmp_path / "out" / "tiny")
    unpack_archive(flat, root, progress=False)
    assert os.path.isfile(os.path.join(root, "wnids.txt"))
    assert_nothing_left(tmp_path / "out", ["tiny"])


def test_damaged_archive_leaves_no_root(fake_zip, tmp_path):
    broken = str(tmp_path / "broken.zip")
    with open(fake_zip, "rb") as src, open(broken, "wb") as dst:
        dst.write(src.read()[: os.path.getsize(fake_zip) // 2])
    os.makedirs(tmp_path / "out")
    with pytest.raises(DatasetError, match="damaged or not a zip") as err:
        unpack_archive(broken, str(tmp_path / "out" / "tiny"), progress=False)
    assert broken in str(err.value) and "\n" not in str(err.value)
    assert_nothing_left(tmp_path / "out")


def test_interrupted_unpack_leaves_no_root(fake_zip, tmp_path, monkeypatch):
    extract = zipfile.ZipFile.extract
    calls = []

    def extract_then_stop(self, member, path=None, pwd=None):
        calls.append(member)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return extract(self, member, path, pwd)

    monkeypatch.setattr(zipfile.ZipFile, "extract", extract_then_stop)
    os.makedirs(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        unpack_archive(fake_zip, str(tmp_path / "out" / "tiny"), progress=False)
    assert_nothing_left(tmp_path / "out")


def test_member_failing_its_crc_names_the_archive_and_the_fix(fake_zip, tmp_path):
    damaged = str(tmp_path / "crc.zip")
    with open(fake_zip, "rb") as f:
        raw = bytearray(f.read())
    with zipfile.ZipFile(fake_zip) as zf:  # flip bytes inside the stored data of a large member
        member = max(zf.infolist(), key=lambda m: m.compress_size)
    start = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra)
    for k in range(start + 10, start + 20):
        raw[k] ^= 0xFF
    with open(damaged, "wb") as f:
        f.write(raw)
    os.makedirs(tmp_path / "out")
    with pytest.raises(DatasetError) as err:
        unpack_archive(damaged, str(tmp_path / "out" / "tiny"), progress=False)
    message = str(err.value)
    assert message.startswith(f"{damaged} is damaged") and "download it again" in message and "\n" not in message
    assert_nothing_left(tmp_path / "out")


def test_zip_without_wnids_is_rejected(tmp_path):
    other = str(tmp_path / "other.zip")
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("photos/a.txt", "not a dataset")
    os.makedirs(tmp_path / "out")
    with pytest.raises(DatasetError, match="holds no wnids.txt"):
        unpack_archive(other, str(tmp_path / "out" / "tiny"), progress=False)
    assert_nothing_left(tmp_path / "out")


def test_download_checks_size_and_md5_then_unpacks(fake_zip, tmp_path, monkeypatch):
    monkeypatch.setattr(data.tinyimagenet, "OFFICIAL", spec_of(fake_zip))
    root = str(tmp_path / "tiny-imagenet-200")
    prepare_root(DatasetConfig(root=root, download=True), progress=False)
    assert len(TinyImageNet(root, "train")) > 0
    assert_nothing_left(tmp_path, ["tiny-imagenet-200", "tiny-imagenet-200.zip"])  # the zip is kept


def test_download_with_wrong_checksum_keeps_nothing(fake_zip, tmp_path):
    wrong = dataclasses.replace(spec_of(fake_zip), md5="0" * 32)
    with pytest.raises(DatasetError, match="is damaged .*expected .*MD5 0{32}"):
        download_archive(str(tmp_path / "a.zip"), str(tmp_path / "root"), wrong, progress=False)
    assert_nothing_left(tmp_path)


def test_unreachable_download_says_where_to_get_the_archive(tmp_path, monkeypatch):
    monkeypatch.setattr(data.tinyimagenet, "OFFICIAL", ArchiveSpec((tmp_path / "nowhere.zip").as_uri(), 1, "0" * 32))
    root = str(tmp_path / "datasets" / "tiny-imagenet-200")
    with pytest.raises(DatasetError) as err:
        prepare_root(DatasetConfig(root=root, download=True), progress=False)
    message = str(err.value)
    assert "cannot download" in message and "dataset.archive" in message and "\n" not in message
    assert data.archive.OFFICIAL.url in message
    assert f"(now {root})" in message  # the dataset root itself, not the folder the zip goes to
    assert "dataset.download" not in message  # it is set already
    assert_nothing_left(tmp_path / "datasets")


def test_missing_root_without_a_source_explains_every_option(tmp_path):
    root = str(tmp_path / "absent")
    with pytest.raises(DatasetError) as err:
        prepare_root(DatasetConfig(root=root))
    message = str(err.value)
    for hint in (root, "dataset.archive", "dataset.root", "dataset.download", "cs231n.stanford.edu"):
        assert hint in message


def test_missing_local_archive_is_named(tmp_path):
    with pytest.raises(DatasetError, match="dataset.archive: .*nope.zip does not exist"):
        prepare_root(DatasetConfig(root=str(tmp_path / "r"), archive=str(tmp_path / "nope.zip")))
