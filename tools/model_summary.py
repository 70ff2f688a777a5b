"""Print a model's parameter count, stage output shapes, attention token grids and FLOPs.

    python tools/model_summary.py --common.config-file config/mobilevit_tiny.yaml [--section.key value ...]

Shapes and FLOPs are measured on one image at `sampler.crop_size`; the class count is
`model.num_classes`, or TinyImageNet's 200 when that is null (the dataset is not read).
"""
from __future__ import annotations

import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from cvnets import build_model, check_config
from cvnets.mobilevit import MobileViTBlock
from engine.experiments import NUM_CLASSES
from options.cli import parse_config
from options.schema import Config


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


# FlopCounterMode knows the CUDA attention kernels but not the CPU one SDPA dispatches to here.
_EXTRA_FLOP_FORMULAS = {
    op: _cpu_sdpa_flops
    for op in [getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)]
    if op is not None
}


def _shape(t: Tensor) -> str:
    return "x".join(str(s) for s in t.shape[1:])


def attention_grids(model: nn.Module, x: Tensor) -> List[str]:
    """One line per MobileViT block: the feature map it receives and the tokens it attends over."""
    seen: List[Tuple[str, MobileViTBlock, int, int]] = []
    handles = []
    for stage_name, stage in getattr(model, "stages", {}).items():
        for block in stage.modules():
            if isinstance(block, MobileViTBlock):
                hook = lambda mod, args, name=stage_name: seen.append((name, mod, *args[0].shape[-2:]))
                handles.append(block.register_forward_pre_hook(hook))
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    lines = []
    for name, block, height, width in seen:
        patches, tokens, padded_h, padded_w = block.token_grid(height, width)
        resized = f" (resized to {padded_h}x{padded_w})" if (padded_h, padded_w) != (height, width) else ""
        lines.append(
            f"{name} MobileViT block: feature {height}x{width}{resized} -> P={patches} x N={tokens}, d={block.d}"
        )
    return lines


def forward_flops(model: nn.Module, x: Tensor) -> int:
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter:
        model(x)
    return counter.get_total_flops()


def summarize(cfg: Config) -> List[str]:
    """The summary's lines for the model `cfg` builds."""
    num_classes = cfg.model.num_classes or NUM_CLASSES
    model = build_model(cfg.model, num_classes).eval()
    size = cfg.sampler.crop_size
    x = torch.zeros(1, 3, size, size)
    lines = [
        f"model: {cfg.model.name}, {num_classes} classes, input 3x{size}x{size}",
        f"params: {sum(p.numel() for p in model.parameters()):,}",
        "stage outputs (C x H x W):",
    ]
    with torch.no_grad():
        outputs: Dict[str, Tensor] = model.stage_outputs(x)
        width = max(len(name) for name in outputs)
        lines += [f"  {name:<{width}}  {_shape(out)}" for name, out in outputs.items()]
        lines += attention_grids(model, x)
        flops = forward_flops(model, x)
    lines.append(f"flops: {flops / 1e6:,.1f} MFLOPs per image (forward; one multiply-add = 2 FLOPs)")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = parse_config(argv, "tools/model_summary.py", __doc__.strip(), check=lambda cfg: check_config(cfg.model))
    print("\n".join(summarize(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
