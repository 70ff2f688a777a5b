"""Experiment trackers (engine/loggers.py) on tiny runs: MLflow against a local sqlite store and
W&B in offline mode, both the real libraries; a tracker that fails; a missing package."""
import glob
import importlib.util
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest

import engine.trainer
from engine.commands import train
from engine.loggers import Logger, git_commit, read_tracker_ids
from engine.run_folder import read_metrics, read_summary
from helpers import LOGGER, REPO, child_env, ddp_command, last_state, open_trainer, tiny_args, train_in_process

mlflow = pytest.importorskip("mlflow")
wandb = pytest.importorskip("wandb")

EPOCH_METRICS = ("lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "ema_val_top1",
                 "images_per_second")


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    """A fresh sqlite tracking store; the working directory (where MLflow puts artifacts of a
    sqlite store) is the test's own folder."""
    monkeypatch.chdir(tmp_path)
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """W&B quiet, offline and writing nothing outside the test's folder."""
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    yield
    # W&B tells child processes to attach to this process's W&B service: trainers that other
    # tests start must run their own, as a user's would
    os.environ.pop("WANDB_SERVICE", None)


def mlflow_args(root, results, label, epochs, uri, *extra):
    return tiny_args(root, results, label, epochs, "--stats.mlflow.enable", "true",
                     "--stats.mlflow.tracking-uri", uri, "--stats.mlflow.experiment", "sweep-x", *extra)


def mlflow_run(uri, run_dir):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return client, client.get_run(read_tracker_ids(str(run_dir))["mlflow"]["run_id"])


def mlflow_history(client, run_id, key):
    """[(step, value)] of a metric, as MLflow holds it (every value logged, duplicates included)."""
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def assert_one_value_per_epoch(client, run_id, rows):
    for key in EPOCH_METRICS:
        expected = [(row["epoch"], pytest.approx(row[key])) for row in rows]
        assert mlflow_history(client, run_id, key) == expected, key


# ----------------------------------------------------------------------------- MLflow
def test_mlflow_holds_the_config_and_each_epoch_once_after_a_crash_and_a_resume(fake_root, tmp_path, mlflow_uri,
                                                                                monkeypatch):
    """The worst moment for a tracker: checkpoint_last.pt of epoch 2 is on disk, no record of it is."""

    class Killed(BaseException):
        """As if the process died right after the checkpoint rename."""

    real_append = engine.trainer.append_metrics

    def crash_on_second(run_dir, row):
        if row["epoch"] == 2:
            raise Killed
        real_append(run_dir, row)

    monkeypatch.setattr(engine.trainer, "append_metrics", crash_on_second)
    with pytest.raises(Killed):
        train(mlflow_args(fake_root, tmp_path, "crash", 3, mlflow_uri))
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    client, run = mlflow_run(mlflow_uri, tmp_path / "crash")
    assert [step for step, _ in mlflow_history(client, run.info.run_id, "val_top1")] == [1]

    assert train(mlflow_args(fake_root, tmp_path, "crash", 3, mlflow_uri, "--common.resume", "auto")) == 0
    client, resumed = mlflow_run(mlflow_uri, tmp_path / "crash")
    assert resumed.info.run_id == run.info.run_id  # the same MLflow run continued
    rows = read_metrics(str(tmp_path / "crash"))
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert_one_value_per_epoch(client, run.info.run_id, rows)

    # Per log interval (every 2 batches, 6 batches an epoch): each optimizer step once.
    steps = [step for step, _ in mlflow_history(client, run.info.run_id, "step/loss")]
    assert steps == list(range(2, 19, 2))
    params = resumed.data.params
    assert params["scheduler.max_epochs"] == "3" and params["model.mobilevit.mode"] == "tiny"
    assert params["optim.name"] == "adamw" and params["common.run_label"] == "crash"
    assert json.loads(params["sampler.vbs.min_crop_size"]) == 58
    assert int(params["num_parameters"]) == last_state(tmp_path / "crash")["params"]
    assert params["git_commit"] == str(git_commit())
    assert resumed.info.status == "FINISHED" and resumed.info.run_name == "crash"
    assert resumed.data.tags["state"] == "finished"
    assert client.get_experiment(resumed.info.experiment_id).name == "sweep-x"
    best = max(rows, key=lambda r: r["val_top1"])  # the earliest of ties, as the trainer picks
    assert resumed.data.metrics["best/val_top1"] == pytest.approx(best["val_top1"])
    assert resumed.data.metrics["best/epoch"] == best["epoch"]


