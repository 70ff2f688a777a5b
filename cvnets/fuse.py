"""Fold inference-mode BatchNorm into the convolution that feeds it, for good.

In eval mode BatchNorm is a fixed per-channel affine map, y = a * x + b with
a = gamma / sqrt(running_var + eps) and b = beta - a * running_mean. When x is the output
of a convolution, scaling the conv's output channel k by a[k] and shifting its bias gives
the same function with one layer less. ConvNormAct already applies that fold on the fly in
eval mode (cvnets.layers.fold_batchnorm_into); here a copy of the model gets the folded
weights as plain Conv2d parameters, so that an exported graph holds one convolution and no
BatchNorm arithmetic. Only a Conv2d directly followed by a BatchNorm2d inside an
nn.Sequential (ConvNormAct and every stem, branch and shortcut built from it) is folded; a
BatchNorm with anything else in front of it (MobileViT's residual fusion normalises a sum)
is left as it is.
"""
from __future__ import annotations

import copy
from typing import Iterator, List, Tuple

import torch
from torch import nn

from cvnets.layers import fold_batchnorm_into

# (the Sequential holding the pair, the conv's name in it, the norm's name in it)
ConvNormPair = Tuple[nn.Sequential, str, str]


def conv_bn_pairs(model: nn.Module) -> Iterator[ConvNormPair]:
    """Every Conv2d that is immediately followed by a foldable BatchNorm2d in a Sequential."""
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (conv_name, conv), (norm_name, norm) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and _foldable(norm, conv.out_channels):
                yield module, conv_name, norm_name


def _foldable(norm: nn.Module, channels: int) -> bool:
    # Without running statistics BatchNorm normalises with the batch's own statistics even in
    # eval mode, which no fixed affine map reproduces.
    return (
        isinstance(norm, nn.BatchNorm2d)
        and norm.track_running_stats
        and norm.running_mean is not None
        and norm.num_features == channels
    )


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d computing norm(conv(x)) in eval mode (with a bias even if conv had none)."""
    weight, bias = fold_batchnorm_into(conv.weight, conv.bias, norm)
    fused = copy.deepcopy(conv)
    fused.weight.copy_(weight)
    fused.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
    return fused


def fold_batchnorm(model: nn.Module) -> Tuple[nn.Module, int]:
    """An eval-mode copy of `model` with every conv -> BatchNorm pair folded, and the pair count.

    The original model is left untouched (the parity check runs it beside the copy). Folded
    norms become nn.Identity, so module names, and the layer a traceback points at, stay the same.
    """
    folded = copy.deepcopy(model).eval()
    pairs: List[ConvNormPair] = list(conv_bn_pairs(folded))
    for parent, conv_name, norm_name in pairs:
        setattr(parent, conv_name, fold_conv_bn(getattr(parent, conv_name), getattr(parent, norm_name)))
        setattr(parent, norm_name, nn.Identity())
    return folded, len(pairs)


def count_batchnorms(model: nn.Module) -> int:
    """BatchNorm layers still in `model` (after folding: those with no conv in front)."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
