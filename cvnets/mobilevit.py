"""MobileViT v1 (Mehta & Rastegari, 2022) with the paper's layer removal and fusion options."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Dict, List, Mapping, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvnets import MODELS
from cvnets.init import LinearInit
from cvnets.layers import ConvNormAct, InvertedResidual, StagedClassifier, TransformerBlock
from options.schema import MobileViTConfig, ModelConfig

PATCH = 2  # patch height and width, 2x2 everywhere
HEAD_EXPANSION = 4  # the 1x1 head conv widens the last stage 4x ...
HEAD_MAX_CHANNELS = 960  # ... up to this many channels


@dataclass(frozen=True)
class MV2Layer:
    """A stage of MobileNetV2 inverted residuals; only the first block strides."""

    out: int
    blocks: int
    stride: int

    def build(self, in_channels: int, expand: float, block_args: Mapping[str, Any]) -> nn.Sequential:
        return nn.Sequential(
            *(
                InvertedResidual(in_channels if i == 0 else self.out, self.out, self.stride if i == 0 else 1, expand)
                for i in range(self.blocks)
            )
        )


@dataclass(frozen=True)
class ViTLayer:
    """A stride-2 inverted residual followed by one MobileViT block of width `d`."""

    out: int
    d: int
    ffn: int
    blocks: int  # transformer blocks inside the MobileViT block

    def build(self, in_channels: int, expand: float, block_args: Mapping[str, Any]) -> nn.Sequential:
        """`block_args`: MobileViTBlock's keyword arguments shared by all layers (heads, dropouts, fusion)."""
        return nn.Sequential(
            InvertedResidual(in_channels, self.out, 2, expand),
            MobileViTBlock(self.out, self.d, self.ffn, self.blocks, **block_args),
        )


@dataclass(frozen=True)
class Variant:
    """One MobileViT size: MV2 expansion, layer1..layer5 specs and the layer/fusion defaults."""

    expand: int
    layers: Tuple[MV2Layer, MV2Layer, ViTLayer, ViTLayer, ViTLayer]
    remove_layers: Tuple[int, ...] = ()
    fusion: str = "concat_conv"


VARIANTS: Dict[str, Variant] = {
    "xx_small": Variant(
        expand=2,
        layers=(MV2Layer(16, 1, 1), MV2Layer(24, 3, 2), ViTLayer(48, 64, 128, 2), ViTLayer(64, 80, 160, 4),
                ViTLayer(80, 96, 192, 3)),
    ),
    "x_small": Variant(
        expand=4,
        layers=(MV2Layer(32, 1, 1), MV2Layer(48, 3, 2), ViTLayer(64, 96, 192, 2), ViTLayer(80, 120, 240, 4),
                ViTLayer(96, 144, 288, 3)),
    ),
    "small": Variant(
        expand=4,
        layers=(MV2Layer(32, 1, 1), MV2Layer(64, 3, 2), ViTLayer(96, 144, 288, 2), ViTLayer(128, 192, 384, 4),
                ViTLayer(160, 240, 480, 3)),
    ),
}
# The paper's MobileViT-Tiny: x_small without MobileViT layers 3 and 4 and without fusion.
VARIANTS["tiny"] = replace(VARIANTS["x_small"], remove_layers=(3, 4), fusion="none")


