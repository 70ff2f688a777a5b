"""Batch samplers: fixed size and cvnets' variable batch sampler, single-process or DDP.

Both are one class, ShardedBatchSampler, fed a different schedule of (crop size, batch size)
pairs. It yields lists of (index, crop_size) items (SeededList: they also carry the seed of the
batch's augmentations) so the dataset builds each crop at its batch's size. Everything is a
pure function of (seed, epoch, rank, world_size): set_epoch() picks the epoch, every rank draws
the same sequence of sizes, and the ranks' shards are disjoint.
"""
from __future__ import annotations

import math
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import Sampler

from data.base import SeededList
from options.config import ConfigError
from options.registry import Registry
from options.schema import SamplerConfig

SAMPLERS = Registry("sampler")

Item = Tuple[int, int]  # (dataset index, crop size)
_ORDER, _SIZES, _SEEDS = 0, 1, 2  # independent random streams of one (seed, epoch)


def make_divisible(value: float, divisor: int, min_value: Optional[int] = None) -> int:
    """cvnets' rounding: nearest multiple of divisor, at least min_value (default divisor),
    one multiple more when rounding down lost over 10% of the value."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def variable_batch_schedule(
    crop_size: int, batch_size: int, min_crop_size: int, max_crop_size: int, n_scales: int, check_scale: int
) -> List[Tuple[int, int]]:
    """Sorted (crop size, batch size) pairs of cvnets' variable batch sampler.

    Sizes are linspace(min, max, n_scales) plus the base size, each made divisible by
    check_scale; each batch keeps about the pixels of batch_size images at crop_size.
    """
    sizes = [*np.linspace(min_crop_size, max_crop_size, n_scales), crop_size]
    crops = sorted({make_divisible(s, check_scale) for s in sizes})
    pixels = batch_size * crop_size * crop_size
    return [(c, max(1, int(round(pixels / (c * c), 2)))) for c in crops]


class ShardedBatchSampler(Sampler[List[Item]]):
    """Batches of (index, crop size) drawn from a schedule of (crop size, batch size) pairs.

    shuffle: a new permutation per epoch (else dataset order). Each batch picks its pair
    uniformly at random from the schedule (a one-pair schedule is a plain batch sampler).
    Rank r of world_size gets every world_size-th index of the epoch's order. even=True
    (training) first drops the n % world_size last indices of that order, so all ranks hold
    equally many samples and therefore run the same number of batches, as DDP requires;
    even=False (evaluation) keeps every sample, so summed per-rank totals are exact.
    """

    def __init__(
        self,
        num_samples: int,
        schedule: Sequence[Tuple[int, int]],
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        even: bool = True,
    ) -> None:
        if not schedule or any(b < 1 or c < 1 for c, b in schedule):
            raise ValueError(f"schedule needs (crop size, batch size) pairs >= 1, got {list(schedule)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.num_samples, self.schedule = num_samples, [tuple(p) for p in schedule]
        self.shuffle, self.seed, self.rank, self.world_size, self.even = shuffle, seed, rank, world_size, even
        self.epoch, self.start_batch = 0, 0
        self._plans: Dict[int, List[Tuple[int, int]]] = {}

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Draw epoch `epoch`; start_batch > 0 resumes it mid-way, skipping the batches already
        trained (the remaining ones, augmentation seeds included, are those of a full pass)."""
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        """Batches of the whole epoch (also when resuming mid-way)."""
        return len(self._plan(len(self._shard())))

    def __iter__(self) -> Iterator[List[Item]]:
        shard = self._shard()
        plan = self._plan(len(shard))
        seeds = self._rng(_SEEDS, self.rank).integers(0, 2**63 - 1, size=len(plan))
        start = 0
        for number, ((crop, size), seed) in enumerate(zip(plan, seeds)):
            if number >= self.start_batch:
                yield SeededList(((int(i), crop) for i in shard[start:start + size]), seed=int(seed))
            start += size

    def _rng(self, stream: int, *extra: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, self.epoch, stream, *extra))

    def _shard(self) -> np.ndarray:
        """This rank's indices for the current epoch, in order."""
        n = self.num_samples
        order = self._rng(_ORDER).permutation(n) if self.shuffle else np.arange(n)
        if self.even:
            order = order[: n - n % self.world_size]
        return order[self.rank::self.world_size]

    def _plan(self, count: int) -> List[Tuple[int, int]]:
        """(crop size, batch size) of each batch of the epoch; the last batch takes the remainder.

        Depends only on (seed, epoch, count), so ranks with equal shards share it.
        """
        key = (self.epoch, count)
        if key not in self._plans:
            smallest = min(b for _, b in self.schedule)
            picks = self._rng(_SIZES).integers(len(self.schedule), size=math.ceil(count / smallest))
            plan, total = [], 0
            for k in picks:
                if total >= count:
                    break
                crop, size = self.schedule[k]
                plan.append((crop, min(size, count - total)))
                total += size
            self._plans = {key: plan}  # only the current epoch is worth keeping
        return self._plans[key]


# ----------------------------------------------------------------------------- registry
@SAMPLERS.register("batch_sampler")
def batch_sampler(num_samples: int, cfg: SamplerConfig, batch_size: int, *, shuffle: bool, seed: int = 0,
                  rank: int = 0, world_size: int = 1, even: bool = True) -> ShardedBatchSampler:
    """Fixed batches of batch_size images at cfg.crop_size."""
    return ShardedBatchSampler(num_samples, [(cfg.crop_size, batch_size)], shuffle, seed, rank, world_size, even)


@SAMPLERS.register("variable_batch_sampler")
def variable_batch_sampler(num_samples: int, cfg: SamplerConfig, batch_size: int, *, shuffle: bool, seed: int = 0,
                           rank: int = 0, world_size: int = 1, even: bool = True) -> ShardedBatchSampler:
    """cvnets' variable batch sampler; batch_size is the batch at the base size cfg.crop_size."""
    v = cfg.vbs
    if not (1 <= v.min_crop_size <= v.max_crop_size and v.max_n_scales >= 1 and v.check_scale >= 1):
        raise ConfigError(
            f"sampler.vbs: need 1 <= min_crop_size <= max_crop_size, max_n_scales >= 1 and check_scale >= 1, "
            f"got {v.min_crop_size}, {v.max_crop_size}, {v.max_n_scales}, {v.check_scale}"
        )
    schedule = variable_batch_schedule(
        cfg.crop_size, batch_size, v.min_crop_size, v.max_crop_size, v.max_n_scales, v.check_scale
    )
    return ShardedBatchSampler(num_samples, schedule, shuffle, seed, rank, world_size, even)
