"""Batch samplers: cvnets' size schedule and batch rules, full training batches, epoch lengths,
coverage, determinism, DDP sharding."""
import dataclasses

import pytest

from data.base import BatchSpec
from data.samplers import SAMPLERS, ShardedBatchSampler, variable_batch_schedule, vbs_schedule
from options.schema import SamplerConfig, VBSConfig

PAPER_MOBILEVIT = SamplerConfig(name="variable_batch_sampler", crop_size=64,
                                vbs=VBSConfig(min_crop_size=58, max_crop_size=82, max_n_scales=5, check_scale=6))
PAPER_RESNET = dataclasses.replace(
    PAPER_MOBILEVIT, vbs=VBSConfig(min_crop_size=64, max_crop_size=96, max_n_scales=5, check_scale=8)
)
TINYIMAGENET_TRAIN = 100_000


def build(name, n, cfg=PAPER_MOBILEVIT, batch_size=128, **kwargs):
    return SAMPLERS.get(name)(n, cfg, batch_size, **{"shuffle": True, **kwargs})


def with_rule(cfg, rule):
    return dataclasses.replace(cfg, vbs=dataclasses.replace(cfg.vbs, batch_rule=rule))


def epoch_batches(sampler, epoch=0):
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("cfg, rule, pairs", [
    # the paper's code (cvnets v0.1): batches grow below the base size and never shrink
    (PAPER_MOBILEVIT, "at_least_base", [(60, 145), (66, 128), (72, 128), (78, 128), (84, 128)]),
    (PAPER_RESNET, "at_least_base", [(64, 128), (72, 128), (80, 128), (88, 128), (96, 128)]),
    # later cvnets: about the base batch's pixels at every size
    (PAPER_MOBILEVIT, "constant_pixels", [(60, 145), (66, 120), (72, 101), (78, 86), (84, 74)]),
    (PAPER_RESNET, "constant_pixels", [(64, 128), (72, 101), (80, 81), (88, 67), (96, 56)]),
])
def test_paper_variable_batch_schedules(cfg, rule, pairs):
    v = cfg.vbs
    assert variable_batch_schedule(64, 128, v.min_crop_size, v.max_crop_size, v.max_n_scales, v.check_scale,
                                   rule) == pairs
    assert sorted(build("variable_batch_sampler", 10, with_rule(cfg, rule)).schedule) == pairs


def test_the_paper_rule_is_the_default():
    assert SamplerConfig().vbs.batch_rule == "at_least_base"


def test_paper_epoch_lengths_on_tinyimagenet():
    """The paper's logs: 761-764 batches per epoch for the MobileViT baseline, 782 for ResNet."""
    mobilevit = build("variable_batch_sampler", TINYIMAGENET_TRAIN)
    lengths = [mobilevit.epoch_length(e) for e in range(30)]
    # 100,000 / E[batch] (128 + 17/5 = 131.4) = 761.0 batches, the last one wrapping around;
    # the sizes are random, so an epoch lands a few batches either side
    assert all(756 <= n <= 767 for n in lengths) and 760.5 <= sum(lengths) / len(lengths) <= 762.5
    assert len(set(lengths)) > 1
    resnet = build("variable_batch_sampler", TINYIMAGENET_TRAIN, PAPER_RESNET)
    assert {resnet.epoch_length(e) for e in range(5)} == {782}
    assert build("batch_sampler", TINYIMAGENET_TRAIN).epoch_length(0) == 782


