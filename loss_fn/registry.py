"""The loss registry and its builder from the `loss` config section."""
from __future__ import annotations

from typing import Callable

from torch import nn

from options.registry import Registry
from options.schema import LossConfig

LOSSES: Registry[Callable[..., nn.Module]] = Registry("loss", config_key="loss.name")


def build_loss(cfg: LossConfig) -> nn.Module:
    """The loss named by ``cfg.name``; an unknown name raises, listing the known ones."""
    return LOSSES.get(cfg.name)(label_smoothing=cfg.label_smoothing)
