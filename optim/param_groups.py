"""Optimizer parameter groups: weight decay on matrices only, and a membership check."""
from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List, Sequence

from torch import nn

ParamGroups = List[Dict[str, Any]]


def param_groups(model: nn.Module, weight_decay: float, no_decay_1d: bool = False) -> ParamGroups:
    """The trainable parameters of `model` as optimizer groups.

    With `no_decay_1d`, every parameter of fewer than two dimensions (norm weights and
    biases, all biases, scalars) goes into a second group without weight decay: decaying
    them pulls normalisation scales toward zero without regularising any mapping.
    Frozen parameters (requires_grad False) are left out; empty groups are dropped.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    skip_decay = [no_decay_1d and p.ndim < 2 for p in trainable]
    groups = [
        {"params": [p for p, skip in zip(trainable, skip_decay) if not skip], "weight_decay": weight_decay},
        {"params": [p for p, skip in zip(trainable, skip_decay) if skip], "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def check_param_groups(model: nn.Module, groups: ParamGroups) -> None:
    """Raise ValueError unless each trainable parameter of `model` is in exactly one group.

    Also rejects frozen parameters and tensors that are not parameters of `model`.
    """
    named = list(model.named_parameters())
    trainable = {id(p): name for name, p in named if p.requires_grad}
    everything = {id(p): name for name, p in named}
    seen = Counter(id(p) for group in groups for p in group["params"])

    problems = []
    twice = [everything.get(key, "<unnamed>") for key, count in seen.items() if count > 1]
    if twice:
        problems.append(f"in more than one group: {_listing(twice)}")
    missing = [name for key, name in trainable.items() if key not in seen]
    if missing:
        problems.append(f"in no group: {_listing(missing)}")
    stray = [everything.get(key, "<not in the model>") for key in seen if key not in trainable]
    if stray:
        problems.append(f"frozen or not in the model: {_listing(stray)}")
    if problems:
        raise ValueError("optimizer parameter groups are wrong: parameters " + "; ".join(problems))


def _listing(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"