@pytest.mark.parametrize("name, n, batch", [
    ("batch_sampler", 1000, 128), ("batch_sampler", 7, 3), ("variable_batch_sampler", 2000, 128),
    ("variable_batch_sampler", 5, 2), ("batch_sampler", 3, 8),
])
def test_training_batches_are_full_and_cover_every_index(name, n, batch):
    sampler = build(name, n, batch_size=batch)
    schedule = dict(sampler.schedule)
    for epoch in range(3):
        batches = epoch_batches(sampler, epoch)
        assert len(sampler) == len(batches) == sampler.epoch_length(epoch)
        assert all(len(b) == schedule[b.crop_size] for b in batches)  # the last one wraps around too
        seen = [i for b in batches for i in b.indices]
        assert set(seen) == set(range(n))
        assert len(seen) - n < max(schedule.values())  # only the last batch repeats indices
        order, tail = seen[:n], seen[n:]  # the epoch's order, then what the last batch wrapped around to
        assert tail == [order[i % n] for i in range(len(tail))]


@pytest.mark.parametrize("name", ["batch_sampler", "variable_batch_sampler"])
def test_epoch_length_is_known_in_advance_for_every_epoch(name):
    sampler = build(name, 3001, rank=1, world_size=2, seed=5)
    predicted = [build(name, 3001, rank=1, world_size=2, seed=5).epoch_length(e) for e in range(6)]
    for epoch in range(6):
        assert len(epoch_batches(sampler, epoch)) == predicted[epoch] == len(sampler)
    assert sampler.epoch_length(2) == predicted[2]  # asking does not change the current epoch
    assert len(sampler) == predicted[5]


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


def test_batches_are_specs_with_distinct_augmentation_seeds():
    batches = epoch_batches(build("batch_sampler", 100, batch_size=10))
    assert all(isinstance(b, BatchSpec) and b.crop_size == 64 for b in batches)
    assert len({b.seed for b in batches}) == len(batches)


@pytest.mark.parametrize("name", ["batch_sampler", "variable_batch_sampler"])
@pytest.mark.parametrize("n", [3001, 3000])
def test_ranks_get_disjoint_shards_the_same_sizes_and_the_same_number_of_batches(name, n):
    world = 2
    ranks = [build(name, n, rank=r, world_size=world, seed=3) for r in range(world)]
    for epoch in (0, 1):
        per_rank = [epoch_batches(s, epoch) for s in ranks]
        shards = [{i for b in batches for i in b.indices} for batches in per_rank]
        assert not shards[0] & shards[1]
        assert len(shards[0]) == len(shards[1]) == n // world
        assert len(set.union(*shards)) == n - n % world
        sizes = [[(len(b), b.crop_size) for b in batches] for batches in per_rank]
        assert sizes[0] == sizes[1] and len(ranks[0]) == len(ranks[1]) == len(sizes[0])
        assert [b.seed for b in per_rank[0]] != [b.seed for b in per_rank[1]]  # ranks augment differently


def test_evaluation_shards_cover_every_sample_exactly_once():
    n, world = 10, 3
    seen = []
    for rank in range(world):
        sampler = build("batch_sampler", n, batch_size=2, shuffle=False, rank=rank, world_size=world, training=False)
        assert sampler.epoch_length(0) == len(list(sampler))
        seen += [i for b in sampler for i in b.indices]
    assert sorted(seen) == list(range(n))


def test_unshuffled_evaluation_keeps_dataset_order_and_a_short_last_batch():
    batches = epoch_batches(build("batch_sampler", 10, batch_size=4, shuffle=False, training=False))
    assert [b.indices for b in batches] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9)]


def test_one_scale_and_a_rank_outside_the_world():
    one_scale = dataclasses.replace(PAPER_MOBILEVIT, vbs=VBSConfig(min_crop_size=60, max_crop_size=60, max_n_scales=1))
    assert vbs_schedule(one_scale, 128) == [(60, 145), (66, 128)]  # one scale plus the base size is fine
    with pytest.raises(ValueError, match="rank"):
        ShardedBatchSampler(10, [(64, 2)], shuffle=True, rank=2, world_size=2)


def test_registry_holds_every_sampler_the_schema_offers():
    import typing

    offered = typing.get_args(typing.get_type_hints(SamplerConfig)["name"])
    assert SAMPLERS.names() == sorted(offered)
