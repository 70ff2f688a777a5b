"""Runs under faults: hostile checkpoints, kills, a second trainer, a full disk, signals to the
process group. Subprocess tests where the behaviour is about processes."""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import checkpoint as ckpt
from engine.commands import evaluate, export, train
from helpers import REPO, CodePayload, assert_same_weights, child_env, last_state, read_rows, tiny_args
from utils.files import writer_pid


def python_train(args):
    return [sys.executable, os.path.join(REPO, "main_train.py"), *args]


def console_script(name):
    return os.path.join(os.path.dirname(sys.executable), name)


# Workers, 12 batches an epoch, a log line per batch: the runs the kill and signal tests interrupt.
FAULT_RUN = ("--dataset.workers", "2", "--dataset.train-batch-size", "4", "--common.log-every-batches", "1",
             "--common.resume", "auto")


def fault_args(root, results, label):
    return tiny_args(root, results, label, 3, *FAULT_RUN)


@pytest.fixture(scope="module")
def reference(fake_root, tmp_path_factory):
    """The uninterrupted run every interrupted one must equal, trained by the installed console script."""
    results = tmp_path_factory.mktemp("reference")
    done = run([console_script("cvnets-train"), *fault_args(fake_root, results, "ref")])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return results / "ref"


def run(cmd, **kwargs):
    return subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300, **kwargs)


# ----------------------------------------------------------------------------- hostile checkpoints
def test_a_pickle_payload_is_refused_everywhere_and_runs_nothing(fake_root, tmp_path, capsys):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    torch.save({"version": ckpt.VERSION, "model": {}, "config": {}, "note": CodePayload(marker)}, evil)
    run_dir = tmp_path / "res" / "evil_run"
    run_dir.mkdir(parents=True)
    shutil.copy(evil, run_dir / "checkpoint_last.pt")

    for command, argv in (
        (evaluate, ["--model.checkpoint", str(evil)]),
        (export, ["--model.checkpoint", str(evil)]),
        (train, tiny_args(fake_root, tmp_path / "res", "evil_run", 1, "--common.resume", "auto")),
        (train, tiny_args(fake_root, tmp_path / "res", "finetune", 1, "--model.checkpoint", str(evil))),
    ):
        try:
            status = command(argv)
        except SystemExit as e:  # refused while resolving the config (main_eval, main_export)
            status = e.code
        err = capsys.readouterr().err.strip()
        assert status == 2, (command.__name__, err)
        assert len(err.splitlines()) == 1 and "refused to load" in err and "never runs code" in err
        assert not marker.exists()


# ----------------------------------------------------------------------------- records under kills
def _tensorboard_steps(run_dir, tag="val/top1"):
    """The steps TensorBoard shows for `tag`, purges of an interrupted run's extra events applied."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def test_a_crash_between_checkpoint_and_records_leaves_each_epoch_once(fake_root, tmp_path, monkeypatch):
    """The worst moment: checkpoint_last.pt of epoch 2 is on disk, its records are not."""
    import engine.run_folder
    import engine.trainer

    args = lambda label, *extra: tiny_args(fake_root, tmp_path, label, 3, "--common.tensorboard", "true", *extra)  # noqa: E731
    assert train(args("ref")) == 0

    class Killed(BaseException):
        """As if the process died right after the checkpoint rename."""

    def crash_on_second(run_dir, row):
        if row["epoch"] == 2:
            raise Killed
        engine.run_folder.append_metrics(run_dir, row)

    monkeypatch.setattr(engine.trainer, "append_metrics", crash_on_second)
    with pytest.raises(Killed):
        train(args("crash"))
    monkeypatch.undo()
    assert [r["epoch"] for r in read_rows(tmp_path / "crash")] == [1]
    assert last_state(tmp_path / "crash")["progress"]["epoch"] == 2
    # a torn line and a row no checkpoint saw, as a kill during an append could leave
    with open(tmp_path / "crash" / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "val_top1": 1.0}\n{"epoch": 4, "va')

    assert train(args("crash", "--common.resume", "auto")) == 0
    assert read_rows(tmp_path / "crash") == read_rows(tmp_path / "ref")
    assert _tensorboard_steps(tmp_path / "crash") == _tensorboard_steps(tmp_path / "ref") == [1, 2, 3]
    assert_same_weights(last_state(tmp_path / "crash")["model"], last_state(tmp_path / "ref")["model"])


@pytest.mark.slow
def test_kill_9_during_checkpoint_writes_then_resume_matches_an_uninterrupted_run(fake_root, tmp_path, reference):
    """kill -9 twice while checkpoint_last.pt is being replaced: the first run dies writing epoch 2's,
    the resumed one epoch 3's (its second write). The old checkpoint survives each time, the next
    start removes the dead writer's temporary file, and the third run ends equal to the reference."""
    run_dir = tmp_path / "killed"
    command = python_train(fault_args(fake_root, tmp_path, "killed"))
    log = tmp_path / "log.txt"
    for epochs_saved in (1, 2):
        # Output to a file, not a pipe: the killed trainer's loader workers may hold a pipe open a while.
        with log.open("w") as out:
            proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                    env=child_env(CVNETS_TEST_FAULT="SIGKILL:*/killed/checkpoint_last.pt:2"))
            assert proc.wait(timeout=300) == -signal.SIGKILL, log.read_text()[-3000:]
        (left,) = glob.glob(str(run_dir / ".checkpoint_last.pt.*.tmp"))  # complete, never renamed
        assert writer_pid(os.path.basename(left)) == proc.pid  # the earlier run's leftover is gone
        assert last_state(run_dir)["progress"]["epoch"] == epochs_saved
        assert [r["epoch"] for r in read_rows(run_dir)] == list(range(1, epochs_saved + 1))

    done = run(command)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert not glob.glob(str(run_dir / "*.tmp")) and not glob.glob(str(run_dir / ".*.tmp"))
    assert read_rows(run_dir) == read_rows(reference)
    assert_same_weights(last_state(run_dir)["model"], last_state(reference)["model"])


