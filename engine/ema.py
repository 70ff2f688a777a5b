"""Exponential moving average of a model's weights, with ml-cvnets' semantics.

After every optimizer step: ema = (1 - momentum) * ema + momentum * model, for every
floating-point entry of the state dict (parameters *and* BatchNorm running statistics);
integer buffers such as num_batches_tracked are copied.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Mapping

import torch
from torch import nn


class ModelEMA:
    def __init__(self, model: nn.Module, momentum: float) -> None:
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"ema.momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        # Pair up tensors once; state_dict() of both modules lists them in the same order.
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))
        self._float = [(e, m) for e, m in pairs if e.is_floating_point()]
        self._other = [(e, m) for e, m in pairs if not e.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        """Move the average one step toward the model it was created from."""
        if self._float:
            ema, model = zip(*self._float)
            torch._foreach_lerp_(list(ema), list(model), self.momentum)
        for e, m in self._other:
            e.copy_(m)

    def state_dict(self) -> Dict[str, Any]:
        return self.module.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state)
