"""Faults and bad input of the second sweep: run folders with records but no last checkpoint,
checkpoints of another class list or with damaged tensors, file modes, huge values, paths that
are files, flags given twice. Each ends in one line and the documented exit status, or in a
correct run; nothing is half-written."""
import errno
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest
import torch

from data.fake import make_fake_tinyimagenet
from data.tinyimagenet import TinyImageNet
from engine import checkpoint as ckpt
from engine.commands import evaluate, export, train, upgrade_checkpoint
from helpers import FAKE_TREE, REPO, assert_same_weights, child_env, ddp_command, last_state, read_rows, tiny_args
from tools import sweep
from utils.files import DiskFullError


def one_batch_args(root, results, label, *extra):
    return tiny_args(root, results, label, 1, "--common.max-batches-per-epoch", "2", *extra)


@pytest.fixture(scope="module")
def finished_run(fake_root, tmp_path_factory):
    """A finished one-epoch run folder; tests copy it before changing anything."""
    results = tmp_path_factory.mktemp("finished")
    assert train(one_batch_args(fake_root, results, "done")) == 0
    return results / "done"


@pytest.fixture
def run_copy(finished_run, tmp_path):
    return shutil.copytree(finished_run, tmp_path / "done")


def call(command, argv, capsys):
    """(exit status, stderr lines) of a command, whether it returns or exits while parsing."""
    capsys.readouterr()
    try:
        status = command(argv)
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err.strip().splitlines()


def snapshot(folder):
    names = sorted(set(os.listdir(folder)) - {"train.log", ".lock"})
    return {name: (folder / name).read_bytes() for name in names}


# ----------------------------------------------------------------------------- records without a last checkpoint
@pytest.mark.parametrize("resume", [["--common.resume", "auto"], []])
def test_records_without_a_last_checkpoint_are_refused_not_retrained(fake_root, run_copy, capsys, resume):
    os.remove(run_copy / "checkpoint_last.pt")
    before = snapshot(run_copy)
    status, err = call(train, one_batch_args(fake_root, run_copy.parent, "done", *resume), capsys)
    assert status == 2 and len(err) == 1, err
    assert "metrics.jsonl with 1 epoch(s)" in err[0] and "checkpoint_best.pt" in err[0]
    assert "no checkpoint_last.pt" in err[0] and "--common.run-label" in err[0] and "--common.resume restart" in err[0]
    assert snapshot(run_copy) == before


def test_resume_restart_discards_the_records_and_trains_from_scratch(fake_root, run_copy, capsys):
    os.remove(run_copy / "checkpoint_last.pt")
    (run_copy / "metrics.jsonl").write_text('{"epoch": 1, "val_top1": 99.0}\n{"epoch": 2, "val_top1": 99.5}\n')
    status, err = call(train, one_batch_args(fake_root, run_copy.parent, "done", "--common.resume", "restart"), capsys)
    assert status == 0, err
    assert [row["epoch"] for row in read_rows(run_copy)] == [1]
    assert read_rows(run_copy)[0]["val_top1"] != 99.0
    assert ckpt.load(str(run_copy / "checkpoint_best.pt"))["metrics"]["val_top1"] == read_rows(run_copy)[0]["val_top1"]


# ----------------------------------------------------------------------------- class lists
@pytest.fixture(scope="module")
def other_classes(tmp_path_factory):
    """Fake trees whose wnids differ from fake_root's: the same count, and one class more."""
    base = tmp_path_factory.mktemp("other")
    same = make_fake_tinyimagenet(str(base / "same"), **{**FAKE_TREE, "seed": 1})
    more = make_fake_tinyimagenet(str(base / "more"), **{**FAKE_TREE, "seed": 1, "classes": 5})
    return same, more


def test_checkpoints_store_the_class_list(finished_run, fake_root):
    from data.tinyimagenet import read_classes

    wnids = read_classes(fake_root).wnids
    for name in ("checkpoint_last.pt", "checkpoint_best.pt", "checkpoint_ema_best.pt"):
        assert ckpt.load(str(finished_run / name))["wnids"] == wnids, name