class MobileViTBlock(nn.Module):
    """Local 3x3 conv, global attention across 2x2 patches, projection back, then fusion.

    Each of the P = 4 pixel positions of a patch attends across all N patches. A feature map
    whose sides are not multiples of the patch size is resized to whole patches and back.
    `always_resize` resizes every map, also one that fits already: bilinear resizing to the
    map's own size (half-pixel centres) returns it unchanged, so the logits stay the same, but
    the graph no longer branches on the input size. torch.export settles such a branch for
    its example input (a graph exported at 64x64 would skip the resize and then fail at 96x96,
    where layer5 sees 3x3 maps), so dynamic-shape ONNX export sets it (cvnets.export).
    """

    def __init__(
        self,
        channels: int,
        d: int,
        ffn_dim: int,
        blocks: int,
        *,
        num_heads: int,
        dropout: float,
        attn_dropout: float,
        ffn_dropout: float,
        fusion: str,
        always_resize: bool = False,
    ) -> None:
        super().__init__()
        self.d = d
        self.fusion = fusion
        self.always_resize = always_resize
        # The 1x1 conv to d has neither norm nor bias (the paper's parameter counts depend on it).
        self.local = nn.Sequential(
            ConvNormAct(channels, channels, 3), ConvNormAct(channels, d, 1, norm=False, act=None, bias=False)
        )
        self.transformer = nn.Sequential(
            *(
                TransformerBlock(d, ffn_dim, num_heads, dropout, attn_dropout, ffn_dropout)
                for _ in range(blocks)
            ),
            nn.LayerNorm(d),
        )
        self.proj = ConvNormAct(d, channels, 1)
        # "residual" normalises x + y with a layer norm without weights; "none" returns y.
        if fusion == "concat_conv":
            self.fuse = ConvNormAct(2 * channels, channels, 3)

    @staticmethod
    def token_grid(height: int, width: int) -> Tuple[int, int, int, int]:
        """(P, N, H', W') for an H x W feature map, H' x W' being the size after padding to whole patches."""
        height, width = (PATCH * math.ceil(s / PATCH) for s in (height, width))
        return PATCH * PATCH, (height // PATCH) * (width // PATCH), height, width

    @staticmethod
    def unfold(x: Tensor) -> Tensor:
        """[B, d, H, W] -> [B*P, N, d], H and W multiples of the patch size."""
        batch, d, height, width = x.shape
        nh, nw = height // PATCH, width // PATCH
        # [B, d, H, W] -> [B, d, nh, ph, nw, pw] (a view, in either memory format)
        x = x.reshape(batch, d, nh, PATCH, nw, PATCH)
        # -> [B, ph, pw, nh, nw, d] -> [B*P, N, d]: the single copy
        return x.permute(0, 3, 5, 2, 4, 1).reshape(batch * PATCH * PATCH, nh * nw, d)

    @staticmethod
    def fold(x: Tensor, height: int, width: int, channels_last: bool = False) -> Tensor:
        """[B*P, N, d] -> [B, d, H, W], the inverse of `unfold`, stored in the requested layout."""
        d = x.shape[-1]
        nh, nw = height // PATCH, width // PATCH
        # [B*P, N, d] -> [B, ph, pw, nh, nw, d] (a view)
        x = x.reshape(-1, PATCH, PATCH, nh, nw, d)
        if channels_last:
            # -> [B, nh, ph, nw, pw, d] -> [B, H, W, d] (the copy) -> [B, d, H, W] (a view)
            return x.permute(0, 3, 1, 4, 2, 5).reshape(-1, height, width, d).permute(0, 3, 1, 2)
        # -> [B, d, nh, ph, nw, pw] -> [B, d, H, W] (the copy)
        return x.permute(0, 5, 3, 1, 4, 2).reshape(-1, d, height, width)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        _, _, padded_h, padded_w = self.token_grid(height, width)
        y = self.local(x)
        # always_resize first: with it set the size comparison (a guard under torch.export) never runs.
        resize = self.always_resize or (padded_h, padded_w) != (height, width)
        if resize:
            # Odd sizes (e.g. 9x9 from a 66 px input) are stretched to whole patches and back.
            y = F.interpolate(y, size=(padded_h, padded_w), mode="bilinear", align_corners=False)
        # Fold into the input's memory format so that the convs after it need no layout conversion.
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        y = self.fold(self.transformer(self.unfold(y)), padded_h, padded_w, channels_last)
        if resize:
            y = F.interpolate(y, size=(height, width), mode="bilinear", align_corners=False)
        y = self.proj(y)
        if self.fusion == "concat_conv":
            return self.fuse(torch.cat((x, y), dim=1))
        if self.fusion == "residual":
            # The paper's variant: input + output, normalised over (C, H, W) per sample, no weights.
            return F.layer_norm(x + y, x.shape[1:])
        return y


@MODELS.register("mobilevit")
class MobileViT(StagedClassifier):
    """Stem, layer1..layer5 (some of 3..5 possibly removed), 1x1 head conv, pool, linear."""

    linear_init: ClassVar[LinearInit] = LinearInit("trunc_normal", 0.02)

    def __init__(self, knobs: MobileViTConfig, num_classes: int, classifier_dropout: float) -> None:
        super().__init__()
        variant = VARIANTS[knobs.mode]
        removed = removed_layers(knobs)
        block_args = dict(
            num_heads=knobs.num_heads,
            dropout=knobs.dropout,
            attn_dropout=knobs.attn_dropout,
            ffn_dropout=knobs.ffn_dropout,
            fusion=variant.fusion if knobs.fusion is None else knobs.fusion,
        )

        channels = 16
        self.stages["stem"] = ConvNormAct(3, channels, 3, stride=2)
        for index, spec in enumerate(variant.layers, start=1):
            if index in removed:
                continue  # the next kept layer takes this layer's input channels
            self.stages[f"layer{index}"] = spec.build(channels, variant.expand, block_args)
            channels = spec.out
        head = min(HEAD_EXPANSION * channels, HEAD_MAX_CHANNELS)
        self.stages["head"] = ConvNormAct(channels, head, 1)
        self._init_head(head, num_classes, classifier_dropout)

    @staticmethod
    def check_config(cfg: ModelConfig) -> None:
        """Raise ValueError, naming the key, for a head count that does not divide a kept transformer
        width: the one rule that needs the variant table (the schema checks every single value)."""
        knobs = cfg.mobilevit
        heads = knobs.num_heads
        removed = removed_layers(knobs)
        widths: List[Tuple[str, int]] = [
            (f"layer{index}", spec.d) for index, spec in enumerate(VARIANTS[knobs.mode].layers, start=1)
            if isinstance(spec, ViTLayer) and index not in removed
        ]
        for layer, d in widths:
            if d % heads:
                kept = [str(w) for _, w in widths]
                choices = kept[0] if len(kept) == 1 else f"{', '.join(kept[:-1])} and {kept[-1]}"
                raise ValueError(f"model.mobilevit.num_heads: {heads} does not divide the transformer width {d} "
                                 f"of {layer} ({knobs.mode}); choose a divisor of {choices}")


def removed_layers(knobs: MobileViTConfig) -> Tuple[int, ...]:
    """The removed layer numbers, sorted: the config's, else the mode's."""
    variant = VARIANTS[knobs.mode]
    return tuple(sorted(set(variant.remove_layers if knobs.remove_layers is None else knobs.remove_layers)))
