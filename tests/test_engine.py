"""The engine end to end on a tiny fake tree: exact resume, signals, NaN handling, DDP, main_eval."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import main_eval
import main_train
from engine.ema import ModelEMA
from engine.loops import NonFiniteLossError
from engine.trainer import load_checkpoint
from options.config import ConfigError, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = {"images_per_second", "epoch_seconds"}


def tiny_args(root, results, label="run", epochs=2, *extra):
    """A MobileViT-Tiny run small enough for a unit test: 32 px crops, batches of 8."""
    return [
        "--common.config-file", os.path.join(REPO, "config", "mobilevit_tiny.yaml"),
        "--dataset.root", str(root),
        "--dataset.workers", "0",
        "--dataset.train-batch-size", "8",
        "--dataset.val-batch-size", "8",
        "--sampler.crop-size", "32",
        "--image-augmentation.val", "[{name: resize, size: 36}, {name: center_crop, size: 32}]",
        "--scheduler.max-epochs", str(epochs),
        "--scheduler.warmup-iterations", "3",
        "--ema.enable", "true",
        "--ema.momentum", "0.1",
        "--common.results-loc", str(results),
        "--common.run-label", label,
        "--common.log-freq", "2",
        *extra,
    ]


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in f]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_ema_update_math():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, momentum=0.25)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()(torch.randn(4, 2))  # moves BN running stats and num_batches_tracked
    ema.update()
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            expected = 0.75 * before[key] + 0.25 * value
            assert torch.allclose(ema.state_dict()[key], expected), key
        else:
            assert torch.equal(ema.state_dict()[key], value)


def test_exact_resume_matches_uninterrupted_run(fake_root, tmp_path):
    full = main_train.main(tiny_args(fake_root, tmp_path, "full"))

    cfg = load_config(tiny_args(fake_root, tmp_path, "split"))
    main_train.build_trainer(cfg).run(stop_after_epoch=1)
    assert load_checkpoint(os.path.join(tmp_path, "split", "checkpoint_last.pt"))["epoch"] == 1
    split = main_train.main(tiny_args(fake_root, tmp_path, "split", 2, "--common.resume", "auto"))

    assert_same_weights(load_checkpoint(os.path.join(full, "checkpoint_last.pt"))["model"],
                        load_checkpoint(os.path.join(split, "checkpoint_last.pt"))["model"])
    assert_same_weights(load_checkpoint(os.path.join(full, "checkpoint_last.pt"))["ema"],
                        load_checkpoint(os.path.join(split, "checkpoint_last.pt"))["ema"])
    assert read_metrics(full) == read_metrics(split)
    summary = json.load(open(os.path.join(split, "summary.json")))
    assert summary["finished"] and summary["epochs_done"] == 2


def test_run_folder_contents_and_refusal_to_clobber(fake_root, tmp_path):
    run_dir = main_train.main(tiny_args(fake_root, tmp_path, "r", 1))
    for name in ("config.yaml", "metrics.jsonl", "train.log", "summary.json",
                 "checkpoint_last.pt", "checkpoint_best.pt", "checkpoint_ema_best.pt"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    assert not [n for n in os.listdir(run_dir) if n.endswith(".tmp")]
    (row,) = read_metrics(run_dir)
    for key in ("epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "ema_val_top1"):
        assert key in row
    assert row["val_images"] == 4 * 4  # fake_root: 4 classes x 4 val images, each seen once
    with pytest.raises(SystemExit) as e:
        main_train.main(tiny_args(fake_root, tmp_path, "r", 1))
    assert e.value.code == 2


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(fake_root, tmp_path):
    cfg = load_config(tiny_args(fake_root, tmp_path, "nan", 2))
    trainer = main_train.build_trainer(cfg)
    trainer.run(stop_after_epoch=1)
    last = os.path.join(trainer.run_dir, "checkpoint_last.pt")
    good = open(last, "rb").read()

    class NaNLoss(nn.Module):
        def forward(self, logits, targets):
            return logits.sum() * float("nan")

    trainer.parts.criterion = NaNLoss()
    with pytest.raises(NonFiniteLossError, match="NaN"):
        trainer.run()
    assert open(last, "rb").read() == good


def test_sigterm_mid_epoch_saves_and_resume_finishes(fake_root, tmp_path):
    args = tiny_args(fake_root, tmp_path, "sig", 2, "--common.log-freq", "1", "--dataset.train-batch-size", "2")
    cmd = [sys.executable, "main_train.py", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "batch 3:" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, "".join(seen) + rest
    state = load_checkpoint(os.path.join(tmp_path, "sig", "checkpoint_last.pt"))
    assert state["epoch"] == 0 and state["batch_in_epoch"] >= 3

    done = subprocess.run(cmd + ["--common.resume", "auto"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = read_metrics(os.path.join(tmp_path, "sig"))
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0]["train_images"] == 4 * 12  # the interrupted epoch still covers every training image once


def test_main_eval_reproduces_best_val_top1_and_writes_outputs(fake_root, tmp_path):
    run_dir = main_train.main(tiny_args(fake_root, tmp_path, "ev", 2))
    best = max(read_metrics(run_dir), key=lambda r: r["val_top1"])
    out_json = tmp_path / "eval.json"
    result = main_eval.main(["--model.checkpoint", os.path.join(run_dir, "checkpoint_best.pt"),
                             "--eval.output-json", str(out_json), "--eval.per-class", "true"])
    assert result["top1"] == best["val_top1"]
    saved = json.load(open(out_json))
    assert saved["top1"] == best["val_top1"] and saved["params"] == 817_128 - (200 - 4) * 385
    assert len(saved["per_class"]) == 4

    ema = main_eval.main(["--model.checkpoint", os.path.join(run_dir, "checkpoint_last.pt"), "--eval.ema", "true"])
    assert ema["top1"] == read_metrics(run_dir)[-1]["ema_val_top1"]

    csv_path = tmp_path / "pred.csv"
    main_eval.main(["--model.checkpoint", os.path.join(run_dir, "checkpoint_best.pt"), "--eval.split", "test",
                    "--eval.predictions-csv", str(csv_path)])
    rows = list(csv.reader(open(csv_path)))
    assert rows[0] == ["file", "wnid"] and len(rows) == 1 + 4 * 2
    wnids = open(os.path.join(fake_root, "wnids.txt")).read().split()
    assert all(r[0].startswith("test_") and r[1] in wnids for r in rows[1:])


def test_main_eval_rejects_a_different_model_config(fake_root, tmp_path):
    run_dir = main_train.main(tiny_args(fake_root, tmp_path, "mm", 1))
    with pytest.raises(ConfigError, match="model.mobilevit.mode"):
        main_eval.load_eval_config(["--model.checkpoint", os.path.join(run_dir, "checkpoint_best.pt"),
                                    "--common.config-file", os.path.join(REPO, "config", "mobilevit_x_small.yaml")])


def test_ddp_two_processes_on_cpu(fake_root, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "main_train.py", *tiny_args(fake_root, tmp_path, "ddp", 1)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = read_metrics(os.path.join(tmp_path, "ddp"))
    assert len(rows) == 1  # only rank 0 writes
    assert rows[0]["val_images"] == 4 * 4  # shards are disjoint and complete: each image counted once
    assert rows[0]["train_images"] == 4 * 12


def test_fine_tune_from_a_checkpoint_keeps_matching_weights(fake_root, tmp_path):
    run_dir = main_train.main(tiny_args(fake_root, tmp_path, "pre", 1))
    source = load_checkpoint(os.path.join(run_dir, "checkpoint_best.pt"))["model"]
    cfg = load_config(tiny_args(fake_root, tmp_path, "ft", 1, "--model.checkpoint",
                                os.path.join(run_dir, "checkpoint_best.pt"), "--model.num-classes", "7"))
    model = main_train.build_trainer(cfg).parts.model
    own = model.state_dict()
    fresh = [k for k in own if own[k].shape != source[k].shape]
    assert fresh and all(k.startswith("classifier") for k in fresh)
    assert all(torch.equal(own[k], source[k]) for k in own if k not in fresh)
