"""Every YAML under config/ loads, builds its whole pipeline and takes one training step."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import cvnets
import loss_fn
import optim
from data.transforms import build_pipeline
from options.config import load_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))


def test_config_folder_is_found():
    assert len(CONFIGS) >= 30


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_config_builds_and_trains_one_step(path):
    torch.manual_seed(0)
    cfg = load_config(["--common.config-file", str(path)])
    crop = cfg.sampler.crop_size
    train_tf = build_pipeline(cfg.image_augmentation.train, "image_augmentation.train")
    val_tf = build_pipeline(cfg.image_augmentation.val, "image_augmentation.val")
    raw = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    images = torch.stack([train_tf(img, crop) for img in raw]).float() / 255
    assert images.shape == (2, 3, crop, crop)
    assert val_tf(raw[0], crop).shape == (3, crop, crop)

    model = cvnets.build_model(cfg.model, 200)
    criterion = loss_fn.build_loss(cfg.loss)
    optimizer = optim.build_optimizer(model, cfg.optim)
    scheduler = optim.build_scheduler(cfg.scheduler, iterations_per_epoch=100)
    for group in optimizer.param_groups:
        group["lr"] = scheduler.lr(0, 1)
    before = [p.detach().clone() for p in model.parameters()]
    loss = criterion(model(images), torch.tensor([3, 7]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
