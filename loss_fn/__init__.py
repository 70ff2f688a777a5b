"""Losses, looked up by name in LOSSES (``loss.name``); called as loss(logits, targets, images)."""
from loss_fn.registry import LOSSES, build_loss
from loss_fn import cross_entropy, distillation  # noqa: F401  (register cross_entropy, distillation)

__all__ = ["LOSSES", "build_loss"]