def test_a_resume_from_an_older_checkpoint_leaves_the_mlflow_run_and_starts_a_new_one(fake_root, tmp_path, mlflow_uri,
                                                                                     caplog):
    run_dir = tmp_path / "old"
    trainer, folder = open_trainer(mlflow_args(fake_root, tmp_path, "old", 2, mlflow_uri))
    trainer.run(folder, stop_after_epoch=1)
    shutil.copy(run_dir / "checkpoint_last.pt", tmp_path / "epoch1.pt")
    trainer.run(folder)
    folder.close(LOGGER)
    client, first = mlflow_run(mlflow_uri, run_dir)
    before = mlflow_history(client, first.info.run_id, "val_top1")
    assert [step for step, _ in before] == [1, 2]

    with caplog.at_level(logging.WARNING, logger="cvnets"):
        assert train(mlflow_args(fake_root, tmp_path, "old", 2, mlflow_uri, "--common.resume",
                                 str(tmp_path / "epoch1.pt"))) == 0
    assert any("holds epochs up to 2, the checkpoint only 1" in r.getMessage() for r in caplog.records)
    client, second = mlflow_run(mlflow_uri, run_dir)
    assert second.info.run_id != first.info.run_id
    assert_one_value_per_epoch(client, second.info.run_id, read_metrics(str(run_dir)))
    assert mlflow_history(client, first.info.run_id, "val_top1") == before  # left as it was


def test_mlflow_logs_the_best_checkpoint_as_an_artifact(fake_root, tmp_path, mlflow_uri):
    assert train(mlflow_args(fake_root, tmp_path, "art", 1, mlflow_uri, "--stats.mlflow.log-checkpoint", "true")) == 0
    client, run = mlflow_run(mlflow_uri, tmp_path / "art")
    names = sorted(os.path.basename(f.path) for f in client.list_artifacts(run.info.run_id, "checkpoints"))
    assert names == ["checkpoint_best.pt", "checkpoint_ema_best.pt"]
    local = client.download_artifacts(run.info.run_id, "checkpoints/checkpoint_best.pt", str(tmp_path / "dl"))
    with open(local, "rb") as a, open(tmp_path / "art" / "checkpoint_best.pt", "rb") as b:
        assert a.read() == b.read()
    summary = json.loads(open(client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path / "dl"))).read())
    assert summary["state"] == "finished" and summary["epochs_done"] == 1


