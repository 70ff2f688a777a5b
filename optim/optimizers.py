"""Optimizers, looked up by name in OPTIMIZERS (``optim.name``).

Each entry is a typed function ``(params, lr, weight_decay, **its settings) -> Optimizer``
whose settings are the fields of the config block named after it (``optim.sgd``,
``optim.adamw``, ...). ``create_optimizer`` is the typed entry point; ``build_optimizer``
only unpacks the config into it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.optim import Optimizer

from optim.param_groups import ParamGroups, check_param_groups, param_groups
from options.registry import Registry
from options.schema import OptimConfig

OPTIMIZERS: Registry[Callable[..., Optimizer]] = Registry("optimizer", config_key="optim.name")

# The engine writes the scheduler's lr into every group before each step; 0 until then
# means a forgotten update shows up as a model that does not train, not as a wrong lr.
INITIAL_LR = 0.0


@OPTIMIZERS.register("sgd")
def sgd(params: ParamGroups, lr: float, weight_decay: float, momentum: float, nesterov: bool) -> Optimizer:
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov)


def _adam_family(torch_cls: Callable[..., Optimizer]) -> Callable[..., Optimizer]:
    def build(
        params: ParamGroups, lr: float, weight_decay: float, betas: Sequence[float], eps: float, amsgrad: bool
    ) -> Optimizer:
        beta1, beta2 = betas  # torch wants a tuple; the config holds exactly two (options/schema.py checks it)
        return torch_cls(params, lr=lr, weight_decay=weight_decay, betas=(float(beta1), float(beta2)), eps=eps,
                         amsgrad=amsgrad)

    return build


# Adam adds weight decay to the gradient (L2 penalty), scaled by the adaptive step; AdamW decays
# the weights directly (decoupled), independent of the gradient scale.
adam = OPTIMIZERS.register("adam")(_adam_family(torch.optim.Adam))
adamw = OPTIMIZERS.register("adamw")(_adam_family(torch.optim.AdamW))


def create_optimizer(
    model: nn.Module,
    name: str,
    lr: float = INITIAL_LR,
    weight_decay: float = 0.0,
    no_decay_bn_filter_bias: bool = False,
    **settings: Any,
) -> Optimizer:
    """The optimizer `name` over the trainable parameters of `model`.

    `settings` are the optimizer's own keywords (momentum, betas, ...). With
    `no_decay_bn_filter_bias`, 1-D parameters get no weight decay (see param_groups).
    """
    build = OPTIMIZERS.get(name)
    groups = param_groups(model, weight_decay, no_decay_bn_filter_bias)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters to optimize")
    check_param_groups(model, groups)
    return build(groups, lr=lr, weight_decay=weight_decay, **settings)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> Optimizer:
    """create_optimizer from the `optim` section; settings come from the block named after optim.name."""
    OPTIMIZERS.get(cfg.name)  # an unknown name fails here, listing the known ones, before its block is read
    settings = dataclasses.asdict(getattr(cfg, cfg.name))
    return create_optimizer(
        model, cfg.name, weight_decay=cfg.weight_decay, no_decay_bn_filter_bias=cfg.no_decay_bn_filter_bias, **settings
    )
