"""The loss registry and its builder from the `loss` config section.

A loss is an nn.Module called as ``loss(logits, targets, images)``: logits [B, C] of the
model, targets class indices [B] or probabilities [B, C] (mixup, cutmix), and images the
batch the model saw (losses that run another model on it, such as distillation, need it;
the others ignore it). Each registered class builds itself with
``from_config(cfg: LossConfig, teacher)``; teacher is the frozen model distillation learns
from (engine/teacher.py loads it), None for every other loss.
"""
from __future__ import annotations

from typing import Optional, Type

from torch import nn

from options.registry import Registry
from options.schema import LossConfig

LOSSES: Registry[Type[nn.Module]] = Registry("loss", config_key="loss.name")


def build_loss(cfg: LossConfig, teacher: Optional[nn.Module] = None) -> nn.Module:
    """The loss named by ``cfg.name``; an unknown name raises, listing the known ones."""
    return LOSSES.get(cfg.name).from_config(cfg, teacher)
