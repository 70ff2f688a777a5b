"""Models: the registry, the families (MobileViT, ResNet) and `build_model`."""
from __future__ import annotations

from torch import nn

from options.registry import Registry
from options.schema import ModelConfig

# Defined before the family modules are imported: they register into it.
MODELS: Registry = Registry("model")

from cvnets import mobilevit, resnet  # noqa: E402,F401  (registration side effect)
from cvnets.init import init_weights  # noqa: E402


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The model `cfg.name` selects, initialised per `cfg.init`.

    `num_classes` (usually the dataset's) is used unless `cfg.num_classes` is set.
    """
    model_cls = MODELS.get(cfg.name)
    model = model_cls.from_config(cfg, cfg.num_classes if cfg.num_classes is not None else num_classes)
    init_weights(model, cfg.init, model_cls.linear_init)
    return model


__all__ = ["MODELS", "build_model"]
