"""Models: the registry, the families (MobileViT, ResNet), `check_config` and `build_model`."""
from __future__ import annotations

from torch import nn

from options.registry import Registry
from options.schema import ModelConfig

# Defined before the family modules are imported: they register into it.
MODELS: Registry = Registry("model", config_key="model.name")

from cvnets import mobilevit, resnet  # noqa: E402,F401  (registration side effect)
from cvnets.init import init_weights  # noqa: E402


def check_config(model_cfg: ModelConfig) -> None:
    """Raise ValueError, with a message starting with the config key, for a model setting that
    passes the schema's checks but cannot build (a rule between the family's own settings)."""
    MODELS.get(model_cfg.name).check_config(model_cfg)


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