# ----------------------------------------------------------------------------- one trainer per folder
@pytest.mark.slow
def test_a_second_trainer_is_refused_and_a_dead_holder_does_not_block(fake_root, tmp_path):
    # With persistent DataLoader workers, which outlive a killed trainer by a few seconds: they
    # must not keep its lock.
    args = tiny_args(fake_root, tmp_path, "busy", 30, "--common.resume", "auto", "--dataset.workers", "2",
                     "--dataset.persistent-workers", "true")
    first = subprocess.Popen(python_train(args), cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        for line in first.stdout:
            if "epoch 1/30 batch" in line:
                break
        second = run(python_train(args))
        assert second.returncode == 1
        assert second.stderr.strip().count("\n") == 0
        assert f"in use by process {first.pid}" in second.stderr and str(tmp_path / "busy") in second.stderr
    finally:
        first.kill()
        first.wait()
    # at once: the dead holder's lock went with it
    assert train(tiny_args(fake_root, tmp_path, "busy", 1, "--common.resume", "auto",
                           "--common.resume-allow-changes", "scheduler.max_epochs")) == 0


# ----------------------------------------------------------------------------- full disk
@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs whose size the test can change; skip-free fallback: None when mounting is impossible."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        yield None
        return

    def resize(size):
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)

    try:
        yield mount, resize
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_stops_in_one_line_and_keeps_the_last_checkpoint(fake_root, tmp_path, small_disk, capsys,
                                                                   monkeypatch):
    if small_disk is None:  # no mount here: make the free-space check see a full disk instead
        results = tmp_path / "res"
        resize = None
    else:
        results, resize = small_disk
    args = lambda epochs: tiny_args(fake_root, results, "full", epochs, "--common.resume", "auto",  # noqa: E731
                                    "--common.resume-allow-changes", "scheduler.max_epochs")
    assert train(args(1)) == 0
    good = (results / "full" / "checkpoint_last.pt").read_bytes()
    capsys.readouterr()

    if resize is not None:
        used = sum(os.path.getsize(p) for p in glob.glob(str(results / "full" / "*")))
        resize(f"{used // 1024 + 512}k")  # no room for another checkpoint beside the old one
    else:
        import utils.files

        monkeypatch.setattr(utils.files, "free_bytes", lambda folder: 100_000)  # room for the small files only
    assert train(args(2)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: disk full: writing checkpoint_")
    assert str(results / "full") in err and "bytes" in err
    assert (results / "full" / "checkpoint_last.pt").read_bytes() == good
    assert not glob.glob(str(results / "full" / ".*.tmp"))
    ckpt.load(str(results / "full" / "checkpoint_last.pt"))

    if resize is not None:
        resize("64m")
    else:
        monkeypatch.undo()
    assert train(args(2)) == 0
    assert [r["epoch"] for r in read_rows(results / "full")] == [1, 2]


def test_eval_and_export_outputs_on_a_full_disk_fail_in_one_line_and_leave_nothing(trained_run, tmp_path, small_disk,
                                                                                   capsys, monkeypatch):
    best = str(trained_run / "checkpoint_best.pt")
    if small_disk is None:
        import utils.files

        target = tmp_path / "full"
        target.mkdir()
        monkeypatch.setattr(utils.files, "free_bytes", lambda folder: 16)
    else:
        target, resize = small_disk
        resize("64k")
        with open(target / "filler", "wb", buffering=0) as f:  # fill it to the last byte
            try:
                while f.write(b"x" * 4096):
                    pass
            except OSError:
                pass
    capsys.readouterr()
    assert evaluate(["--model.checkpoint", best, "--eval.output-json", str(target / "eval.json")]) == 1
    assert capsys.readouterr().err.startswith("error: disk full: writing eval.json")
    assert export(["--model.checkpoint", best, "--export.output", str(target / "m.torchscript.pt")]) == 1
    assert capsys.readouterr().err.startswith("error: disk full: writing m.torchscript.pt")
    assert sorted(p.name for p in target.iterdir()) == ([] if small_disk is None else ["filler"])


@pytest.mark.parametrize("fmt", ["torchscript", pytest.param("onnx", marks=pytest.mark.slow)])
def test_export_with_a_full_temp_folder_writes_its_artifact(trained_run, tmp_path, small_disk, monkeypatch, fmt):
    """torch's file writers abort the process (SIGABRT) when the disk fills under them; the
    export makes its artifact in memory, so a full temp folder does not matter."""
    import tempfile

    if fmt == "onnx":
        pytest.importorskip("onnxscript")
        pytest.importorskip("onnxruntime")
    if small_disk is None:  # no mount here: a temp folder nothing can be written to
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "absent"))
    else:
        mount, resize = small_disk
        resize("16k")
        monkeypatch.setattr(tempfile, "tempdir", str(mount))
    output = tmp_path / "out" / f"model.{fmt}"
    assert export(["--model.checkpoint", str(trained_run / "checkpoint_best.pt"), "--export.format", fmt,
                   "--export.output", str(output)]) == 0
    assert json.loads(Path(f"{output}.json").read_text())["parity"]["cases"]  # verified from the file's bytes
    assert output.stat().st_size > 100_000


