"""Small pieces the engine shares: distributed context, device choice, seeding, metrics."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist



# ----------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op for one process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """auto|cpu|cuda -> the device (the local rank's GPU under torchrun)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("common.device: 'cuda' was asked for but no CUDA device is available; use auto or cpu")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


# ----------------------------------------------------------------------------- RNG
def seed_everything(seed: int) -> None:
    """Seed every global generator a run or a library it calls may use (once per process)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- metrics
class Meter:
    """Loss and top-1/top-5 sums kept on the device, so the hot loop never waits on the host.

    Targets may be class indices [B] or soft labels [B, C] (mixup), scored by their argmax.
    """

    def __init__(self, device: torch.device) -> None:
        # [loss_sum, correct_top1, correct_top5, count]
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor) -> None:
        labels = targets.argmax(dim=1) if targets.ndim == 2 else targets
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices  # [B, k]
        hits = top.eq(labels[:, None])
        n = labels.shape[0]
        batch = torch.stack([loss.detach().double() * n, hits[:, 0].sum().double(), hits.any(dim=1).sum().double()])
        self.sums[:3] += batch
        self.sums[3] += n

    def compute(self, info: Optional[DistInfo] = None) -> Dict[str, float]:
        """Totals over all ranks: loss (mean), top1 and top5 (percent), count. One host sync."""
        sums = self.sums.clone()
        if info is not None:
            all_reduce_sum(sums, info)
        loss, top1, top5, count = sums.tolist()
        count = max(count, 1.0)
        return {"loss": loss / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count, "count": int(count)}

    def state_dict(self) -> Dict[str, Any]:
        return {"sums": self.sums.cpu()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sums.copy_(state["sums"])


def flatten(data: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """A nested mapping as one level of dotted keys: {"optim": {"name": "sgd"}} -> {"optim.name": "sgd"}."""
    flat: Dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
