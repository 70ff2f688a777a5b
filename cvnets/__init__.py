"""Models: the registry, the families (MobileViT, ResNet), `check_config` and `build_model`."""
from __future__ import annotations

import math

from torch import nn

from options.registry import Registry, RegistryError
from options.schema import ModelConfig

# Defined before the family modules are imported: they register into it.
MODELS: Registry = Registry("model", config_key="model.name")

from cvnets import mobilevit, resnet  # noqa: E402,F401  (registration side effect)
from cvnets.init import init_weights  # noqa: E402
from cvnets.layers import check_dropout  # noqa: E402


def check_config(model_cfg: ModelConfig) -> None:
    """Raise ValueError, with a message starting with the config key, for every model setting
    that cannot build; builds nothing (cheap enough to run before any data is touched)."""
    try:
        model_cls = MODELS.get(model_cfg.name)
    except RegistryError as e:
        raise ValueError(f"model.name: {e}") from None
    if model_cfg.num_classes is not None and model_cfg.num_classes < 1:
        raise ValueError(f"model.num_classes: {model_cfg.num_classes} must be >= 1 (or null: the dataset's)")
    check_dropout("model.classifier_dropout", model_cfg.classifier_dropout)
    std = model_cfg.init.linear_std
    if std is not None and not (math.isfinite(std) and std >= 0):
        raise ValueError(f"model.init.linear_std: {std} must be a finite number >= 0 (or null: the family's)")
    model_cls.check_config(model_cfg)


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The model `cfg.name` selects, initialised per `cfg.init`.

    `num_classes` (usually the dataset's) is used unless `cfg.num_classes` is set.
    Settings that cannot build raise ValueError (see check_config).
    """
    check_config(cfg)
    classes = cfg.num_classes if cfg.num_classes is not None else num_classes
    if classes < 1:
        raise ValueError(f"num_classes: {classes} must be >= 1")
    model_cls = MODELS.get(cfg.name)
    model = model_cls.from_config(cfg, classes)
    init_weights(model, cfg.init, model_cls.linear_init)
    return model


__all__ = ["MODELS", "build_model", "check_config"]
