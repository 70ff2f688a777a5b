"""Exponential moving average of a model's weights, with ml-cvnets' semantics plus an optional warmup.

After every optimizer step: ema = (1 - m) * ema + m * model, for every floating-point entry of
the state dict (parameters *and* BatchNorm running statistics); integer buffers such as
num_batches_tracked are copied.

With warmup the momentum of update t (from 0) is max(momentum, (1 + t) ** -2/3), timm's EMA
warmup: the average follows the model closely at first and settles to the configured momentum
(0.0005 reaches it after about 90,000 steps, 0.05 after about 90). Without it, a short run's
average stays close to the initial weights and, above all, to their initial BatchNorm
statistics, and scores near chance. The paper's runs (ml-cvnets) had no warmup.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Mapping

import torch
from torch import nn

WARMUP_POWER = 2.0 / 3.0


class ModelEMA:
    def __init__(self, model: nn.Module, momentum: float, warmup: bool = False) -> None:
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"ema.momentum must be in (0, 1], got {momentum}")
        self.momentum, self.warmup = momentum, warmup
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        # Pair up tensors once; state_dict() of both modules lists them in the same order.
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))
        self._float = [(e, m) for e, m in pairs if e.is_floating_point()]
        self._other = [(e, m) for e, m in pairs if not e.is_floating_point()]

    def current_momentum(self) -> float:
        """The momentum the next update uses."""
        if not self.warmup:
            return self.momentum
        return max(self.momentum, (1.0 + self.updates) ** -WARMUP_POWER)

    @torch.no_grad()
    def update(self) -> None:
        """Move the average one step toward the model it was created from."""
        if self._float:
            ema, model = zip(*self._float)
            torch._foreach_lerp_(list(ema), list(model), self.current_momentum())
        for e, m in self._other:
            e.copy_(m)
        self.updates += 1

    def state_dict(self) -> Dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
