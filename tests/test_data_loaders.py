"""build_loaders / build_eval_loader: the contract the engine relies on."""
import pytest
import torch

from conftest import FAKE_TREE
from data import Loaders, build_eval_loader, build_loaders
from options.config import ConfigError, load_config

N_TRAIN = FAKE_TREE["classes"] * FAKE_TREE["train_per_class"]
N_VAL = FAKE_TREE["classes"] * FAKE_TREE["val_per_class"]


def config(root, *flags):
    return load_config(["--dataset.root", root, "--dataset.workers", "0", "--dataset.train-batch-size", "8",
                        "--dataset.val-batch-size", "6", *flags])


def epoch(loader, number=0):
    loader.batch_sampler.set_epoch(number)
    return list(loader)


def test_train_and_val_batches_follow_the_contract(fake_root):
    loaders = build_loaders(config(fake_root))
    assert isinstance(loaders, Loaders) and loaders.num_classes == FAKE_TREE["classes"]
    assert loaders.wnids == sorted(loaders.wnids) and len(loaders.class_names) == loaders.num_classes
    train = epoch(loaders.train)
    assert len(train) == len(loaders.train) == N_TRAIN // 8
    for images, labels in train:
        assert images.dtype == torch.float32 and images.shape == (8, 3, 64, 64)
        assert 0 <= images.min() and images.max() <= 1
        assert labels.dtype == torch.int64 and labels.shape == (8,)
    val_labels = torch.cat([labels for _, labels in loaders.val])
    assert val_labels.dtype == torch.int64 and len(val_labels) == N_VAL


def test_variable_batch_sampler_sets_each_batch_crop_size(fake_root):
    loaders = build_loaders(config(fake_root, "--sampler.name", "variable_batch_sampler"))
    schedule = dict(loaders.train.batch_sampler.schedule)
    shapes = {images.shape[-1] for images, _ in epoch(loaders.train)}
    assert shapes <= set(schedule) and len(shapes) > 1
    assert {images.shape[-1] for images, _ in loaders.val} == {64}  # validation stays fixed


def test_variable_batch_sampler_needs_a_size_following_transform(fake_root):
    flags = ("--sampler.name", "variable_batch_sampler", "--image-augmentation.train", "[{name: random_gamma}]")
    with pytest.raises(ConfigError, match="variable_batch_sampler varies the crop size"):
        build_loaders(config(fake_root, *flags))


def test_batches_are_reproducible_across_worker_counts_and_epochs(fake_root):
    reference = epoch(build_loaders(config(fake_root)).train, 3)
    workers = build_loaders(config(fake_root, "--dataset.workers", "2")).train
    for _ in range(2):  # persistent workers: the second pass reuses them
        again = epoch(workers, 3)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(reference, again))
    other = epoch(workers, 4)
    assert not torch.equal(reference[0][0], other[0][0])


def test_augmentation_does_not_disturb_the_callers_random_stream(fake_root):
    loader = build_loaders(config(fake_root)).train
    torch.manual_seed(0)
    epoch(loader)
    after_epoch = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), after_epoch)


def test_mixup_loader_yields_soft_targets(fake_root):
    loaders = build_loaders(config(fake_root, "--image-augmentation.mixup.mixup-alpha", "0.4"))
    _, targets = next(iter(loaders.train))
    assert targets.shape == (8, FAKE_TREE["classes"]) and torch.allclose(targets.sum(1), torch.ones(8))
    _, val_labels = next(iter(loaders.val))
    assert val_labels.dtype == torch.int64  # never mixed


def test_validation_shards_sum_to_the_whole_split(fake_root):
    cfg = config(fake_root)
    seen = []
    for rank in range(3):
        val = build_loaders(cfg, rank=rank, world_size=3).val
        seen += [label for _, labels in val for label in labels.tolist()]
    full = [label for _, labels in build_loaders(cfg).val for label in labels.tolist()]
    assert sorted(seen) == sorted(full) and len(full) == N_VAL


def test_eval_loader_for_test_split_yields_indices_and_file_names(fake_root):
    loader, dataset = build_eval_loader(config(fake_root), "test")
    indices = torch.cat([targets for _, targets in loader])
    assert indices.tolist() == list(range(len(dataset)))
    assert dataset.file_names[0] == "test_0.JPEG"


def test_fake_data_setting_writes_the_tree_when_root_is_missing(tmp_path):
    root = str(tmp_path / "quickstart")
    cfg = config(root, "--dataset.fake.enable", "true", "--dataset.fake.classes", "3",
                 "--dataset.fake.train-per-class", "8", "--dataset.fake.val-per-class", "2")
    loaders = build_loaders(cfg)
    assert loaders.num_classes == 3 and len(loaders.train.dataset) == 24


@pytest.mark.parametrize("flag, value", [("--dataset.workers", "-1"), ("--dataset.train-batch-size", "0")])
def test_bad_loader_settings_are_config_errors(fake_root, flag, value):
    with pytest.raises(ConfigError, match=flag[2:].replace("-", "_")):
        build_loaders(config(fake_root, flag, value))
