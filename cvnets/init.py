"""Weight initialisation driven by `model.init` (options.schema.InitConfig).

Convs: the configured scheme on the weight, bias 0. Linears: the configured scheme, or the
model family's default (`StagedClassifier.linear_init`) where the config says null, bias 0.
Norm layers: weight 1, bias 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

from torch import Tensor, nn

from options.schema import InitConfig

# Std of the `normal` conv init; a small fixed std like the linear default (ml-cvnets uses 0.01 too).
CONV_NORMAL_STD = 0.01

_NORMS = (nn.BatchNorm2d, nn.BatchNorm1d, nn.LayerNorm, nn.GroupNorm, nn.SyncBatchNorm)


@dataclass(frozen=True)
class LinearInit:
    """A model family's default linear-layer init: scheme name and std."""

    kind: str
    std: float


def _trunc_normal(weight: Tensor, std: float) -> None:
    # The paper's code calls trunc_normal_(std=0.02) with the default absolute bounds (-2, 2),
    # 100 standard deviations away: in effect an untruncated normal, and the std the runs had.
    nn.init.trunc_normal_(weight, std=std)


_CONV_INITS: Dict[str, Callable[[Tensor], None]] = {
    "kaiming_normal": lambda w: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"),
    "kaiming_uniform": lambda w: nn.init.kaiming_uniform_(w, mode="fan_out", nonlinearity="relu"),
    "xavier_uniform": nn.init.xavier_uniform_,
    "normal": lambda w: nn.init.normal_(w, std=CONV_NORMAL_STD),
}

_LINEAR_INITS: Dict[str, Callable[[Tensor, float], None]] = {
    "trunc_normal": _trunc_normal,
    "normal": lambda w, std: nn.init.normal_(w, std=std),
    "xavier_uniform": lambda w, std: nn.init.xavier_uniform_(w),
}


def _zero_bias(module: nn.Module) -> None:
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


def init_weights(model: nn.Module, cfg: InitConfig, default: LinearInit) -> None:
    """Initialise every conv, linear and norm layer of `model` in place."""
    init_conv = _CONV_INITS[cfg.conv]
    init_linear = _LINEAR_INITS[cfg.linear or default.kind]
    linear_std = cfg.linear_std if cfg.linear_std is not None else default.std
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            init_conv(module.weight)
            _zero_bias(module)
        elif isinstance(module, nn.Linear):
            init_linear(module.weight, linear_std)
            _zero_bias(module)
        elif isinstance(module, _NORMS) and module.weight is not None:
            nn.init.ones_(module.weight)
            _zero_bias(module)
