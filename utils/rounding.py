"""Rounding to multiples, shared by the models (channel counts) and the samplers (crop sizes)."""
from __future__ import annotations

from typing import Optional


def make_divisible(value: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """Round `value` to the nearest multiple of `divisor` (at least `min_value`).

    One more multiple is added when rounding down would lose more than 10 %: ml-cvnets' rule,
    for MobileNetV2 channel counts and for the variable batch sampler's crop sizes alike.
    """
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded
