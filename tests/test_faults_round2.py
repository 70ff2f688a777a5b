"""Faults and bad input of the second sweep: run folders with records but no last checkpoint,
checkpoints of another class list or with damaged tensors, file modes, huge values, paths that
are files, flags given twice. Each ends in one line and the documented exit status, or in a
correct run; nothing is half-written."""
import os
import shutil

import pytest
import torch

from engine import checkpoint as ckpt
from engine.commands import evaluate, export, train
from engine_helpers import read_rows, tiny_args


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
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder)) if name != "train.log"}


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
