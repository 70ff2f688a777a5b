"""Building blocks shared by the model families.

Conv-norm-activation, the MobileNetV2 inverted residual, a pre-norm transformer block,
and `StagedClassifier`, the base class that runs named stages followed by a
pool -> dropout -> linear head.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, ClassVar, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvnets.init import LinearInit
from options.schema import ModelConfig
from utils.rounding import make_divisible

ActFactory = Callable[[], nn.Module]

# On the CPU, attention over at most this many tokens is faster as two batched matmuls than as
# the fused SDPA kernel (1.8x at 16 tokens for forward + backward, slower from 64 tokens).
_CPU_MATMUL_ATTENTION_MAX_TOKENS = 32


class SiLU(nn.SiLU):
    """nn.SiLU that overwrites its input when no autograd graph is recorded (inference).

    Only for inputs nobody else reads: the fresh output of the conv, norm or linear layer in
    front of it. In training it must not: autograd needs SiLU's input for the backward.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(x, inplace=self.inplace or not torch.is_grad_enabled())


class ConvNormAct(nn.Sequential):
    """Conv2d, then optional BatchNorm2d and activation ("same" padding for odd kernels).

    A plain Sequential: for fast inference and export, cvnets.fuse.fold_batchnorm folds the
    norm into the conv of a model copy.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        norm: bool = True,
        act: Optional[ActFactory] = SiLU,
        bias: Optional[bool] = None,
    ) -> None:
        layers: "OrderedDict[str, nn.Module]" = OrderedDict()
        # By default a conv has a bias only without a norm: BatchNorm's mean subtraction cancels it.
        bias = not norm if bias is None else bias
        layers["conv"] = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=bias
        )
        if norm:
            layers["norm"] = nn.BatchNorm2d(out_channels)
        if act is not None:
            layers["act"] = act()
        super().__init__(layers)


class Dropout(nn.Dropout):
    """nn.Dropout with a cheaper mask on the CPU.

    The CPU's bernoulli_ kernel is about twice as slow as drawing uniforms and comparing them,
    which made dropout cost more than the linear layer before it in MobileViT's transformer.
    Same distribution: each element is kept with probability 1 - p and scaled by 1 / (1 - p).
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or not 0.0 < self.p < 1.0 or self.inplace or x.device.type != "cpu":
            return super().forward(x)
        keep = torch.rand_like(x).ge_(self.p).mul_(1.0 / (1.0 - self.p))  # 0 or 1 / (1 - p)
        return x * keep


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> 3x3 depthwise (stride) -> 1x1 linear projection."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, expand_ratio: float, act: ActFactory = SiLU
    ) -> None:
        super().__init__()
        hidden = make_divisible(round(in_channels * expand_ratio), 8)
        layers = [] if expand_ratio == 1 else [ConvNormAct(in_channels, hidden, 1, act=act)]
        layers += [
            ConvNormAct(hidden, hidden, 3, stride=stride, groups=hidden, act=act),
            ConvNormAct(hidden, out_channels, 1, act=None),
        ]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        # In place: `out` is the block's own (norm or conv) output, which no backward needs.
        return out.add_(x) if self.use_residual else out


class MultiHeadAttention(nn.Module):
    """Self-attention over [B, N, d] tokens with one fused qkv projection.

    SDPA computes it, except for short sequences on the CPU (the MobileViT blocks at 64 px
    see 16, 4 and 1 tokens), where two batched matmuls are faster.
    """

    def __init__(self, dim: int, num_heads: int, attn_dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads {num_heads} does not divide the attention width {dim}")
        self.num_heads = num_heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        # [B, N, 3d] -> [B, N, 3, h, d/h] -> [3, B, h, N, d/h]; SDPA takes the strided views as they are
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        dropout = self.attn_dropout if self.training else 0.0
        if x.device.type == "cpu" and tokens <= _CPU_MATMUL_ATTENTION_MAX_TOKENS:
            out = _matmul_attention(q, k, v, dropout)
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        # [B, h, N, d/h] -> [B, N, h, d/h] -> [B, N, d]
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, dim))


def _matmul_attention(q: Tensor, k: Tensor, v: Tensor, dropout: float) -> Tensor:
    """softmax(q k^T / sqrt(d)) v, the same function as SDPA, as plain batched matmuls."""
    # [B, h, N, d/h] @ [B, h, d/h, N] -> [B, h, N, N]
    weights = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1)).softmax(dim=-1)
    return torch.matmul(F.dropout(weights, dropout) if dropout > 0 else weights, v)


class TransformerBlock(nn.Module):
    """Pre-norm encoder block: x + Drop(MHA(LN(x))), then x + Drop(FFN(LN(x)))."""

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        ffn_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, num_heads, attn_dropout)
        self.drop_attn = Dropout(dropout)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), SiLU(), Dropout(ffn_dropout), nn.Linear(ffn_dim, dim), Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_attn(self.attn(self.norm_attn(x)))
        return x + self.ffn(self.norm_ffn(x))


class StagedClassifier(nn.Module):
    """A classifier made of named stages (run in order) and a pool -> dropout -> linear head.

    Subclasses take (their config block, num_classes, classifier_dropout), fill `self.stages`
    and call `_init_head`; they declare `linear_init`, the family's default linear-layer
    initialisation (see cvnets/init.py).
    """

    linear_init: ClassVar[LinearInit]

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleDict()
        self.backbone_frozen = False

    @classmethod
    def from_config(cls, cfg: ModelConfig, num_classes: int) -> "StagedClassifier":
        """The network `model.name` selects; its own settings are the block named after it."""
        return cls(getattr(cfg, cfg.name), num_classes, cfg.classifier_dropout)

    @staticmethod
    def check_config(cfg: ModelConfig) -> None:
        """Raise ValueError, naming the key, for settings of the family that pass the schema but
        cannot build together; none by default."""

    def _init_head(self, channels: int, num_classes: int, dropout: float) -> None:
        self.num_features = channels
        self.classifier = nn.Sequential(Dropout(dropout), nn.Linear(channels, num_classes))

    def freeze_backbone(self) -> None:
        """Train the classifier alone (linear probing): the stages get no gradients and always run
        as in evaluation, BatchNorm on its running statistics and dropout off, whatever
        train() says, so the features stay those of the pretrained network."""
        self.backbone_frozen = True
        self.stages.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "StagedClassifier":
        super().train(mode)
        if self.backbone_frozen:
            self.stages.eval()
        return self

    def stage_outputs(self, x: Tensor) -> Dict[str, Tensor]:
        """Every stage's output by stage name, then the logits under "classifier"."""
        outputs: Dict[str, Tensor] = {}
        for name, stage in self.stages.items():
            x = outputs[name] = stage(x)
        outputs["classifier"] = self.classifier(x.mean(dim=(2, 3)))
        return outputs

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.stages.values():
            x = stage(x)
        # Global mean pool: [B, C, H, W] -> [B, C]
        return self.classifier(x.mean(dim=(2, 3)))