def test_resume_onto_another_class_list_is_refused(run_copy, other_classes, capsys):
    before = snapshot(run_copy)
    status, err = call(train, one_batch_args(other_classes[0], run_copy.parent, "done", "--common.resume", "auto",
                                             "--scheduler.max-epochs", "2",
                                             "--common.resume-allow-changes", "scheduler.max_epochs"), capsys)
    assert status == 2 and len(err) == 1, err
    assert "another class list (class 0 is" in err[0] and "--model.checkpoint" in err[0]
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("which, detail", [(0, "class 0 is"), (1, "4 classes, the dataset has 5")])
def test_eval_on_another_class_list_is_refused(finished_run, other_classes, capsys, which, detail):
    argv = ["--model.checkpoint", str(finished_run / "checkpoint_best.pt"), "--dataset.root", other_classes[which],
            "--dataset.workers", "0"]
    status, err = call(evaluate, argv, capsys)
    assert status == 2 and len(err) == 1, err
    assert "another class list" in err[0] and detail in err[0] and "checkpoint_best.pt" in err[0]


def test_fine_tuning_onto_another_class_list_says_so(finished_run, other_classes, tmp_path, capsys):
    argv = one_batch_args(other_classes[0], tmp_path, "ft", "--model.checkpoint",
                          str(finished_run / "checkpoint_best.pt"))
    capsys.readouterr()
    assert train(argv) == 0
    out = capsys.readouterr().out
    assert f"fine-tuning {finished_run / 'checkpoint_best.pt'} on another class list (class 0 is" in out


