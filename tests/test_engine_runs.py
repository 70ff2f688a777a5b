"""Runs as users run them: concurrent starts, the cache as a pure speed setting, failures recorded,
SIGHUP, resume into a new label, evaluation from anywhere and at another size, readable records."""
import csv
import fcntl
import signal
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from engine import checkpoint as ckpt
from engine.commands import evaluate, train
from engine.run_folder import is_locked, read_summary
from helpers import REPO, assert_same_weights, child_env, last_state, tiny_args


# ----------------------------------------------------------------------------- the cache changes nothing
def test_cache_and_placement_give_bit_identical_first_epochs(fake_copy, tmp_path):
    """Decoding into memory or onto disk, augmenting in workers or on the device: speed settings
    only. The same seed gives the same initial weights and the same first epoch, bit for bit."""
    results = {}
    for cache in ("none", "memory", "disk"):
        for where in ("workers", "device"):
            label = f"{cache}-{where}"
            args = tiny_args(fake_copy, tmp_path, label, 1, "--dataset.cache", cache, "--dataset.augment-on", where,
                             "--dataset.cache-dir", str(tmp_path / "cache"), "--common.max-batches-per-epoch", "3",
                             "--model.mobilevit.dropout", "0.2")
            assert train(args) == 0, label
            with open(tmp_path / label / "metrics.jsonl") as f:
                row = json.loads(f.readline())
            results[label] = (last_state(tmp_path / label)["model"], row["train_loss"], row["val_loss"])
    reference_weights, train_loss, val_loss = results.pop("none-workers")
    for label, (weights, other_train, other_val) in results.items():
        assert (other_train, other_val) == (train_loss, val_loss), label
        assert_same_weights(weights, reference_weights)


# ----------------------------------------------------------------------------- concurrent starts
def _env():
    return child_env(PYTHONPATH=REPO)


@pytest.mark.slow
def test_two_runs_generating_the_same_dataset_at_once_both_train(tmp_path):
    """Two runs that need the same missing dataset: one writes it (and its decoded cache), the
    other waits and then uses it; both train, nothing half-written is left."""
    root = tmp_path / "data" / "race"
    root.parent.mkdir()
    # Hold the lock a dataset writer takes until both runs wait on it: then they start together.
    gate = os.open(root.parent / ".race.lock", os.O_RDWR | os.O_CREAT)
    fcntl.lockf(gate, fcntl.LOCK_EX)
    procs, outputs = [], []
    for label in ("a", "b"):
        args = tiny_args(root, tmp_path / "results", label, 1, "--dataset.fake.enable", "true",
                         "--dataset.cache", "disk", "--common.max-batches-per-epoch", "2")
        procs.append(subprocess.Popen([sys.executable, os.path.join(REPO, "main_train.py"), *args],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()))
        outputs.append([])
        threading.Thread(target=lambda p=procs[-1], lines=outputs[-1]: lines.extend(p.stdout), daemon=True).start()
    deadline = time.monotonic() + 120
    while not all(any("waiting for another process preparing" in line for line in lines) for lines in outputs):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.stderr.read() for p in procs]
        time.sleep(0.2)
    os.close(gate)
    for p in procs:
        err = p.communicate(timeout=300)[1]
        assert p.returncode == 0, err
        assert "Traceback" not in err
    assert os.listdir(root.parent) == ["race"]  # no partial tree, no lock file left behind
    assert sorted(os.listdir(root / "cache")) == ["train-u8.json", "train-u8.npy", "val-u8.json", "val-u8.npy"]


# ----------------------------------------------------------------------------- failures during setup
@pytest.mark.slow
def test_main_train_without_arguments_prints_usage_and_writes_nothing(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(REPO, "main_train.py")], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "usage: main_train.py --common.config-file" in done.stderr and "--help" in done.stderr
    assert os.listdir(tmp_path) == []  # no results/run/


@pytest.mark.parametrize("extra", [("--model.checkpoint", "/nonexistent/weights.pt"),
                                   ("--common.resume", "/nonexistent/checkpoint_last.pt")])
