"""The batch pipeline and its two placements: workers and device give the same batches from the
same seed (checked on CPU tensors, and on CUDA in the cases marked cuda), for every arrangement of
dataset.cache and dataset.augment_on, with the determinism guarantees kept."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data import build_eval_loader, build_loaders
from data.augment import Augmentation, MixupCutmix, Normalize, build_augmentation
from data.base import BatchSpec, RawBatch
from data.loaders import DeviceSplit, placement
from data.transforms import build_transforms
from helpers import FAKE_TREE, data_config, epoch
from options.config import load_config

N_TRAIN = FAKE_TREE["classes"] * FAKE_TREE["train_per_class"]
DEVICES = [torch.device("cpu"), pytest.param(torch.device("cuda"), marks=pytest.mark.cuda)]
# max |difference| of augmented pixels (about [0, 1]) and soft targets between placements: CPU
# kernels agree to float rounding; CUDA's resampling may differ by up to a quarter uint8 level
PLACEMENT_ATOL = {"cpu": 1e-6, "cuda": 1e-3}
# every kind of draw: boxes + resampling (shrinking at crop 48), flips, noise drawn on the host,
# per-sample order, torchvision's per-image op, occlusion, colour
AUGMENT_TINY = (
    "[{name: random_resized_crop, scale: [0.08, 1.0], antialias: false}, {name: random_order, transforms: ["
    "{name: random_flip}, {name: random_gamma, gamma: [0.5, 1.5]}, {name: random_translate, translate: 0.2, p: 1.0,"
    " diagonal: true}, {name: random_gauss_noise, std: [0.03, 0.1]}, {name: photometric_distort,"
    " brightness: [-0.2, 0.2], additive_brightness: true, style: cvnets}, {name: photometric_distort, p: 0.9},"
    " {name: cutout, holes: 4, height: 4, width: 4}]},"
    " {name: color_jitter, hue: 0.05}]"
)


def config(root, tmp_path, *flags):
    return data_config(root, "--dataset.cache-dir", str(tmp_path / "cache"), *flags)


def same(a, b, atol=0.0):
    assert len(a) == len(b)
    for (xa, ta), (xb, tb) in zip(a, b):
        assert xa.shape == xb.shape and torch.allclose(xa, xb, atol=atol, rtol=0) and torch.allclose(ta, tb, atol=atol)


# ----------------------------------------------------------------------------- the pipeline itself
def raw_batch(n=8, seed=11, crop=48):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 64, 64, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)
    return RawBatch(images, torch.arange(n) % 4, BatchSpec(tuple(range(n)), crop, seed))


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_both_placements_make_the_same_batch_up_to_float_rounding(device):
    """The pipeline in a worker (CPU) and on the training device: same draws, same pixels."""
    cfg = load_config(["--image-augmentation.train", AUGMENT_TINY, "--image-augmentation.mixup.cutmix-alpha", "1.0",
                       "--image-augmentation.mean", "0.5,0.4,0.3", "--image-augmentation.std", "0.2,0.2,0.2"])
    augment = build_augmentation(cfg.image_augmentation, 4, train=True)
    batch = raw_batch()
    on_worker = augment(batch)
    on_device = augment(batch.to(device))
    assert on_device[0].device.type == device.type
    assert torch.allclose(on_device[0].cpu(), on_worker[0], atol=1e-4, rtol=0)
    assert torch.allclose(on_device[1].cpu(), on_worker[1])
    other = augment(raw_batch(seed=12))
    assert not torch.allclose(other[0], on_worker[0], atol=0.1)  # the seed matters


def test_pipeline_order_float_mixing_then_normalisation():
    images = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    images[1] = 0
    batch = RawBatch(images, torch.tensor([0, 1]), BatchSpec((0, 1), 4, 0))
    out, targets = Augmentation([], Normalize([0.5] * 3, [0.25] * 3), MixupCutmix(2, mixup_alpha=1.0))(batch)
    lam = targets[0, 0].item()  # image 0 (all 1.0) mixed with image 1 (all 0.0) by lam
    assert torch.allclose(out[0], torch.full((3, 4, 4), (lam - 0.5) / 0.25), atol=1e-6)
    assert out.dtype == torch.float32 and out.is_contiguous()


@pytest.mark.parametrize("mixup, cutmix", [(0.2, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixed_targets_are_soft_and_sum_to_one(mixup, cutmix):
    plain, _ = Augmentation([])(raw_batch())
    for seed in range(10):
        images, targets = Augmentation([], mix=MixupCutmix(4, mixup, cutmix))(raw_batch(seed=seed))
        assert targets.shape == (8, 4) and targets.dtype == torch.float32
        assert torch.allclose(targets.sum(1), torch.ones(8))
        # every pixel is a convex combination of the image and its partner in the reversed batch
        low, high = torch.minimum(plain, plain.flip(0)), torch.maximum(plain, plain.flip(0))
        assert (images >= low - 1e-6).all() and (images <= high + 1e-6).all()


def test_cutmix_weight_is_the_share_of_pixels_kept():
    images = torch.stack([torch.zeros(3, 64, 64), torch.ones(3, 64, 64)])
    mixed, targets = MixupCutmix(2, cutmix_alpha=1.0)(images, torch.tensor([0, 1]), np.random.default_rng(3))
    assert targets[0, 0].item() == pytest.approx((mixed[0] == 0).float().mean().item())


def test_mixing_can_be_switched_off_per_batch():
    images, targets = Augmentation([], mix=MixupCutmix(4, mixup_alpha=1.0, prob=0.0))(raw_batch())
    assert torch.equal(targets, torch.nn.functional.one_hot(torch.arange(8) % 4, 4).float())
    assert torch.equal(images, Augmentation([])(raw_batch())[0])


# ----------------------------------------------------------------------------- the loaders
ARRANGEMENT_FLAGS = ("--sampler.name", "variable_batch_sampler", "--image-augmentation.train", AUGMENT_TINY,
                     "--image-augmentation.mixup.mixup-alpha", "0.4")


@pytest.fixture(scope="module")
def reference_batches(fake_root, tmp_path_factory):
    """Epoch 2's training batches and the validation batches of the default arrangement (no
    cache, augmentation in the main process), which every other arrangement must reproduce."""
    reference = build_loaders(config(fake_root, tmp_path_factory.mktemp("reference"), *ARRANGEMENT_FLAGS))
    return SimpleNamespace(train=epoch(reference.train, 2), val=list(reference.val))


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("cache, augment_on, workers, arrangement", [
    ("none", "workers", 0, "workers"), ("none", "device", 2, "device"), ("memory", "device", 0, "device"),
    ("disk", "device", 0, "device"), ("memory", "workers", 2, "workers"),
])
def test_every_arrangement_gives_the_same_batches(fake_root, tmp_path, reference_batches, cache, augment_on, workers,
                                                  arrangement, device):
    flags = ARRANGEMENT_FLAGS
    loaders = build_loaders(config(fake_root, tmp_path, *flags, "--dataset.cache", cache,
                                   "--dataset.augment-on", augment_on, "--dataset.workers", str(workers)),
                            device=device)
    assert loaders.train.placement == arrangement and loaders.val.placement == arrangement
    assert isinstance(loaders.train._batches, DeviceSplit) == (cache != "none" and augment_on == "device")
    first = epoch(loaders.train, 2)
    assert len(first) == len(loaders.train) == loaders.train.batch_sampler.epoch_length(2)
    assert len({images.shape[-1] for images, _ in first}) > 1  # variable batch sizes
    same(reference_batches.train, first, atol=PLACEMENT_ATOL[device.type])
    same(reference_batches.val, [(x.cpu(), t.cpu()) for x, t in loaders.val], atol=PLACEMENT_ATOL[device.type])


def test_auto_placement_follows_the_device():
    cfg = load_config([])
    assert placement(cfg, torch.device("cpu")) == "workers" and placement(cfg, torch.device("cuda")) == "device"
    forced = load_config(["--dataset.augment-on", "device"])
    assert placement(forced, torch.device("cpu")) == "device"


def test_device_split_holds_the_decoded_pixels_and_labels(fake_root, tmp_path):
    loaders = build_loaders(config(fake_root, tmp_path, "--dataset.cache", "memory", "--dataset.augment-on", "device"))
    split = loaders.train._batches
    dataset = loaders.train.dataset
    assert split.images.shape == (N_TRAIN, 64, 64, 3) and split.images.dtype == torch.uint8
    assert torch.equal(split.images[5].permute(2, 0, 1), dataset[5][0])
    assert torch.equal(split.targets, torch.as_tensor(dataset.labels))


def test_batches_are_the_same_for_any_worker_count_persistent_workers_and_a_resume(fake_root, tmp_path):
    flags = ("--image-augmentation.train", AUGMENT_TINY)
    reference = epoch(build_loaders(config(fake_root, tmp_path, *flags)).train, 3)
    workers = build_loaders(config(fake_root, tmp_path, *flags, "--dataset.workers", "2")).train
    for _ in range(2):  # persistent workers: the second pass reuses them
        same(reference, epoch(workers, 3))
    same(reference[4:], epoch(workers, 3, start_batch=4))  # a mid-epoch resume
    assert not torch.equal(reference[0][0], epoch(workers, 4)[0][0])


def test_augmentation_does_not_disturb_the_callers_random_stream(fake_root, tmp_path):
    loader = build_loaders(config(fake_root, tmp_path, "--image-augmentation.train", AUGMENT_TINY)).train
    torch.manual_seed(0)
    np.random.seed(0)
    epoch(loader)
    after = torch.rand(3), np.random.rand(3)
    torch.manual_seed(0)
    np.random.seed(0)
    assert torch.equal(torch.rand(3), after[0]) and (np.random.rand(3) == after[1]).all()


def test_ddp_shards_are_disjoint_and_labelled_like_the_sampler_says(fake_root, tmp_path):
    cfg = config(fake_root, tmp_path, "--dataset.cache", "memory", "--dataset.augment-on", "device")
    shards, lengths = [], []
    for rank in range(2):
        loader = build_loaders(cfg, rank=rank, world_size=2).train
        loader.batch_sampler.set_epoch(1)
        indices = [i for spec in loader.batch_sampler for i in spec.indices]
        labels = torch.cat([labels for _, labels in loader])
        assert torch.equal(labels, torch.as_tensor(loader.dataset.labels[indices]))
        shards.append(set(indices))
        lengths.append(len(loader))
    assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == N_TRAIN and lengths[0] == lengths[1]


def test_eval_loader_with_device_placement_yields_the_test_indices(fake_root, tmp_path):
    cfg = config(fake_root, tmp_path, "--dataset.cache", "memory", "--dataset.augment-on", "device")
    loader, dataset = build_eval_loader(cfg, "test")
    indices = torch.cat([targets for _, targets in loader])
    assert indices.tolist() == list(range(len(dataset)))
    workers, _ = build_eval_loader(config(fake_root, tmp_path), "test")
    same(list(workers), list(loader))


def test_validation_pipeline_is_the_val_list(fake_root, tmp_path):
    loaders = build_loaders(config(fake_root, tmp_path, "--image-augmentation.val", "[{name: resize, size: 40}]"))
    images, _ = next(iter(loaders.val))
    transforms = build_transforms([{"name": "resize", "size": 40}], "v")
    raw = torch.stack([loaders.val.dataset[i][0] for i in range(len(images))]).float() / 255
    assert torch.allclose(images, transforms[0](raw, 64, np.random.default_rng(0)), atol=1e-6)
