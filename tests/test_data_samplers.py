"""Batch samplers: cvnets' size schedule, coverage, determinism, DDP sharding."""
import dataclasses

import pytest

from data.base import SeededList
from data.samplers import SAMPLERS, ShardedBatchSampler, make_divisible, variable_batch_schedule
from options.config import ConfigError
from options.schema import SamplerConfig, VBSConfig

PAPER_MOBILEVIT = SamplerConfig(name="variable_batch_sampler", crop_size=64,
                                vbs=VBSConfig(min_crop_size=58, max_crop_size=82, max_n_scales=5, check_scale=6))
PAPER_RESNET = dataclasses.replace(
    PAPER_MOBILEVIT, vbs=VBSConfig(min_crop_size=64, max_crop_size=96, max_n_scales=5, check_scale=8)
)


def build(name, n, cfg=PAPER_MOBILEVIT, batch_size=128, **kwargs):
    return SAMPLERS.get(name)(n, cfg, batch_size, **{"shuffle": True, **kwargs})


def epoch_batches(sampler, epoch=0):
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("value, divisor, expected", [
    (58, 6, 60), (64, 6, 66), (70, 6, 72), (76, 6, 78), (82, 6, 84),
    (3, 8, 8),  # never below one multiple
    (8.8, 8, 8), (9.5, 8, 16),  # 8 loses over 10% of 9.5: one multiple more
    (13, 8, 16), (7.1, 1, 7),
])
def test_make_divisible_follows_cvnets(value, divisor, expected):
    assert make_divisible(value, divisor) == expected


@pytest.mark.parametrize("cfg, pairs", [
    (PAPER_MOBILEVIT, [(60, 145), (66, 120), (72, 101), (78, 86), (84, 74)]),
    (PAPER_RESNET, [(64, 128), (72, 101), (80, 81), (88, 67), (96, 56)]),
])
def test_paper_variable_batch_schedules(cfg, pairs):
    v = cfg.vbs
    assert variable_batch_schedule(64, 128, v.min_crop_size, v.max_crop_size, v.max_n_scales, v.check_scale) == pairs
    assert sorted(build("variable_batch_sampler", 10, cfg).schedule) == pairs


@pytest.mark.parametrize("name, n, batch", [
    ("batch_sampler", 1000, 128), ("batch_sampler", 7, 3), ("variable_batch_sampler", 2000, 128),
    ("variable_batch_sampler", 5, 2),
])
def test_every_index_once_per_epoch_and_len_counts_batches(name, n, batch):
    sampler = build(name, n, batch_size=batch)
    for epoch in range(3):
        batches = epoch_batches(sampler, epoch)
        assert len(sampler) == len(batches)
        assert sorted(i for b in batches for i, _ in b) == list(range(n))


def test_batches_pair_every_index_with_the_batch_crop_size():
    sampler = build("variable_batch_sampler", 3000)
    schedule = dict(sampler.schedule)
    sizes = set()
    for batch in epoch_batches(sampler)[:-1]:  # the last batch holds the remainder
        (crop,) = {c for _, c in batch}
        assert len(batch) == schedule[crop]
        sizes.add(crop)
    assert len(sizes) > 1


def test_same_seed_and_epoch_same_batches_new_epoch_or_seed_different():
    first = epoch_batches(build("variable_batch_sampler", 2000, seed=1), 4)
    assert first == epoch_batches(build("variable_batch_sampler", 2000, seed=1), 4)
    assert first != epoch_batches(build("variable_batch_sampler", 2000, seed=1), 5)
    assert first != epoch_batches(build("variable_batch_sampler", 2000, seed=2), 4)


def test_resuming_mid_epoch_yields_the_remaining_batches():
    sampler = build("variable_batch_sampler", 2000)
    full = epoch_batches(sampler, 2)
    sampler.set_epoch(2, start_batch=5)
    rest = list(sampler)
    assert rest == full[5:] and [b.seed for b in rest] == [b.seed for b in full[5:]]
    assert len(sampler) == len(full)


def test_batches_carry_distinct_augmentation_seeds():
    batches = epoch_batches(build("batch_sampler", 100, batch_size=10))
    assert all(isinstance(b, SeededList) for b in batches)
    assert len({b.seed for b in batches}) == len(batches)


@pytest.mark.parametrize("name", ["batch_sampler", "variable_batch_sampler"])
@pytest.mark.parametrize("n", [3001, 3000])
def test_ranks_get_disjoint_shards_and_the_same_size_sequence(name, n):
    world = 2
    ranks = [build(name, n, rank=r, world_size=world, seed=3) for r in range(world)]
    for epoch in (0, 1):
        per_rank = [epoch_batches(s, epoch) for s in ranks]
        shards = [{i for b in batches for i, _ in b} for batches in per_rank]
        assert not shards[0] & shards[1]
        assert len(shards[0]) == len(shards[1]) == n // world  # equal shards: equal step counts
        assert len(set.union(*shards)) == n - n % world
        sizes = [[(len(b), b[0][1]) for b in batches] for batches in per_rank]
        assert sizes[0] == sizes[1] and len(ranks[0]) == len(ranks[1]) == len(sizes[0])


def test_evaluation_shards_cover_every_sample_exactly_once():
    n, world = 10, 3
    seen = []
    for rank in range(world):
        sampler = build("batch_sampler", n, batch_size=2, shuffle=False, rank=rank, world_size=world, even=False)
        seen += [i for b in sampler for i, _ in b]
    assert sorted(seen) == list(range(n))


def test_unshuffled_sampler_keeps_dataset_order():
    batches = epoch_batches(build("batch_sampler", 10, batch_size=4, shuffle=False))
    assert [[i for i, _ in b] for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert all(crop == 64 for b in batches for _, crop in b)


def test_bad_settings_are_rejected():
    bad = dataclasses.replace(PAPER_MOBILEVIT, vbs=VBSConfig(min_crop_size=90, max_crop_size=60))
    with pytest.raises(ConfigError, match="sampler.vbs"):
        build("variable_batch_sampler", 10, bad)
    with pytest.raises(ValueError, match="rank"):
        ShardedBatchSampler(10, [(64, 2)], shuffle=True, rank=2, world_size=2)


def test_registry_holds_every_sampler_the_schema_offers():
    import typing

    offered = typing.get_args(typing.get_type_hints(SamplerConfig)["name"])
    assert SAMPLERS.names() == sorted(offered)