# ----------------------------------------------------------------------------- signals
def _start(args):
    # A session of its own: signals go to its whole process group, workers included, as with
    # `timeout`, scancel or a SLURM preemption.
    return subprocess.Popen(python_train(args), cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _signal_group_at(proc, *steps):
    """Send each (signal, when this text appears in the output) of `steps` to the run's process
    group, in order; the whole output once the run has ended."""
    seen, pending = [], list(steps)
    for line in proc.stdout:
        seen.append(line)
        if pending and pending[0][1] in line:
            os.killpg(proc.pid, pending.pop(0)[0])
            if not pending:
                break
    rest, _ = proc.communicate(timeout=300)
    return "".join(seen) + rest


@pytest.mark.slow
def test_signals_to_the_process_group_save_and_the_resumed_run_is_bit_identical(fake_root, tmp_path, reference):
    args = fault_args(fake_root, tmp_path, "sig")

    proc = _start(args)
    out = _signal_group_at(proc, (signal.SIGTERM, "epoch 1/3 batch 3/"))
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert out.count("SIGTERM received") == 1 and "Traceback" not in out, out
    state = last_state(tmp_path / "sig")
    assert state["progress"]["epoch"] == 0 and state["progress"]["batch_in_epoch"] >= 3

    # SLURM's warning before a time limit, then a second signal (Ctrl-C) while it stops
    proc = _start(args)
    out = _signal_group_at(proc, (signal.SIGUSR1, "epoch 2/3 batch 4/"), (signal.SIGINT, "SIGUSR1 received"))
    assert proc.returncode == 128 + signal.SIGUSR1 and "Traceback" not in out, out
    assert out.count("SIGUSR1 received") == 1 and "SIGINT received" not in out
    assert not glob.glob(str(tmp_path / "sig" / ".*.tmp"))
    ckpt.load(str(tmp_path / "sig" / "checkpoint_last.pt"))

    done = run(python_train(args))
    assert done.returncode == 0, done.stdout[-2000:]
    assert read_rows(tmp_path / "sig") == read_rows(reference)
    assert_same_weights(last_state(tmp_path / "sig")["model"], last_state(reference)["model"])


# ----------------------------------------------------------------------------- console scripts
@pytest.mark.slow
def test_console_scripts_exit_0_on_success_and_2_on_bad_input(reference, tmp_path):
    best = str(reference / "checkpoint_best.pt")  # trained by cvnets-train, exit status 0
    evaluated = run([console_script("cvnets-eval"), "--model.checkpoint", best])
    assert evaluated.returncode == 0 and "top1:" in evaluated.stdout, evaluated.stderr
    exported = run([console_script("cvnets-export"), "--model.checkpoint", best,
                    "--export.output", str(tmp_path / "m.torchscript.pt")])
    assert exported.returncode == 0 and (tmp_path / "m.torchscript.pt").is_file(), exported.stderr
    bad = run([console_script("cvnets-train"), "--optim.wieght-decay", "1"])
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "did you mean" in bad.stderr
