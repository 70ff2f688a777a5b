"""ResNet-18/34/50 with a choice of stem (the paper's cvnets stem, torchvision's, or CIFAR's)."""
from __future__ import annotations

from typing import Callable, ClassVar, Dict, Tuple, Type

from torch import Tensor, nn

from cvnets import MODELS
from cvnets.init import LinearInit
from cvnets.layers import ConvNormAct, StagedClassifier
from options.schema import ResNetConfig

STEM_CHANNELS = 64
STAGE_WIDTHS = (64, 128, 256, 512)


def _relu() -> nn.Module:
    return nn.ReLU(inplace=True)


class ResidualBlock(nn.Module):
    """ReLU(branch(x) + shortcut(x)); subclasses define the branch and the width expansion."""

    expansion: ClassVar[int] = 1

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        self.residual = self.branch(in_channels, width, stride)
        self.shortcut = _shortcut(in_channels, width * self.expansion, stride)
        self.act = _relu()

    @classmethod
    def branch(cls, in_channels: int, width: int, stride: int) -> nn.Sequential:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.residual(x) + self.shortcut(x))


class BasicBlock(ResidualBlock):
    """Two 3x3 convs, the first one strided."""

    @classmethod
    def branch(cls, in_channels: int, width: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            ConvNormAct(in_channels, width, 3, stride=stride, act=_relu), ConvNormAct(width, width, 3, act=None)
        )


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3 (strided), 1x1 expand to 4x the width."""

    expansion: ClassVar[int] = 4

    @classmethod
    def branch(cls, in_channels: int, width: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            ConvNormAct(in_channels, width, 1, act=_relu),
            ConvNormAct(width, width, 3, stride=stride, act=_relu),
            ConvNormAct(width, width * cls.expansion, 1, act=None),
        )


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity, or a 1x1 conv + BN where the block changes the shape."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return ConvNormAct(in_channels, out_channels, 1, stride=stride, act=None)


# depth -> (block, blocks per stage)
DEPTHS: Dict[int, Tuple[Type[ResidualBlock], Tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
}

# stem name -> builder of a module mapping 3 channels to STEM_CHANNELS
STEMS: Dict[str, Callable[[], nn.Module]] = {
    # The paper's code: a stride-2 depthwise conv takes the place of the max-pool (4x down).
    "cvnets": lambda: nn.Sequential(
        ConvNormAct(3, STEM_CHANNELS, 3, stride=2, act=_relu),
        ConvNormAct(STEM_CHANNELS, STEM_CHANNELS, 3, stride=2, groups=STEM_CHANNELS, act=_relu),
    ),
    # torchvision's ImageNet stem (4x down).
    "imagenet": lambda: nn.Sequential(
        ConvNormAct(3, STEM_CHANNELS, 7, stride=2, act=_relu), nn.MaxPool2d(3, stride=2, padding=1)
    ),
    # Full resolution, for 32-64 px images: keeps a 8x8 final map at 64 px instead of 2x2.
    "cifar": lambda: ConvNormAct(3, STEM_CHANNELS, 3, act=_relu),
}


@MODELS.register("resnet")
class ResNet(StagedClassifier):
    """Stem, four stages (stages 2-4 halve the resolution), pool, dropout, linear."""

    linear_init: ClassVar[LinearInit] = LinearInit("normal", 0.01)

    def __init__(self, knobs: ResNetConfig, num_classes: int, classifier_dropout: float) -> None:
        super().__init__()
        block, counts = DEPTHS[knobs.depth]
        self.stages["stem"] = STEMS[knobs.stem]()
        channels = STEM_CHANNELS
        for index, (width, count) in enumerate(zip(STAGE_WIDTHS, counts), start=1):
            blocks = []
            for i in range(count):
                blocks.append(block(channels, width, 2 if i == 0 and index > 1 else 1))
                channels = width * block.expansion
            self.stages[f"layer{index}"] = nn.Sequential(*blocks)
        self._init_head(channels, num_classes, classifier_dropout)
