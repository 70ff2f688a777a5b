"""Losses, looked up by name in LOSSES (``loss.name``)."""
from loss_fn.registry import LOSSES, build_loss
from loss_fn import cross_entropy  # noqa: F401  (registers cross_entropy)

__all__ = ["LOSSES", "build_loss"]
