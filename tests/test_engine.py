"""The engine in-process on a tiny fake tree: loops, EMA, exact resume, records, resume checks, main_eval."""
import json
import math
import os

import pytest
import torch
from torch import nn

from engine import checkpoint as ckpt
from engine.build import build_trainer, setup_process
from engine.commands import evaluate, train, upgrade_checkpoint
from engine.ema import ModelEMA
from engine.loops import LoopOptions, NonFiniteLossError, Progress, optimizer_steps, train_one_epoch
from engine.run_folder import read_summary
from engine.trainer import config_changes, format_duration
from helpers import (LOGGER, REPO, assert_same_weights, child_env, ddp_command, last_state, open_trainer, read_rows,
                     tiny_args, train_in_process)
from loss_fn.cross_entropy import CrossEntropy
from options.config import load_config


# ----------------------------------------------------------------------------- loops
class _Batches:
    """A loader of fixed (images, labels) batches for train_one_epoch."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def test_accumulation_over_an_odd_number_of_batches_uses_every_gradient_once():
    torch.manual_seed(0)
    batches = [(torch.randn(4, 3, 1, 1), torch.randint(0, 2, (4,))) for _ in range(5)]
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 2, bias=False))
    start = model[1].weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    steps_asked = []
    opts = LoopOptions(device=torch.device("cpu"), accum_freq=2, log_every_batches=100)
    progress = Progress()
    train_one_epoch(model, _Batches(batches), CrossEntropy(), optimizer,
                    lambda it: steps_asked.append(it) or 1.0, progress, opts, epoch_batches=len(batches))

    # By hand: groups of 2, 2 and 1 micro-batches; each step uses the mean gradient of its group.
    weight = start.clone().requires_grad_(True)
    for group in ([0, 1], [2, 3], [4]):
        loss = sum(nn.functional.cross_entropy(batches[b][0].flatten(1) @ weight.T, batches[b][1]) for b in group)
        (grad,) = torch.autograd.grad(loss / len(group), weight)
        weight = (weight - grad).detach().requires_grad_(True)
    assert torch.allclose(model[1].weight, weight, atol=1e-6)
    assert progress.iteration == optimizer_steps(5, 2) == 3 and steps_asked == [0, 1, 2]


def test_optimizer_steps():
    assert [optimizer_steps(n, 3) for n in (1, 2, 3, 4, 6, 7)] == [1, 1, 1, 2, 2, 3]


def test_ema_update_math():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, momentum=0.25)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()(torch.randn(4, 2))  # moves BN running stats and num_batches_tracked
    ema.update()
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(ema.module.state_dict()[key], 0.75 * before[key] + 0.25 * value), key
        else:
            assert torch.equal(ema.module.state_dict()[key], value)


def test_ema_warmup_follows_the_model_first_then_settles_to_the_momentum():
    model = nn.Linear(2, 2)
    ema = ModelEMA(model, momentum=0.05, warmup=True)
    momenta = []
    for _ in range(200):
        momenta.append(ema.current_momentum())
        ema.update()
    assert momenta[0] == 1.0  # the first update copies the model
    assert momenta[7] == pytest.approx(8 ** (-2 / 3))
    assert momenta[150] == 0.05 and min(momenta) == 0.05
    assert all(a >= b for a, b in zip(momenta, momenta[1:]))
    assert ModelEMA(model, momentum=0.05).current_momentum() == 0.05  # no warmup: the paper's EMA


# ----------------------------------------------------------------------------- whole runs
def test_exact_resume_matches_uninterrupted_run(fake_root, trained_run, tmp_path):
    train_in_process(tiny_args(fake_root, tmp_path, "split"), stop_after_epoch=1)
    assert last_state(tmp_path / "split")["progress"]["epoch"] == 1
    assert train(tiny_args(fake_root, tmp_path, "split", 2, "--common.resume", "auto")) == 0

    full, split = last_state(trained_run), last_state(tmp_path / "split")  # the same run, uninterrupted
    assert_same_weights(full["model"], split["model"])
    assert_same_weights(full["ema"]["module"], split["ema"]["module"])
    assert read_rows(trained_run) == read_rows(tmp_path / "split")
    summary = read_summary(str(tmp_path / "split"))
    assert summary["state"] == "finished" and summary["epochs_done"] == 2 and summary["resumes"] == 1


def test_run_folder_contents_closing_block_and_refusal_to_clobber(fake_root, tmp_path, capsys):
    assert train(tiny_args(fake_root, tmp_path, "r", 1)) == 0
    run_dir = tmp_path / "r"
    for name in ("config.yaml", "metrics.jsonl", "train.log", "summary.json",
                 "checkpoint_last.pt", "checkpoint_best.pt", "checkpoint_ema_best.pt"):
        assert (run_dir / name).is_file(), name
    assert not [n for n in os.listdir(run_dir) if n.endswith(".tmp")]
    (row,) = read_rows(run_dir)
    for key in ("epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "ema_val_top1"):
        assert key in row
    assert row["val_images"] == 4 * 4  # fake_root: 4 classes x 4 val images, each seen once
    out = capsys.readouterr().out
    assert f"run folder: {run_dir}" in out and "run finished: 1/1 epochs" in out
    assert f"--model.checkpoint {run_dir / 'checkpoint_best.pt'}" in out

    assert train(tiny_args(fake_root, tmp_path, "r", 1)) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_relaunching_a_finished_run_reports_it(fake_root, tmp_path, capsys):
    args = tiny_args(fake_root, tmp_path, "done", 1, "--common.resume", "auto")
    assert train(args) == 0
    rows = read_rows(tmp_path / "done")
    capsys.readouterr()
    assert train(args) == 0
    out = capsys.readouterr().out
    assert "run already finished: 1/1 epochs" in out and str(tmp_path / "done") in out
    assert "resumed" not in out and read_rows(tmp_path / "done") == rows


class NaNLoss(nn.Module):
    def forward(self, logits, targets, images):
        return logits.sum() * float("nan")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(fake_root, tmp_path):
    trainer, folder = open_trainer(tiny_args(fake_root, tmp_path, "nan", 2))
    trainer.run(folder, stop_after_epoch=1)
    last = tmp_path / "nan" / "checkpoint_last.pt"
    good = last.read_bytes()
    trainer.parts.criterion = NaNLoss()
    with pytest.raises(NonFiniteLossError, match="still holds the last good epoch"):
        trainer.run(folder)
    folder.close(LOGGER)
    assert last.read_bytes() == good
    summary = read_summary(str(tmp_path / "nan"))
    assert summary["state"] == "failed" and not summary["finished"] and "NaN" in summary["error"]


def test_non_finite_loss_before_any_checkpoint_says_so(fake_root, tmp_path):
    trainer, folder = open_trainer(tiny_args(fake_root, tmp_path, "nan0", 1))
    trainer.parts.criterion = NaNLoss()
    with pytest.raises(NonFiniteLossError, match="no checkpoint was written yet"):
        trainer.run(folder)
    folder.close(LOGGER)
    assert read_summary(str(tmp_path / "nan0"))["state"] == "failed"


def test_resume_refuses_a_changed_run_and_names_every_changed_key(fake_root, tmp_path, capsys):
    train_in_process(tiny_args(fake_root, tmp_path, "chg", 2), stop_after_epoch=1)
    before = (tmp_path / "chg" / "config.yaml").read_text()
    changed = tiny_args(fake_root, tmp_path, "chg", 3, "--common.resume", "auto", "--optim.name", "sgd",
                        "--dataset.workers", "0", "--common.log-every-batches", "1")
    assert train(changed) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "optim.name 'adamw' -> 'sgd'" in err and "scheduler.max_epochs 2 -> 3" in err
    assert "log_every_batches" not in err  # harmless keys pass
    assert "--common.resume-allow-changes optim.name,scheduler.max_epochs" in err
    assert (tmp_path / "chg" / "config.yaml").read_text() == before

    allowed = changed + ["--common.resume-allow-changes", "optim.name,scheduler.max_epochs"]
    assert train(allowed) == 0
    log = (tmp_path / "chg" / "train.log").read_text()
    assert "resumed from" in log and "changed: optim.name 'adamw' -> 'sgd'" in log
    assert [r["epoch"] for r in read_rows(tmp_path / "chg")] == [1, 2, 3]


def test_config_changes_ignore_harmless_keys():
    old = {"common": {"log_every_batches": 5, "seed": 0}, "dataset": {"workers": 2, "train_batch_size": 8}}
    new = {"common": {"log_every_batches": 1, "seed": 1}, "dataset": {"workers": 0, "train_batch_size": 8}}
    assert config_changes(old, new) == [("common.seed", 0, 1)]


def test_format_duration():
    assert [format_duration(s) for s in (0, 8.2, 75, 3725)] == ["0s", "9s", "1m15s", "1h02m"]


def test_the_eta_counts_the_rest_of_the_run(fake_root, tmp_path):
    trainer = train_in_process(tiny_args(fake_root, tmp_path, "eta", 5), stop_after_epoch=1)
    per_epoch = trainer.history[-1]["epoch_seconds"]
    trainer.progress.batch_in_epoch = 3  # pretend 3 of 6 batches of epoch 2 took 3 s
    import time

    eta = trainer.run_eta(epoch_batches=6, first_batch=0, started=time.perf_counter() - 3.0)
    assert eta == pytest.approx(3.0 + 3 * per_epoch, rel=0.05)


# ----------------------------------------------------------------------------- main_eval
def test_main_eval_reproduces_best_val_top1_and_writes_outputs(trained_run, tmp_path):
    run_dir = trained_run
    best = max(read_rows(run_dir), key=lambda r: r["val_top1"])
    out_json = tmp_path / "out" / "eval.json"  # a missing folder is created
    assert evaluate(["--model.checkpoint", str(run_dir / "checkpoint_best.pt"), "--eval.output-json", str(out_json),
                     "--eval.per-class", "true"]) == 0
    saved = json.loads(out_json.read_text())
    assert saved["top1"] == best["val_top1"] and saved["params"] == 817_128 - (200 - 4) * 385
    assert len(saved["per_class"]) == 4

    ema_json = tmp_path / "ema.json"
    assert evaluate(["--model.checkpoint", str(run_dir / "checkpoint_last.pt"), "--eval.ema", "true",
                     "--eval.output-json", str(ema_json)]) == 0
    assert json.loads(ema_json.read_text())["top1"] == read_rows(run_dir)[-1]["ema_val_top1"]


def test_main_eval_rejects_a_different_model_config_and_folder_outputs(trained_run, tmp_path, capsys):
    best = str(trained_run / "checkpoint_best.pt")
    for argv, words in (
        (["--common.config-file", os.path.join(REPO, "config", "mobilevit_x_small.yaml")], "model.mobilevit.mode"),
        (["--eval.output-json", str(tmp_path)], "is a folder"),
    ):
        with pytest.raises(SystemExit) as e:
            evaluate(["--model.checkpoint", best, *argv])
        assert e.value.code == 2 and words in capsys.readouterr().err


def test_main_eval_prints_the_config_it_would_evaluate_with(trained_run, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate(["--model.checkpoint", str(trained_run / "checkpoint_best.pt"), "--eval.split", "test",
                  "--print-config"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "mode: tiny" in out and "split: test" in out  # the checkpoint's config + flags


def test_fine_tune_from_a_checkpoint_keeps_matching_weights(fake_root, trained_run, tmp_path):
    source = ckpt.load(str(trained_run / "checkpoint_best.pt"))["model"]
    cfg = load_config(tiny_args(fake_root, tmp_path, "ft", 1, "--model.checkpoint",
                                str(trained_run / "checkpoint_best.pt"), "--model.num-classes", "7"))
    own = build_trainer(cfg, setup_process(cfg)).parts.model.state_dict()
    fresh = [k for k in own if own[k].shape != source[k].shape]
    assert fresh and all(k.startswith("classifier") for k in fresh)
    assert all(torch.equal(own[k], source[k]) for k in own if k not in fresh)


def test_checkpoint_of_another_version_is_refused_with_advice(tmp_path):
    path = str(tmp_path / "old.pt")
    torch.save({"version": 1, "model": {}, "config": {}}, path)
    with pytest.raises(ckpt.CheckpointError, match="format 1.*python -m engine.checkpoint --upgrade"):
        ckpt.load(path)
    torch.save({"version": ckpt.VERSION + 1, "model": {}, "config": {}}, path)
    with pytest.raises(ckpt.CheckpointError, match="newer than this version reads"):
        ckpt.load(path)


def test_schedules_end_on_their_last_value_with_variable_epoch_lengths(fake_root, tmp_path):
    args = tiny_args(fake_root, tmp_path, "vbs", 3, "--sampler.name", "variable_batch_sampler",
                     "--sampler.vbs.min-crop-size", "16", "--sampler.vbs.max-crop-size", "40",
                     "--sampler.vbs.check-scale", "8", "--sampler.vbs.max-n-scales", "4",
                     "--scheduler.is-iteration-based", "true", "--common.accum-freq", "2")
    trainer, folder = open_trainer(args)
    lengths = [trainer.parts.epoch_batches(e) for e in range(3)]
    trainer.run(folder)
    folder.close(LOGGER)
    assert len(set(lengths)) > 1  # the variable batch sampler's epochs differ in length
    assert trainer.progress.iteration == sum(optimizer_steps(n, 2) for n in lengths)
    # the LR of the last optimizer step is the schedule's final value
    assert math.isclose(trainer.parts.optimizer.param_groups[0]["lr"], trainer.cfg.scheduler.cosine.min_lr,
                        rel_tol=1e-9)


@pytest.mark.slow  # a whole run of 120 steps
def test_a_quickstart_sized_run_ends_with_its_ema_close_to_the_model(tmp_path):
    """About the quickstart's 100 optimizer steps: with the EMA warmup the average ends within a
    few points of the model (without it, it stays near chance: the initial BatchNorm statistics)."""
    from data.fake import make_fake_tinyimagenet

    root = make_fake_tinyimagenet(str(tmp_path / "tree"), classes=4, train_per_class=40, val_per_class=10,
                                  test_per_class=1, seed=0)
    assert train([
        "--common.config-file", os.path.join(REPO, "config", "quickstart.yaml"), "--dataset.root", root,
        "--sampler.crop-size", "32", "--image-augmentation.val", "[{name: resize, size: 36}, {name: center_crop, size: 32}]",
        "--dataset.train-batch-size", "16", "--dataset.val-batch-size", "40", "--dataset.workers", "0",
        "--scheduler.max-epochs", "12", "--scheduler.warmup-iterations", "10",
        "--common.results-loc", str(tmp_path), "--common.run-label", "q"]) == 0
    last = read_rows(tmp_path / "q")[-1]
    assert last["val_top1"] >= 90  # the model learnt the 4 classes (chance: 25%)
    assert last["ema_val_top1"] >= last["val_top1"] - 5


def test_a_trusted_format_1_checkpoint_upgrades_once_and_then_evaluates(trained_run, tmp_path, capsys):
    import numpy as np

    state = ckpt.load(str(trained_run / "checkpoint_best.pt"))
    old = {k: v for k, v in state.items() if k not in ("kind", "class_names")}
    old["version"] = 1
    old["config"]["common"]["log_freq"] = old["config"]["common"].pop("log_every_batches")  # 0.1's key
    del old["config"]["ema"]["warmup"]
    old["rng"] = {"numpy": np.random.get_state()}  # a Python object: weights-only loading refuses it
    path = str(tmp_path / "old.pt")
    torch.save(old, path)
    with pytest.raises(ckpt.CheckpointError, match="refused to load"):
        ckpt.load(path)

    assert upgrade_checkpoint(["--upgrade", path]) == 0
    upgraded = ckpt.load(path)
    assert upgraded["config"]["common"]["log_every_batches"] == 2 and upgraded["config"]["ema"]["warmup"] is False
    assert_same_weights(upgraded["model"], state["model"])
    assert evaluate(["--model.checkpoint", path]) == 0
    assert "top1:" in capsys.readouterr().out


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(fake_root, tmp_path):
    import subprocess

    done = subprocess.run(ddp_command(tiny_args(fake_root, tmp_path, "ddp", 1)), cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=child_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (row,) = read_rows(tmp_path / "ddp")  # only rank 0 writes
    assert row["val_images"] == 4 * 4  # shards are disjoint and complete: each image counted once
    assert row["train_images"] == 4 * 12
    assert read_summary(str(tmp_path / "ddp"))["state"] == "finished"
