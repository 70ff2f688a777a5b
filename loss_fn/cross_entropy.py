"""Cross entropy with label smoothing while training."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from loss_fn.registry import LOSSES
from options.schema import LossConfig


@LOSSES.register("cross_entropy")
class CrossEntropy(nn.Module):
    """Cross entropy of class logits [B, C].

    Targets are class indices [B] (int64) or class probabilities [B, C] (mixup, cutmix).
    Label smoothing applies in train mode only, so the validation loss is the plain cross
    entropy and stays comparable across recipes with different smoothing.
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    @classmethod
    def from_config(cls, cfg: LossConfig, teacher: Optional[nn.Module] = None) -> "CrossEntropy":
        return cls(cfg.label_smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                images: Optional[torch.Tensor] = None) -> torch.Tensor:
        smoothing = self.label_smoothing if self.training else 0.0
        return F.cross_entropy(logits, target, label_smoothing=smoothing)

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}"