# ----------------------------------------------------------------------------- damaged checkpoints
def _flip_a_byte_inside(path, tensor):
    data = bytearray(path.read_bytes())
    raw = torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage()).numpy().tobytes()  # as stored
    at = data.find(raw)
    assert at > 0 and data.find(raw, at + 1) < 0, "the tensor's bytes should appear once in the file"
    data[at + len(raw) // 2] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["checkpoint_best.pt", "checkpoint_last.pt"])
def test_a_flipped_bit_in_tensor_data_is_refused_by_eval(run_copy, capsys, name):
    path = run_copy / name
    state = ckpt.load(str(path))
    key = max(state["model"], key=lambda k: state["model"][k].numel())
    _flip_a_byte_inside(path, state["model"][key])
    assert not torch.equal(torch.load(path, weights_only=True)["model"][key], state["model"][key])
    status, err = call(evaluate, ["--model.checkpoint", str(path), "--dataset.workers", "0"], capsys)
    assert status == 2 and len(err) == 1, err
    assert f"{path} is damaged" in err[0] and "checksum" in err[0]


def test_a_flipped_bit_in_the_last_checkpoint_is_refused_by_resume(fake_root, run_copy, capsys):
    path = run_copy / "checkpoint_last.pt"
    state = ckpt.load(str(path))
    moments = [t for per_param in state["optimizer"]["state"].values() for t in per_param.values() if t.numel() > 1]
    _flip_a_byte_inside(path, max(moments, key=torch.Tensor.numel))
    before = snapshot(run_copy)
    status, err = call(train, one_batch_args(fake_root, run_copy.parent, "done", "--common.resume", "auto"), capsys)
    assert status == 2 and len(err) == 1 and f"{path} is damaged" in err[0], err
    assert snapshot(run_copy) == before


def test_a_checkpoint_without_a_checksum_still_loads(run_copy):
    path = run_copy / "checkpoint_best.pt"
    state = torch.load(path, weights_only=True)
    del state[ckpt.CHECKSUM]
    torch.save(state, path)
    assert ckpt.load(str(path))["model"].keys() == state["model"].keys()


def test_the_checksum_changes_with_any_stored_value():
    state = {"model": {"w": torch.zeros(3, 2), "b": torch.zeros(2, dtype=torch.bfloat16)}, "epoch": 3}
    reference = ckpt.checksum(state)
    changed = [
        {**state, "epoch": 4},
        {**state, "model": {**state["model"], "w": torch.zeros(2, 3)}},  # same bytes, other shape
        {**state, "model": {**state["model"], "b": torch.tensor([0.0, 2 ** -8], dtype=torch.bfloat16)}},
    ]
    assert all(ckpt.checksum(c) != reference for c in changed)
    assert ckpt.checksum({**state, ckpt.CHECKSUM: "x"}) == reference


# ----------------------------------------------------------------------------- file modes
@pytest.fixture
def umask():
    """Set a umask for the test (the process's is restored after it)."""
    saved = os.umask(0o022)

    def set_mask(mask):
        os.umask(mask)

    yield set_mask
    os.umask(saved)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_atomic_writes_get_the_umask_mode(tmp_path, umask, mask, mode):
    from utils.files import atomic_write_text, current_umask, write_json

    umask(mask)
    assert current_umask() == mask
    atomic_write_text(str(tmp_path / "a.txt"), "x")
    write_json(str(tmp_path / "b.json"), {})
    ckpt.save({"model": {}, "config": {}}, str(tmp_path / "c.pt"))
    for name in ("a.txt", "b.json", "c.pt"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == mode, name


def test_a_run_folder_is_readable_under_umask_022(fake_root, tmp_path, umask):
    umask(0o022)
    assert train(one_batch_args(fake_root, tmp_path, "modes")) == 0
    modes = {name: os.stat(tmp_path / "modes" / name).st_mode & 0o777 for name in os.listdir(tmp_path / "modes")}
    for name in ("checkpoint_last.pt", "checkpoint_best.pt", "config.yaml", "summary.json", "metrics.jsonl"):
        assert modes.pop(name) == 0o644, name
    assert all(mode == 0o644 for mode in modes.values()), modes


def test_a_generated_dataset_root_gets_the_umask_mode(tmp_path, umask):
    umask(0o022)
    root = make_fake_tinyimagenet(str(tmp_path / "tiny"), classes=1, train_per_class=1, val_per_class=1,
                                  test_per_class=0)
    assert os.stat(root).st_mode & 0o777 == 0o755


# ----------------------------------------------------------------------------- a flag given twice
@pytest.mark.parametrize("argv, named", [
    (["--optim.weight-decay", "0.1", "--optim.weight-decay", "0.5"],
     "--optim.weight-decay is given twice ('0.1' and '0.5')"),
    (["--optim.weight_decay=0.1", "--optim.weight-decay", "0.5"], "--optim.weight_decay is given twice"),
    (["--common.config-file", "config/resnet18.yaml", "--common.config-file", "config/resnet34.yaml"],
     "--common.config-file is given twice ('config/resnet18.yaml' and 'config/resnet34.yaml')"),
])
def test_a_flag_given_twice_is_refused_naming_it(argv, named, capsys, monkeypatch):

    monkeypatch.chdir(REPO)
    status, out, err = _train_in_process(capsys, *argv, "--print-config")
    assert status == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and named in err, err


# ----------------------------------------------------------------------------- text files of the layout
def _rewrite(path, transform):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    with open(path, "wb") as f:
        f.write(transform(text))


@pytest.mark.parametrize("name", ["wnids.txt", "val/val_annotations.txt", "words.txt"])
def test_a_byte_order_mark_and_crlf_line_ends_are_read_as_the_plain_file(fake_root, fake_copy, name):
    _rewrite(os.path.join(fake_copy, name), lambda text: b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    for split in ("train", "val"):
        plain, marked = TinyImageNet(fake_root, split), TinyImageNet(fake_copy, split)
        assert marked.wnids == plain.wnids and marked.class_names == plain.class_names
        assert marked.file_names == plain.file_names and marked.labels.tolist() == plain.labels.tolist()


def test_a_name_that_still_does_not_exist_is_shown_with_repr(fake_copy):
    from data.base import DatasetError

    annotations = os.path.join(fake_copy, "val", "val_annotations.txt")
    _rewrite(annotations, lambda text: ("val_0\u200b" + text[len("val_0"):]).encode())  # a zero-width space
    with pytest.raises(DatasetError, match=r"val_0\\u200b\.JPEG' does not exist"):
        TinyImageNet(fake_copy, "val")


# ----------------------------------------------------------------------------- huge values, impossible sizes
def _train_in_process(capsys, *argv):
    """main_train's (exit status, stdout, stderr) for arguments it answers without training."""
    with pytest.raises(SystemExit) as stop:
        train(list(argv))
    out, err = capsys.readouterr()
    return stop.value.code, out, err


def _print_config(*argv):
    return subprocess.run([sys.executable, os.path.join(REPO, "main_train.py"), "--common.config-file",
                           os.path.join(REPO, "config", "mobilevit_tiny.yaml"), *argv, "--print-config"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_a_huge_epoch_count_is_refused_at_once_not_walked():
    # A subprocess with a time limit: what this guards against is a hang.
    done = _print_config("--scheduler.max-epochs", "1000000000000", "--sampler.name", "variable_batch_sampler")
    assert done.returncode == 2 and done.stdout == "", done.stderr[-500:]
    assert len(done.stderr.splitlines()) == 1 and "1000000000000 must be in [1, 10000]" in done.stderr


@pytest.mark.parametrize("flag, value, bound", [
    ("--sampler.vbs.max-n-scales", "1000000000", "[1, 256]"),
    ("--dataset.train-batch-size", "100000", "[1, 65536]"),
    ("--dataset.val-batch-size", "100000", "[1, 65536]"),
])
def test_huge_values_are_refused_at_once(flag, value, bound, capsys):
    status, out, err = _train_in_process(capsys, "--common.config-file", os.path.join(REPO, "config", "mobilevit_tiny.yaml"), flag, value,
                                         "--sampler.name", "variable_batch_sampler", "--print-config")
    assert status == 2 and out == "", err[-500:]
    assert len(err.splitlines()) == 1 and f"{value} must be in {bound}" in err


def test_epoch_length_of_a_fixed_batch_is_computed_not_walked(monkeypatch):
    from data.samplers import ShardedBatchSampler, batch_sampler
    from options.schema import SamplerConfig

    sampler = batch_sampler(10**9, SamplerConfig(), 128, shuffle=True)
    with monkeypatch.context() as m:  # drawing an epoch's batches: 7.8 million here, per epoch
        m.setattr(ShardedBatchSampler, "_plan", lambda *args: pytest.fail("walked the epoch's batches"))
        assert [sampler.epoch_length(e) for e in range(10_000)] == [math.ceil(10**9 / 128)] * 10_000
    small = batch_sampler(1000, SamplerConfig(), 128, shuffle=True, rank=1, world_size=3)
    assert small.epoch_length(0) == len(list(small)) == math.ceil(333 / 128)


@pytest.mark.parametrize("extra, fragments", [
    (["--dataset.train-batch-size", "49"], ["dataset.train_batch_size: 49 is larger than the dataset's 48 training",
                                            "at most 48"]),
    (["--model.num-classes", "3"], ["model.num_classes: 3 is smaller than the dataset's 4 classes"]),
])
def test_a_batch_or_classifier_that_cannot_fit_the_dataset_is_one_line(fake_root, tmp_path, capsys, extra, fragments):
    status, err = call(train, one_batch_args(fake_root, tmp_path, "fit", *extra), capsys)
    assert status == 2 and len(err) == 1, err
    assert all(f in err[0] for f in fragments), err
    assert not (tmp_path / "fit" / "checkpoint_last.pt").exists()


@pytest.mark.parametrize("where", ["results", "label"])
def test_a_results_loc_or_run_folder_that_is_a_file_is_one_line(fake_root, tmp_path, capsys, where):
    (tmp_path / "results").write_text("") if where == "results" else (tmp_path / "runs").mkdir()
    results = tmp_path / ("results" if where == "results" else "runs")
    if where == "label":
        (results / "taken").write_text("")
    status, err = call(train, one_batch_args(fake_root, results, "taken"), capsys)
    assert status == 2 and len(err) == 1, err
    assert "is a file, not a folder for runs" in err[0]
    assert ("--common.results-loc" if where == "results" else "--common.run-label") in err[0]


def test_a_read_only_file_system_for_the_run_folder_is_one_line(fake_root, tmp_path, capsys, monkeypatch):
    real_makedirs = os.makedirs

    def read_only(path, *args, **kwargs):  # what a file system remounted read-only answers
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_makedirs(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", read_only)
    status, err = call(train, one_batch_args(fake_root, tmp_path / "ro", "run"), capsys)
    assert status == 2 and len(err) == 1, err
    assert f"cannot create the run folder {tmp_path / 'ro' / 'run'} (Read-only file system)" in err[0]
    assert "--common.results-loc" in err[0]


# ----------------------------------------------------------------------------- disk full in more places
def _enospc(path=""):
    return OSError(errno.ENOSPC, "No space left on device", path)


def test_a_full_disk_while_appending_metrics_is_one_line_and_leaves_no_torn_row(fake_root, tmp_path, capsys,
                                                                               monkeypatch):
    real_write = os.write

    def write_half_then_fail(fd, data):  # the disk fills in the middle of the row
        if os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl") and len(data) > 8:
            real_write(fd, data[: len(data) // 2])
            raise _enospc()
        return real_write(fd, data)

    args = tiny_args(fake_root, tmp_path, "m", 2, "--common.max-batches-per-epoch", "2", "--common.resume", "auto")
    assert train(tiny_args(fake_root, tmp_path, "m", 1, "--common.max-batches-per-epoch", "2")) == 0
    rows = (tmp_path / "m" / "metrics.jsonl").read_bytes()
    monkeypatch.setattr(os, "write", write_half_then_fail)
    status, err = call(train, [*args, "--common.resume-allow-changes", "scheduler.max_epochs"], capsys)
    monkeypatch.undo()
    assert status == 1 and len(err) == 1, err
    assert err[0].startswith("error: disk full: writing metrics.jsonl in") and str(tmp_path / "m") in err[0]
    assert (tmp_path / "m" / "metrics.jsonl").read_bytes() == rows  # cut back: no half row


def test_a_full_disk_for_train_log_costs_whole_lines_with_one_warning(fake_root, tmp_path, capsys, monkeypatch):
    real_write = os.write
    failed = []

    def fail_every_other_log_line(fd, data):  # space comes and goes: half of train.log's lines fail half-way
        if os.readlink(f"/proc/self/fd/{fd}").endswith("train.log"):
            failed.append(len(failed) % 2 == 0)
            if failed[-1]:
                real_write(fd, data[: len(data) // 2])
                raise _enospc()
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", fail_every_other_log_line)
    status, err = call(train, tiny_args(fake_root, tmp_path, "log", 1, "--common.max-batches-per-epoch", "2"), capsys)
    monkeypatch.undo()
    assert status == 0, err
    assert sum(failed) >= 3 and err == [f"warning: disk full: {tmp_path / 'log' / 'train.log'} misses log lines "
                                        "until there is space"] * sum(failed), err  # once per stretch of full disk
    lines = (tmp_path / "log" / "train.log").read_text().splitlines()
    assert len(lines) == len(failed) - sum(failed)  # every line written whole, none torn
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ", line) for line in lines), lines


def test_no_inode_left_for_a_checkpoint_is_one_line(fake_root, tmp_path, capsys, monkeypatch):
    real_mkstemp = tempfile.mkstemp

    def no_inodes(*args, prefix="", **kwargs):
        if prefix.startswith(".checkpoint_"):
            raise _enospc()
        return real_mkstemp(*args, prefix=prefix, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", no_inodes)
    status, err = call(train, one_batch_args(fake_root, tmp_path, "inodes"), capsys)
    assert status == 1 and len(err) == 1, err
    assert err[0].startswith("error: disk full: writing checkpoint_") and str(tmp_path / "inodes") in err[0]
    assert not [n for n in os.listdir(tmp_path / "inodes") if n.endswith(".tmp") or n.endswith(".pt")]


def test_a_full_disk_at_run_start_is_one_line(fake_root, tmp_path, capsys, monkeypatch):
    real_makedirs = os.makedirs

    def full(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "full")):
            raise _enospc(str(path))
        return real_makedirs(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", full)
    status, err = call(train, one_batch_args(fake_root, tmp_path / "full", "run"), capsys)
    assert status == 1 and len(err) == 1, err
    assert err[0].startswith("error: disk full: writing .lock in") and str(tmp_path / "full" / "run") in err[0]


def test_a_full_disk_while_unpacking_the_archive_is_one_line_and_leaves_nothing(fake_zip, tmp_path, monkeypatch):
    import zipfile

    from data.archive import unpack_archive

    real_extract, count = zipfile.ZipFile.extract, []

    def fill_up(self, member, *args, **kwargs):
        count.append(member)
        if len(count) > 5:
            raise _enospc()
        return real_extract(self, member, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "extract", fill_up)
    (tmp_path / "out").mkdir()
    with pytest.raises(DiskFullError, match=r"^disk full: writing tiny-imagenet-200 in .*out needs [\d,]+ bytes"):
        unpack_archive(fake_zip, str(tmp_path / "out" / "tiny-imagenet-200"), progress=False)
    assert os.listdir(tmp_path / "out") == []


def test_no_inode_left_for_the_decoded_cache_is_disk_full_not_make_it_writable(fake_copy, monkeypatch):
    def no_inodes(*args, **kwargs):
        raise _enospc()

    monkeypatch.setattr(tempfile, "mkstemp", no_inodes)
    with pytest.raises(DiskFullError, match="^disk full: writing val-u8.npy in .*cache needs [\\d,]+ bytes"):
        TinyImageNet(fake_copy, "val", cache="disk", progress=False)


# ----------------------------------------------------------------------------- bad input that was a traceback
@pytest.mark.parametrize("flag, command", [("--eval.output-json", "evaluate"), ("--eval.predictions-csv", "evaluate"),
                                           ("--export.output", "export")])
def test_an_output_path_under_a_file_is_one_line(finished_run, tmp_path, capsys, flag, command):
    (tmp_path / "plain").write_text("")
    argv = ["--model.checkpoint", str(finished_run / "checkpoint_best.pt"), flag, str(tmp_path / "plain" / "out" / "x"),
            "--dataset.workers", "0"]
    if flag == "--eval.predictions-csv":
        argv += ["--eval.split", "test"]
    status, err = call({"evaluate": evaluate, "export": export}[command], argv, capsys)
    assert status == 2 and len(err) == 1, err
    assert f"{tmp_path / 'plain'} is a file" in err[0] and flag.lstrip("-").replace("-", "_") in err[0]


def _resave(path, change):
    state = torch.load(path, weights_only=True)
    change(state)
    state.pop(ckpt.CHECKSUM, None)
    ckpt.save(state, str(path))


@pytest.mark.parametrize("command", [evaluate, export])
def test_weights_missing_a_key_are_one_line(run_copy, capsys, command):
    path = run_copy / "checkpoint_best.pt"
    _resave(path, lambda state: state["model"].pop(sorted(state["model"])[0]))
    status, err = call(command, ["--model.checkpoint", str(path), "--dataset.workers", "0"], capsys)
    assert status == 2 and len(err) == 1, err
    assert f"{path}: its weights do not fit the model" in err[0] and "Missing key" in err[0]


def test_a_stored_config_that_is_not_a_mapping_is_one_line(run_copy, capsys):
    path = run_copy / "checkpoint_best.pt"
    _resave(path, lambda state: state.update(config=["not", "a", "mapping"]))
    status, err = call(evaluate, ["--model.checkpoint", str(path)], capsys)
    assert status == 2 and len(err) == 1, err
    assert "is not a checkpoint of this tool (its config is a list, not a mapping)" in err[0]


@pytest.mark.parametrize("content", [None, "just some text\n"])
def test_upgrade_of_a_missing_or_text_file_is_one_line(tmp_path, capsys, content):
    path = tmp_path / "old.pt"
    if content is not None:
        path.write_text(content)
    assert upgrade_checkpoint(["--upgrade", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0], err
    assert ("not found" if content is None else "cannot read") in err[0]


def _sweep(capsys, *argv):
    """tools/sweep's (exit status, stderr lines) for a dry run of `argv`."""
    return call(sweep.main, ["--common.config-file", os.path.join(REPO, "config", "mobilevit_tiny.yaml"), "--dry-run",
                             *argv], capsys)


@pytest.mark.parametrize("grid, fragment", [
    (b"optim:\n  weight_decay: [0.1, \xff]\n", "is not UTF-8 text"),
    (b"common:\n  run_label: [2024-01-01]\n", "datetime.date(2024, 1, 1) is a date, not a config value; quote it"),
])
def test_a_grid_file_that_is_not_utf8_or_holds_a_date_is_one_line(tmp_path, capsys, grid, fragment):
    (tmp_path / "grid.yaml").write_bytes(grid)
    status, err = _sweep(capsys, "--grid-file", str(tmp_path / "grid.yaml"), "--results", str(tmp_path / "sweeps"))
    assert status == 2 and len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "sweeps").exists()


def test_sweep_results_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "sweeps").write_text("")
    status, err = _sweep(capsys, "--grid", "optim.weight_decay=0.1,0.2", "--results", str(tmp_path / "sweeps"))
    assert status == 2 and len(err) == 1 and f"--results {tmp_path / 'sweeps'} is a file" in err[0], err


# ----------------------------------------------------------------------------- DDP resume
@pytest.mark.slow
def test_a_ddp_run_stopped_on_one_rank_resumes_exactly(fake_root, tmp_path):
    """Rank 0 alone gets SIGTERM while it writes its first best checkpoint: both ranks stop after
    epoch 1 with 143, and the resumed run's records (train_loss, ema_val_*) and weights equal an
    uninterrupted DDP run's: each rank resumes its own EMA BatchNorm statistics and RNG."""

    def torchrun(label, *extra, env=()):
        args = tiny_args(fake_root, tmp_path, label, 2, "--common.log-every-batches", "1", "--dataset.train-batch-size",
                         "4", "--common.resume", "auto", *extra)
        return subprocess.run(ddp_command(args, "engine.torchrun"), cwd=REPO, capture_output=True, text=True,
                              timeout=600, env=child_env(**dict(env)))

    done = torchrun("whole")
    assert done.returncode == 0, done.stderr[-3000:]
    stopped = torchrun("split", env={"CVNETS_TEST_FAULT": "SIGTERM:*/checkpoint_best.pt:1"})
    # Both ranks stop at the epoch's end with 143, and so does engine.torchrun (plain torchrun: 1);
    # whichever rank exits first is the one named.
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert stopped.stderr.splitlines()[-1].endswith("stopped by SIGTERM (exit status 143); its state is saved")
    assert "Traceback" not in stopped.stderr
    state = last_state(tmp_path / "split")
    assert state["progress"] == {"epoch": 1, "iteration": 6, "batch_in_epoch": 0, "meter": None}
    assert len(state["ranks"]) == 2
    done = torchrun("split")
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_rows(tmp_path / "split") == read_rows(tmp_path / "whole")
    whole, split = last_state(tmp_path / "whole"), last_state(tmp_path / "split")
    assert_same_weights(whole["model"], split["model"])
    assert_same_weights(whole["ema"]["module"], split["ema"]["module"])


@pytest.mark.slow
def test_a_ddp_run_stopped_mid_epoch_by_sigterm_to_the_group_resumes_exactly(fake_root, tmp_path):
    """SIGTERM to torchrun's whole process group in the middle of epoch 1: both ranks save (each
    rank's meter sums too), and the resumed run's records equal an uninterrupted DDP run's."""

    def torchrun(label, stop_at=None):
        args = tiny_args(fake_root, tmp_path, label, 2, "--common.log-every-batches", "1",
                         "--dataset.train-batch-size", "2", "--common.resume", "auto")
        proc = subprocess.Popen(ddp_command(args, "engine.torchrun"), cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True, env=child_env())
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if stop_at and stop_at in line:
                os.killpg(proc.pid, signal.SIGTERM)
                stop_at = None
        proc.wait(timeout=600)
        return proc.returncode, "".join(lines)

    status, out = torchrun("whole")
    assert status == 0, out[-3000:]
    status, out = torchrun("split", stop_at="epoch 1/2 batch 4/12")
    assert out.count("stopped by SIGTERM; state saved to") == 2, out[-3000:]  # both ranks
    assert status == 143 and "Traceback" not in out, out[-3000:]  # and torchrun: one line, no traceback
    assert out.rstrip().splitlines()[-1] == ("error: torchrun stopped by SIGTERM: passed on to its trainers, "
                                             "which save and stop")
    state = last_state(tmp_path / "split")
    assert state["progress"]["epoch"] == 0 and 4 <= state["progress"]["batch_in_epoch"] < 12, state["progress"]
    status, out = torchrun("split")
    assert status == 0, out[-3000:]
    assert read_rows(tmp_path / "split") == read_rows(tmp_path / "whole")
    assert all(rank["meter"] is not None for rank in state["ranks"])