# ----------------------------------------------------------------------------- W&B offline
def wandb_records(path):
    """The protobuf records of a W&B run file: a 7-byte header (':W&B', magic, version), then
    LevelDB-log framing (32 KiB blocks; records of [crc32 4][length 2][type 1][payload],
    split FIRST/MIDDLE/LAST across blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        parts += payload
        if kind in (1, 4):  # FULL, LAST
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def wandb_run_files(run_dir):
    return sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb")))


def wandb_history(run_dir):
    """{step: {key: value}} of every history record across the run's offline files, and the list
    of epochs logged in order (one entry per history record that carries an epoch)."""
    steps, epochs, config, summary = {}, [], {}, {}
    for path in wandb_run_files(run_dir):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                values = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                          for item in record.history.item}
                steps.setdefault(record.history.step.num, []).append(values)
                if "epoch" in values:
                    epochs.append((values["epoch"], values))
            elif kind in ("config", "summary"):
                for item in getattr(record, kind).update:
                    (config if kind == "config" else summary)[item.key or "/".join(item.nested_key)] = \
                        json.loads(item.value_json)
    return steps, epochs, config, summary


def test_wandb_offline_run_files_hold_each_epoch_once_across_a_resume(fake_root, tmp_path, wandb_env):
    args = ("--stats.wandb.enable", "true", "--stats.wandb.mode", "offline", "--stats.wandb.group", "sweep-x",
            "--stats.wandb.tags", "a,b", "--stats.wandb.log-checkpoint", "true")
    import wandb

    # Each part ends as a trainer process does, with W&B's service shut down: under load its run
    # files were seen without the last epochs right after run.finish() returned, in this process.
    train_in_process(tiny_args(fake_root, tmp_path, "w", 3, *args), stop_after_epoch=1)
    wandb.teardown()
    assert train(tiny_args(fake_root, tmp_path, "w", 3, *args, "--common.resume", "auto")) == 0
    wandb.teardown()

    run_dir = tmp_path / "w"
    files = wandb_run_files(run_dir)
    run_id = read_tracker_ids(str(run_dir))["wandb"]["id"]
    assert len(files) == 2 and all(f.endswith(f"run-{run_id}.wandb") for f in files)
    steps, epochs, config, summary = wandb_history(run_dir)
    rows = read_metrics(str(run_dir))
    assert [epoch for epoch, _ in epochs] == [1, 2, 3]
    for (_, logged), row in zip(epochs, rows):
        for key in EPOCH_METRICS:
            assert logged[key] == pytest.approx(row[key]), key
    # the W&B step is the optimizer step: 6 per epoch here, step/* every 2 batches
    assert sorted(steps) == list(range(2, 19, 2))
    assert [s for s, values in sorted(steps.items()) if any("epoch" in v for v in values)] == [6, 12, 18]
    assert all(len(v) == 1 for v in steps.values())  # no step logged twice
    assert config["scheduler"]["max_epochs"] == 3 and config["num_parameters"] == last_state(run_dir)["params"]
    best = max(rows, key=lambda r: r["val_top1"])
    assert summary["state"] == "finished" and summary["epochs_done"] == 3
    assert summary["best/val_top1"] == pytest.approx(best["val_top1"]) and summary["best/epoch"] == best["epoch"]

    first = next(r.run for r in wandb_records(files[0]) if r.WhichOneof("record_type") == "run")
    assert (first.run_group, first.display_name, list(first.tags)) == ("sweep-x", "w", ["a", "b"])
    # the best checkpoints as one model artifact, logged once: when the run finished
    artifacts = [r.artifact for path in files for r in wandb_records(path) if r.WhichOneof("record_type") == "artifact"]
    assert [(a.type, sorted(c.path for c in a.manifest.contents)) for a in artifacts] == [
        ("model", ["checkpoint_best.pt", "checkpoint_ema_best.pt"])]


# ----------------------------------------------------------------------------- failures
class Recording(Logger):
    name = "recording"

    def __init__(self, calls):
        self.calls = calls

    def start(self, run):
        self.calls.append(("start", len(run.history)))

    def log_step(self, step, scalars):
        self.calls.append(("step", step, sorted(scalars)))

    def log_epoch(self, row, step):
        self.calls.append(("epoch", row["epoch"]))

    def finish(self, summary, checkpoints):
        self.calls.append(("finish", summary["state"]))


class Failing(Recording):
    name = "flaky-server"

    def log_epoch(self, row, step):
        super().log_epoch(row, step)
        raise ConnectionError("server gone\nsecond line")


def test_a_tracker_that_raises_is_switched_off_with_one_warning_and_training_goes_on(fake_root, tmp_path,
                                                                                   monkeypatch, caplog):
    good, bad = [], []
    monkeypatch.setattr(engine.trainer, "build_loggers", lambda cfg: [Failing(bad), Recording(good)])
    with caplog.at_level(logging.WARNING, logger="cvnets"):
        assert train(tiny_args(fake_root, tmp_path, "f", 2)) == 0
    warnings = [r.getMessage() for r in caplog.records if "stopped logging" in r.getMessage()]
    assert warnings == ["flaky-server stopped logging: log_epoch failed (ConnectionError: server gone); "
                        "training goes on without it"]
    assert [c for c in bad if c[0] != "step"] == [("start", 0), ("epoch", 1)]  # never called again
    assert [r["epoch"] for r in read_metrics(str(tmp_path / "f"))] == [1, 2]
    # the healthy tracker saw everything; step scalars only once per log interval (2 batches)
    assert [c for c in good if c[0] != "step"] == [("start", 0), ("epoch", 1), ("epoch", 2), ("finish", "finished")]
    assert [c[1] for c in good if c[0] == "step"] == [2, 4, 6, 8, 10, 12]
    assert {tuple(c[2]) for c in good if c[0] == "step"} == {("images_per_second", "loss", "lr", "top1", "top5")}


def test_a_finished_run_continued_in_a_new_folder_reaches_the_trackers_as_finished(fake_root, tmp_path, monkeypatch):
    assert train(tiny_args(fake_root, tmp_path, "src", 1)) == 0
    calls = []
    monkeypatch.setattr(engine.trainer, "build_loggers", lambda cfg: [Recording(calls)])
    copy = tiny_args(fake_root, tmp_path, "copy", 1, "--common.resume", str(tmp_path / "src" / "checkpoint_last.pt"))
    assert train(copy) == 0
    assert calls == [("start", 1), ("finish", "finished")]


def test_mlflow_failing_mid_run_leaves_training_to_finish(fake_root, tmp_path, mlflow_uri, monkeypatch, caplog):
    from mlflow.tracking import MlflowClient

    real = MlflowClient.log_batch

    def gone_after_params(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        if metrics:
            raise ConnectionError("Connection refused")
        return real(self, run_id, metrics=metrics, params=params, tags=tags, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", gone_after_params)
    with caplog.at_level(logging.WARNING, logger="cvnets"):
        assert train(mlflow_args(fake_root, tmp_path, "gone", 2, mlflow_uri)) == 0
    warnings = [r.getMessage() for r in caplog.records if "stopped logging" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("MLflow stopped logging: log_step failed (ConnectionError")
    assert read_summary(str(tmp_path / "gone"))["state"] == "finished"


@pytest.mark.parametrize("key, package, extra", [
    ("stats.wandb.enable", "wandb", "wandb"),
    ("stats.mlflow.enable", "mlflow", "mlflow"),
    ("common.tensorboard", "tensorboard", "tensorboard"),
])
def test_a_missing_tracker_package_is_one_line_exit_2_before_anything(fake_root, tmp_path, monkeypatch, capsys, key,
                                                                      package, extra):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    flag = "--" + key.replace("_", "-")
    with pytest.raises(SystemExit) as stop:  # refused while resolving the config, as any bad value
        train(tiny_args(fake_root, tmp_path, "miss", 1, flag, "true"))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {key}: true needs the {extra} package: pip install -e '.[{extra}]'"
    assert not (tmp_path / "miss").exists()


def test_git_commit_is_none_outside_a_checkout(tmp_path):
    assert git_commit(str(tmp_path)) is None
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True)
    assert git_commit(REPO) == (head.stdout.strip() if head.returncode == 0 else None)


# ----------------------------------------------------------------------------- kill -9
@pytest.mark.slow
def test_kill_9_then_resume_leaves_each_epoch_once_in_mlflow_and_wandb(fake_root, tmp_path, wandb_env):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [sys.executable, os.path.join(REPO, "main_train.py"),
            *mlflow_args(fake_root, tmp_path, "k", 4, uri, "--stats.wandb.enable", "true", "--stats.wandb.mode",
                         "offline", "--common.log-every-batches", "1", "--common.resume", "auto")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    env.pop("WANDB_SERVICE", None)  # its own W&B service, killed with it (see wandb_env)
    run_dir = tmp_path / "k"
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    client = MlflowClient(tracking_uri=uri)

    def epochs_in_mlflow():
        run_id = read_tracker_ids(str(run_dir)).get("mlflow", {}).get("run_id")
        return len(client.get_metric_history(run_id, "val_top1")) if run_id else 0

    deadline = time.monotonic() + 240
    while epochs_in_mlflow() < 1:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its W&B service, as a lost node would
    proc.wait()
    assert not read_summary(str(run_dir)).get("finished")

    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_metrics(str(run_dir))
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    run_id = read_tracker_ids(str(run_dir))["mlflow"]["run_id"]
    assert_one_value_per_epoch(client, run_id, rows)
    steps = [step for step, _ in mlflow_history(client, run_id, "step/loss")]
    assert steps == list(range(1, 25))  # every optimizer step once, those the killed attempt logged too
    _, epochs, _, _ = wandb_history(run_dir)
    assert [epoch for epoch, _ in epochs] == [1, 2, 3, 4], (wandb_run_files(run_dir), done.stdout[-3000:])


# ----------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_under_ddp_only_rank_0_logs_one_mlflow_run(fake_root, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run(ddp_command(mlflow_args(fake_root, tmp_path, "ddp", 2, uri)), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=child_env(PYTHONPATH=REPO))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("sweep-x").experiment_id])
    assert_one_value_per_epoch(client, run.info.run_id, read_metrics(str(tmp_path / "ddp")))
