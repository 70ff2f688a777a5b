"""Fold inference-mode BatchNorm into the convolution that feeds it, in a copy of the model.

In eval mode BatchNorm is a fixed per-channel affine map, so a conv followed by it is one
conv with scaled weights and a shifted bias (torch.nn.utils.fusion.fuse_conv_bn_eval
computes them). The folded copy runs one layer less per pair, which makes evaluation faster,
and an exported graph holds plain convolutions and no BatchNorm arithmetic.

Only a Conv2d directly followed by a BatchNorm2d inside an nn.Sequential (ConvNormAct and
every stem, branch and shortcut built from it) is folded. MobileViT's residual fusion
normalises a sum with a parameter-free layer norm, which has nothing to fold.
"""
from __future__ import annotations

import copy
from typing import Iterator, List, Tuple

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

# (the Sequential holding the pair, the conv's name in it, the norm's name in it)
ConvNormPair = Tuple[nn.Sequential, str, str]


def conv_bn_pairs(model: nn.Module) -> Iterator[ConvNormPair]:
    """Every Conv2d that is immediately followed by a foldable BatchNorm in a Sequential."""
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (conv_name, conv), (norm_name, norm) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and _foldable(norm, conv.out_channels):
                yield module, conv_name, norm_name


def _foldable(norm: nn.Module, channels: int) -> bool:
    # SyncBatchNorm (sync_bn under DDP) is an ordinary BatchNorm in eval mode. Without running
    # statistics BatchNorm normalises with the batch's own statistics even in eval mode, which
    # no fixed affine map reproduces.
    return (
        isinstance(norm, (nn.BatchNorm2d, nn.SyncBatchNorm))
        and norm.track_running_stats
        and norm.running_mean is not None
        and norm.num_features == channels
    )


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> Tuple[nn.Module, int]:
    """An eval-mode copy of `model` with every conv -> BatchNorm pair folded, and the pair count.

    The original model is left untouched (it may go on training; the export's parity check
    runs it beside the copy). Folded norms become nn.Identity, so module names, and the layer
    a traceback points at, stay the same. Costs one copy of the weights: cheap enough to
    evaluate every validation pass on a fresh fold of the current weights.
    """
    folded = copy.deepcopy(model).eval()
    pairs: List[ConvNormPair] = list(conv_bn_pairs(folded))
    for parent, conv_name, norm_name in pairs:
        setattr(parent, conv_name, fuse_conv_bn_eval(getattr(parent, conv_name), getattr(parent, norm_name)))
        setattr(parent, norm_name, nn.Identity())
    return folded, len(pairs)


def count_batchnorms(model: nn.Module) -> int:
    """BatchNorm layers still in `model` (after folding: those with no conv in front)."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
