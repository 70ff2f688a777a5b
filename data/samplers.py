"""Batch samplers: fixed size and cvnets' variable batch sampler, single-process or DDP.

Both are one class, ShardedBatchSampler, fed a different schedule of (crop size, batch size)
pairs. It yields BatchSpecs (indices, the batch's crop size, the seed of its augmentations).
Everything is a pure function of (seed, epoch, rank, world_size): set_epoch() picks the epoch,
every rank draws the same sequence of sizes and the same number of batches, the ranks' shards
are disjoint, and epoch_length(epoch) tells any epoch's number of batches in advance.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import numpy as np
from torch.utils.data import Sampler

from utils.rounding import make_divisible
from data.base import BatchSpec
from options.registry import Registry
from options.schema import SamplerConfig

SAMPLERS = Registry("sampler", config_key="sampler.name")

_ORDER, _SIZES, _SEEDS = 0, 1, 2  # independent random streams of one (seed, epoch)

# Batch size at a crop size, from the base batch and the base batch's pixels over the crop's.
# The paper's code (cvnets v0.1) never shrinks a batch below the base; later cvnets keeps the
# pixels per batch constant (smaller batches at larger sizes).
BATCH_RULES: Dict[str, Callable[[int, int], int]] = {
    "at_least_base": lambda base, scaled: max(base, scaled),
    "constant_pixels": lambda base, scaled: max(1, scaled),
}


def variable_batch_schedule(
    crop_size: int, batch_size: int, min_crop_size: int, max_crop_size: int, n_scales: int, check_scale: int,
    batch_rule: str = "at_least_base",
) -> List[Tuple[int, int]]:
    """Sorted (crop size, batch size) pairs of cvnets' variable batch sampler.

    Sizes are linspace(min, max, n_scales) plus the base size, each made divisible by
    check_scale; the batch sizes follow `batch_rule` (BATCH_RULES).
    """
    sizes = [*np.linspace(min_crop_size, max_crop_size, n_scales), crop_size]
    crops = sorted({make_divisible(s, check_scale) for s in sizes})
    pixels = batch_size * crop_size * crop_size
    rule = BATCH_RULES[batch_rule]
    return [(c, rule(batch_size, int(round(pixels / (c * c), 2)))) for c in crops]


class ShardedBatchSampler(Sampler[BatchSpec]):
    """Batches drawn from a schedule of (crop size, batch size) pairs.

    shuffle: a new permutation per epoch (else dataset order). Each batch picks its pair
    uniformly at random from the schedule (a one-pair schedule is a plain batch sampler).
    Rank r of world_size gets every world_size-th index of the epoch's order.

    training=True: the n % world_size last indices of the order are dropped, so every rank
    holds as many samples, and every batch is full: the last one wraps around to the start of
    the rank's order (as the paper's code does). All ranks therefore run the same number of
    batches, as DDP requires. training=False (evaluation): every sample exactly once across
    ranks, the last batch holds the remainder, so summed per-rank totals are exact.
    """

    def __init__(
        self,
        num_samples: int,
        schedule: Sequence[Tuple[int, int]],
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        training: bool = True,
    ) -> None:
        if not schedule or any(b < 1 or c < 1 for c, b in schedule):
            raise ValueError(f"schedule needs (crop size, batch size) pairs >= 1, got {list(schedule)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.num_samples, self.schedule = num_samples, [tuple(p) for p in schedule]
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.training = training
        self.epoch, self.start_batch = 0, 0
        self._plans: Dict[int, List[Tuple[int, int]]] = {}

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Draw epoch `epoch`; start_batch > 0 resumes it mid-way, skipping the batches already
        trained (the remaining ones, augmentation seeds included, are those of a full pass)."""
        self.epoch, self.start_batch = epoch, start_batch

    def epoch_length(self, epoch: int) -> int:
        """Batches of epoch `epoch` (a pure function of seed, epoch, rank and world size)."""
        if len(self.schedule) == 1:  # one batch size: no draws needed, the run's totals stay O(1) per epoch
            return math.ceil(self._shard_length() / self.schedule[0][1])
        return len(self._plan(epoch))

    def __len__(self) -> int:
        """Batches of the current epoch (the whole epoch, also when resuming mid-way)."""
        return self.epoch_length(self.epoch)

    def __iter__(self) -> Iterator[BatchSpec]:
        shard = self._shard()
        plan = self._plan(self.epoch)
        seeds = self._rng(self.epoch, _SEEDS, self.rank).integers(0, 2**63 - 1, size=len(plan))
        start = 0
        for number, ((crop, size), seed) in enumerate(zip(plan, seeds)):
            if number >= self.start_batch:
                # indices past the end wrap around (training) or are never asked for (evaluation)
                picked = shard[np.arange(start, start + size) % len(shard)]
                yield BatchSpec(tuple(picked.tolist()), crop, int(seed), self.epoch)
            start += size

    def _rng(self, epoch: int, stream: int, *extra: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, epoch, stream, *extra))

    def _shard_length(self) -> int:
        n, world = self.num_samples, self.world_size
        if self.training:
            return n // world
        return len(range(self.rank, n, world))

    def _shard(self) -> np.ndarray:
        """This rank's indices for the current epoch, in order."""
        n = self.num_samples
        order = self._rng(self.epoch, _ORDER).permutation(n) if self.shuffle else np.arange(n)
        if self.training:
            order = order[: n - n % self.world_size]
        return order[self.rank::self.world_size]

    def _plan(self, epoch: int) -> List[Tuple[int, int]]:
        """(crop size, batch size) of each batch of the epoch.

        Depends only on (seed, epoch, shard length), so ranks with equal shards share it.
        """
        if epoch not in self._plans:
            count = self._shard_length()
            smallest = min(b for _, b in self.schedule)
            picks = self._rng(epoch, _SIZES).integers(len(self.schedule), size=math.ceil(count / smallest))
            plan, total = [], 0
            for k in picks:
                if total >= count:
                    break
                crop, size = self.schedule[k]
                plan.append((crop, size if self.training else min(size, count - total)))
                total += size
            self._plans = {epoch: plan}  # only the latest epoch is worth keeping
        return self._plans[epoch]


# ----------------------------------------------------------------------------- registry
@SAMPLERS.register("batch_sampler")
def batch_sampler(num_samples: int, cfg: SamplerConfig, batch_size: int, *, shuffle: bool, seed: int = 0,
                  rank: int = 0, world_size: int = 1, training: bool = True) -> ShardedBatchSampler:
    """Fixed batches of batch_size images at cfg.crop_size."""
    return ShardedBatchSampler(num_samples, [(cfg.crop_size, batch_size)], shuffle, seed, rank, world_size, training)


@SAMPLERS.register("variable_batch_sampler")
def variable_batch_sampler(num_samples: int, cfg: SamplerConfig, batch_size: int, *, shuffle: bool, seed: int = 0,
                           rank: int = 0, world_size: int = 1, training: bool = True) -> ShardedBatchSampler:
    """cvnets' variable batch sampler; batch_size is the batch at the base size cfg.crop_size."""
    return ShardedBatchSampler(num_samples, vbs_schedule(cfg, batch_size), shuffle, seed, rank, world_size, training)


def vbs_schedule(cfg: SamplerConfig, batch_size: int) -> List[Tuple[int, int]]:
    """The variable batch sampler's schedule for `cfg` (the schema has checked every setting)."""
    v = cfg.vbs
    return variable_batch_schedule(cfg.crop_size, batch_size, v.min_crop_size, v.max_crop_size,
                                   v.max_n_scales, v.check_scale, v.batch_rule)
