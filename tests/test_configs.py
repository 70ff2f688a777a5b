"""Every YAML under config/ passes the up-front checks (fast), and builds its whole pipeline and
takes one training step on a real batch of its own data pipeline (slow: every model at full size)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import cvnets
import data
import optim
from engine.build import build_criterion
from helpers import fake_wnids, write_teacher
from options.config import load_config, override

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))


def test_config_folder_is_found():
    assert len(CONFIGS) >= 30


def up_front_checked(path: Path):
    """The config of `path` after the checks the front door runs before touching data or model."""
    cfg = load_config(["--common.config-file", str(path)])
    cvnets.check_config(cfg.model)
    data.check_config(cfg)
    optim.check_config(cfg)
    return cfg


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_config_passes_the_up_front_checks(path):
    assert up_front_checked(path).common.config_file == str(path)


@pytest.mark.slow  # every model at its full size, ResNet-50 included
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_config_builds_and_trains_one_step(path, fake_root, tmp_path):
    torch.manual_seed(0)
    cfg = up_front_checked(path)
    # The row's own settings on a small fake tree: a few images per batch, no worker processes.
    cfg = override(cfg, {"dataset.root": fake_root, "dataset.fake.enable": False, "dataset.cache": "none",
                         "dataset.workers": 0, "dataset.train_batch_size": 2, "dataset.val_batch_size": 2,
                         "common.device": "cpu"})
    if cfg.loss.name == "distillation":  # its teacher is a run of its own: stand in an untrained one
        teacher = write_teacher(tmp_path / "teacher.pt", fake_wnids(fake_root))
        cfg = override(cfg, {"loss.distillation.teacher": teacher})
    loaders = data.build_loaders(cfg)
    loaders.train.batch_sampler.set_epoch(0)
    images, targets = next(iter(loaders.train))
    assert images.dtype == torch.float32 and images.shape[:2] == (len(targets), 3)

    model = cvnets.build_model(cfg.model, loaders.num_classes)
    criterion, _ = build_criterion(cfg, loaders.wnids, torch.device("cpu"))
    optimizer = optim.build_optimizer(model, cfg.optim)
    scheduler = optim.build_scheduler(cfg.scheduler, total_iterations=cfg.scheduler.max_epochs * len(loaders.train))
    for group in optimizer.param_groups:
        group["lr"] = scheduler.lr(0, 1)
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    loss = criterion(model(images), targets, images)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))

    model.eval()
    val_images, _ = next(iter(loaders.val))
    with torch.no_grad():
        assert model(val_images).shape == (len(val_images), loaders.num_classes)