def test_a_missing_checkpoint_is_refused_before_the_run_folder_exists(fake_root, tmp_path, capsys, extra):
    assert train(tiny_args(fake_root, tmp_path, "run", 1, *extra)) == 2
    err = capsys.readouterr().err
    assert "/nonexistent/" in err and "does not exist" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cuda_asked_for_where_there_is_none_is_refused_before_the_run_folder_exists(fake_root, tmp_path):
    done = subprocess.run([sys.executable, os.path.join(REPO, "main_train.py"),
                           *tiny_args(fake_root, tmp_path, "run", 1, "--common.device", "cuda")],
                          env={**_env(), "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "common.device" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


def test_a_failure_while_building_the_run_is_recorded_in_its_folder(fake_root, tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert train(tiny_args(fake_root, tmp_path, "run", 1, "--model.checkpoint", str(garbage))) == 2
    err = capsys.readouterr().err.strip()
    message = err.removeprefix("error: ")
    summary = read_summary(str(tmp_path / "run"))
    assert summary["state"] == "failed" and summary["error"] == message
    assert not is_locked(str(tmp_path / "run"))  # the lock is released
    with open(tmp_path / "run" / "train.log") as f:
        assert message in f.read()


# ----------------------------------------------------------------------------- SIGHUP
@pytest.mark.slow
def test_a_closed_terminal_sighup_saves_and_exits_129(fake_root, tmp_path):
    """Closing the terminal or the SSH session signals the whole process group, workers included."""
    args = tiny_args(fake_root, tmp_path, "hup", 30, "--dataset.workers", "2")
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "main_train.py"), *args], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if "epoch 1/30 batch" in line:
                break
        os.killpg(proc.pid, signal.SIGHUP)
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGHUP, out
    assert "stopped by SIGHUP" in out and out.count("SIGHUP received") == 1 and "Traceback" not in out
    summary = read_summary(str(tmp_path / "hup"))
    assert summary["state"] == "interrupted" and summary["stopped_by"] == "SIGHUP"
    assert last_state(tmp_path / "hup")["progress"]["iteration"] > 0


# ----------------------------------------------------------------------------- evaluation from anywhere
@pytest.mark.slow
def test_the_evaluate_hint_runs_from_another_folder(tmp_path):
    """A run started with a relative dataset.root stores the absolute path: its closing hint and
    cvnets-eval work from any folder, on the run's own data (no new dataset where they run)."""
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    args = tiny_args("data/tiny", "results", "rel", 1, "--dataset.fake.enable", "true", "--dataset.fake.classes", "4",
                     "--dataset.fake.train-per-class", "8", "--dataset.fake.val-per-class", "4")
    done = subprocess.run([sys.executable, os.path.join(REPO, "main_train.py"), *args], cwd=start, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    stored = last_state(start / "results" / "rel")["config"]["dataset"]["root"]
    assert stored == str(start / "data" / "tiny")
    hint = next(line for line in done.stdout.splitlines() if "evaluate:" in line).split("evaluate:", 1)[1].split()
    assert os.path.isfile(hint[-1])
    for command in (hint, ["cvnets-eval", *hint[-2:]]):
        evaluated = subprocess.run(command, cwd=elsewhere, env=_env(), capture_output=True, text=True, timeout=300)
        assert evaluated.returncode == 0, evaluated.stderr
        assert "val images: 16" in evaluated.stdout  # 4 classes x 4: the run's own val split
    assert os.listdir(elsewhere) == []


# ----------------------------------------------------------------------------- resume into a new label
def test_continuing_another_runs_checkpoint_in_a_new_folder(fake_root, tmp_path, capsys):
    """The new folder carries what its records name: the best checkpoints of the epochs it took
    over, and the epochs it trains on top of a finished run."""
    assert train(tiny_args(fake_root, tmp_path, "src", 2)) == 0
    capsys.readouterr()
    source_best = ckpt.load(str(tmp_path / "src" / "checkpoint_best.pt"))
    fork = tiny_args(fake_root, tmp_path, "fork", 3, "--common.resume", str(tmp_path / "src" / "checkpoint_last.pt"),
                     "--common.resume-allow-changes", "scheduler.max_epochs")
    assert train(fork) == 0
    out = capsys.readouterr().out
    assert "already finished" not in out and "run finished: 3/3 epochs" in out
    rows = [json.loads(line) for line in open(tmp_path / "fork" / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    summary = read_summary(str(tmp_path / "fork"))
    for name, key in (("checkpoint_best.pt", "best"), ("checkpoint_ema_best.pt", "ema_best")):
        best = ckpt.load(str(tmp_path / "fork" / name))
        assert best["epoch"] == summary[key]["epoch"], name
        if best["epoch"] <= 2:  # taken over from the source run
            assert_same_weights(best["model"], ckpt.load(str(tmp_path / "src" / name))["model"])
    hint = next(line for line in out.splitlines() if "evaluate:" in line)
    assert hint.endswith(str(tmp_path / "fork" / "checkpoint_best.pt"))
    assert source_best["epoch"] == read_summary(str(tmp_path / "src"))["best"]["epoch"]  # the source is untouched
    # a copy of the finished run in a third folder holds its records too
    assert train(tiny_args(fake_root, tmp_path, "copy", 2, "--common.resume",
                           str(tmp_path / "src" / "checkpoint_last.pt"))) == 0
    assert read_summary(str(tmp_path / "copy"))["state"] == "finished"
    assert [json.loads(line)["epoch"] for line in open(tmp_path / "copy" / "metrics.jsonl")] == [1, 2]
    assert (tmp_path / "copy" / "checkpoint_last.pt").is_file() and (tmp_path / "copy" / "checkpoint_best.pt").is_file()


# ----------------------------------------------------------------------------- main_eval: size, test CSV
def test_eval_image_size_resizes_like_the_val_pipeline_and_says_so(trained_run, tmp_path, capsys):
    best = str(trained_run / "checkpoint_best.pt")
    assert evaluate(["--model.checkpoint", best, "--eval.output-json", str(tmp_path / "default.json")]) == 0
    assert "image size: 32x32" in capsys.readouterr().out  # the run's own val pipeline (tiny_args: 36 -> 32)
    assert evaluate(["--model.checkpoint", best, "--eval.image-size", "48",
                     "--eval.output-json", str(tmp_path / "48.json")]) == 0
    assert "image size: 48x48" in capsys.readouterr().out
    by_hand = ["--image-augmentation.val", "[{name: resize, size: 56}, {name: center_crop, size: 48}]"]
    assert evaluate(["--model.checkpoint", best, *by_hand, "--eval.output-json", str(tmp_path / "hand.json")]) == 0
    at_48, hand = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("48", "hand"))
    assert at_48["image_size"] == [48, 48] and at_48["loss"] == hand["loss"] and at_48["top5"] == hand["top5"]
    assert at_48["loss"] != json.loads((tmp_path / "default.json").read_text())["loss"]


def test_test_split_csv_has_class_names_scores_and_top5(trained_run, fake_root, tmp_path):
    out = tmp_path / "pred.csv"
    assert evaluate(["--model.checkpoint", str(trained_run / "checkpoint_best.pt"), "--eval.split", "test",
                     "--eval.predictions-csv", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 4 * 2
    words = dict(line.rstrip("\n").split("\t") for line in open(os.path.join(fake_root, "words.txt")))
    wnids = open(os.path.join(fake_root, "wnids.txt")).read().split()
    for row in rows:
        assert row["file"].startswith("test_")
        top5 = row["top5"].split()
        assert len(top5) == 4 and len(set(top5)) == 4 and set(top5) <= set(wnids)  # 4 classes: top-4
        assert top5[0] == row["wnid"] and row["name"] == words[row["wnid"]]
        assert 0.25 <= float(row["score"]) <= 1.0  # the top softmax probability of 4 classes


# ----------------------------------------------------------------------------- discoverability
def test_list_transforms_and_help_name_every_registered_transform_with_its_settings(capsys):
    from data.transforms import TRANSFORMS

    with pytest.raises(SystemExit) as e:
        train(["--list-transforms"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("  {name: ")]
    assert [line.split()[1].rstrip(",}") for line in lines] == sorted(TRANSFORMS.names()) and len(lines) >= 15
    assert "  {name: random_resized_crop, scale: [0.08, 1.0], ratio: [0.75, 1.3333333333333333], " in out
    assert "  {name: random_flip}\n" in out  # no settings
    assert "{name: rand_augment, num_ops: 2, magnitude: 9, num_magnitude_bins: 31, interpolation: nearest}" in out
    assert "{name: random_erasing, p: 0.5, scale: [0.02, 0.33], ratio: [0.3, 3.3], value: 0.0}" in out

    with pytest.raises(SystemExit) as e:
        train(["--help"])
    help_text = capsys.readouterr().out
    assert e.value.code == 0 and all(line in help_text.splitlines() for line in lines)  # the same list
    assert "--loss.distillation.temperature" in help_text and "--image-augmentation.mixup.off-epochs" in help_text


def test_the_log_records_versions_command_line_and_world_size(trained_run):
    import platform

    import torchvision

    log = (trained_run / "train.log").read_text()
    assert (f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}; "
            "device cpu; world size 1") in log
    (command,) = [line for line in log.splitlines() if "command line: " in line]
    assert "--common.run-label trained" in command and "--scheduler.max-epochs 2" in command


def test_tensorboard_groups_the_epoch_scalars_and_logs_every_log_interval(fake_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert train(tiny_args(fake_root, tmp_path, "tb", 1, "--common.tensorboard", "true",
                           "--common.max-batches-per-epoch", "4")) == 0
    epochs = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    epochs.Reload()
    tags = set(epochs.Tags()["scalars"])
    assert {"train/loss", "train/top1", "val/loss", "val/top1", "val/top5", "ema_val/top1", "epoch/lr"} <= tags
    assert not [t for t in tags if "/" not in t]
    steps = EventAccumulator(str(tmp_path / "tb" / "tensorboard" / "steps"))
    steps.Reload()
    assert {"train_step/loss", "train_step/lr"} <= set(steps.Tags()["scalars"])
    assert [e.step for e in steps.Scalars("train_step/loss")] == [2, 4]  # common.log_every_batches 2
    rows = [json.loads(line) for line in open(tmp_path / "tb" / "metrics.jsonl")]
    assert epochs.Scalars("val/top1")[0].value == pytest.approx(rows[0]["val_top1"])
