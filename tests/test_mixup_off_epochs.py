"""image_augmentation.mixup.off_epochs: no mixing in the run's last N epochs, in every placement and
across a resume."""
import pytest
import torch

from data import build_loaders
from data.augment import build_augmentation
from data.base import BatchSpec, RawBatch
from engine.commands import train
from helpers import assert_same_weights, last_state, read_rows, tiny_args, train_in_process
from options.config import load_config

MIX = ("--image-augmentation.mixup.mixup-alpha", "1.0", "--image-augmentation.mixup.cutmix-alpha", "1.0")


def _batch(epoch, seed=5):
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return RawBatch(images, torch.arange(8) % 4, BatchSpec(tuple(range(8)), 16, seed, epoch))


def test_batches_of_the_last_epochs_are_left_unmixed():
    cfg = load_config([*MIX, "--image-augmentation.mixup.off-epochs", "2", "--image-augmentation.train", "[]",
                       "--scheduler.max-epochs", "5"])
    augment = build_augmentation(cfg.image_augmentation, 4, train=True, max_epochs=5)
    plain = build_augmentation(load_config(["--image-augmentation.train", "[]"]).image_augmentation, 4, train=True)
    one_hot = torch.nn.functional.one_hot(torch.arange(8) % 4, 4).float()
    for epoch in range(5):
        images, targets = augment(_batch(epoch))
        if epoch < 3:
            assert not torch.equal(targets, one_hot)  # prob 1: every batch of these epochs is mixed
        else:
            assert torch.equal(targets, one_hot) and torch.equal(images, plain(_batch(epoch))[0])


def test_the_sampler_tells_each_batch_its_epoch(fake_root):
    cfg = load_config(tiny_args(fake_root, "unused", "x", 3, *MIX, "--image-augmentation.mixup.off-epochs", "1"))
    loaders = build_loaders(cfg)
    for epoch in range(3):
        loaders.train.batch_sampler.set_epoch(epoch)
        specs = list(loaders.train.batch_sampler)
        assert specs and all(spec.epoch == epoch for spec in specs)
        one_hot = [bool((targets.max(dim=1).values == 1).all()) for _, targets in loaders.train]
        assert all(one_hot) == (epoch == 2)  # (a cutmix box may come out empty: not every batch changes)


@pytest.mark.parametrize("flags, message", [
    (("--image-augmentation.mixup.off-epochs", "3", "--scheduler.max-epochs", "3", *MIX), "the whole run"),
    (("--image-augmentation.mixup.off-epochs", "1",), "no mixing to switch off"),
])
def test_settings_that_cannot_work_are_refused_up_front(flags, message):
    from engine.build import check_config

    with pytest.raises(ValueError, match=f"image_augmentation.mixup.off_epochs.*{message}"):
        check_config(load_config(list(flags)))


def test_a_run_resumed_across_the_switch_equals_an_uninterrupted_one(fake_root, tmp_path):
    flags = (*MIX, "--image-augmentation.mixup.off-epochs", "1")
    assert train(tiny_args(fake_root, tmp_path, "full", 3, *flags)) == 0

    # Mixing was on in both epochs; the next one has it off.
    train_in_process(tiny_args(fake_root, tmp_path, "split", 3, *flags), stop_after_epoch=2)
    assert train(tiny_args(fake_root, tmp_path, "split", 3, *flags, "--common.resume", "auto")) == 0

    full, split = last_state(tmp_path / "full"), last_state(tmp_path / "split")
    assert_same_weights(full["model"], split["model"])
    assert read_rows(tmp_path / "full") == read_rows(tmp_path / "split")
    # and the switch happened: the last epoch trains unlike a run that mixes to the end
    assert train(tiny_args(fake_root, tmp_path, "always", 3, *MIX)) == 0
    rows, always = read_rows(tmp_path / "full"), read_rows(tmp_path / "always")
    assert rows[:2] == always[:2] and rows[2]["train_loss"] != always[2]["train_loss"]
