"""dataset.cache: gpu on CPU tensors: batched augmentations with the CPU transforms' distributions,
deterministic batches, DDP shards, and the deferred (device-side) batch finishing."""
import math
import os

import numpy as np
import pytest
import torch

import main_train
from conftest import FAKE_TREE
from data import build_loaders
from data.gpu_cache import (
    BatchCutout, BatchHorizontalFlip, BatchRandomResizedCrop, DeviceCachedLoader, resample, resample_weights,
)
from data.loaders import DeviceFinishedLoader, _loader
from data.transforms import Cutout, RandomHorizontalFlip, RandomResizedCrop, _resize, _sample_box
from options.config import ConfigError, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TRAIN = FAKE_TREE["classes"] * FAKE_TREE["train_per_class"]
SAMPLES = 4000  # draws per distribution comparison


def config(root, tmp_path, *flags):
    return load_config(["--dataset.root", root, "--dataset.workers", "0", "--dataset.train-batch-size", "8",
                        "--dataset.val-batch-size", "6", "--dataset.cache-dir", str(tmp_path / "cache"), *flags])


def epoch(loader, number=0):
    loader.batch_sampler.set_epoch(number)
    return list(loader)


def close_means(a, b):
    """Means of two samples agree within 4 standard errors."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    return abs(a.mean() - b.mean()) <= 4 * math.sqrt(a.var() / len(a) + b.var() / len(b)) + 1e-12


# ----------------------------------------------------------------------------- distributions
def cpu_boxes(transform, count, size=64):
    """(top, left, h, w) rows drawn the way RandomResizedCrop draws them on the CPU path."""
    torch.manual_seed(0)
    rows = []
    for _ in range(count):
        box = _sample_box(size, size, transform.scale, transform.ratio)
        rows.append(box if box is not None else (0, 0, size, size))
    return np.array(rows, float)


def device_boxes(transform, count, size=64):
    gen = torch.Generator().manual_seed(1)
    boxes = BatchRandomResizedCrop(transform).sample_boxes(count, size, size, gen, torch.device("cpu"))
    return torch.stack(boxes, dim=1).numpy()


@pytest.mark.parametrize("scale, ratio", [((0.1, 1.0), (0.75, 1.33)), ((0.08, 1.0), (0.75, 1.333)),
                                          ((0.5, 1.0), (3.0, 4.0))])  # the last one often falls back
def test_crop_boxes_follow_the_cpu_distribution(scale, ratio):
    transform = RandomResizedCrop(scale, ratio)
    cpu, dev = cpu_boxes(transform, SAMPLES), device_boxes(transform, SAMPLES)
    for name, stat in {"area": lambda b: b[:, 2] * b[:, 3] / 64**2, "log aspect": lambda b: np.log(b[:, 3] / b[:, 2]),
                       "top": lambda b: b[:, 0], "left": lambda b: b[:, 1],
                       "full image": lambda b: (b[:, 2] == 64) & (b[:, 3] == 64)}.items():
        assert close_means(stat(cpu), stat(dev)), name
    for boxes in (cpu, dev):  # every box lies inside the image
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= 64).all() and (boxes[:, 1] + boxes[:, 3] <= 64).all()


def test_flip_rate_and_flipped_pixels():
    images = torch.arange(64.0).expand(SAMPLES, 3, 2, 64).clone()  # a horizontal ramp
    out = BatchHorizontalFlip(RandomHorizontalFlip(0.3))(images, 64, torch.Generator().manual_seed(0))
    flipped = out[:, 0, 0, 0] == 63
    assert torch.equal(out[flipped], images[flipped].flip(-1)) and torch.equal(out[~flipped], images[~flipped])
    assert abs(flipped.float().mean().item() - 0.3) < 4 * math.sqrt(0.3 * 0.7 / SAMPLES)


def test_cutout_follows_the_cpu_distribution():
    transform = Cutout(max_holes=4, max_height=4, max_width=4, p=0.5)
    torch.manual_seed(0)
    white = torch.full((3, 16, 16), 255, dtype=torch.uint8)
    cpu_cut = np.array([(transform(white, 16)[0] == 0).sum().item() for _ in range(SAMPLES)])
    batch = torch.full((SAMPLES, 3, 16, 16), 255.0)
    out = BatchCutout(transform)(batch, 16, torch.Generator().manual_seed(0))
    dev_cut = (out[:, 0] == 0).sum(dim=(1, 2)).numpy()
    assert (out[:, 0] == 0).equal(out[:, 2] == 0)  # holes span every channel
    assert close_means(cpu_cut > 0, dev_cut > 0) and close_means(cpu_cut, dev_cut)
    assert set(np.unique(out.numpy())) <= {0.0, 255.0}


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_box_resampling_matches_the_cpu_resize(interpolation):
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 256, (3, 64, 64), dtype=np.uint8))
    for _ in range(40):
        h, w = rng.integers(1, 65, 2)
        top, left = rng.integers(0, 65 - h), rng.integers(0, 65 - w)
        out = int(rng.integers(16, 96))  # both shrinking (antialiased) and enlarging
        expected = _resize(image[:, top:top + h, left:left + w], out, out, interpolation).float()
        rows = resample_weights(torch.tensor([float(top)]), torch.tensor([float(h)]), out, 64, interpolation)
        cols = resample_weights(torch.tensor([float(left)]), torch.tensor([float(w)]), out, 64, interpolation)
        got = resample(image[None].float(), rows, cols)[0]
        # torch's uint8 kernel uses fixed-point weights: a level or two apart at most, rarely
        assert (got - expected).abs().max() <= 2 and ((got - expected).abs() > 0).float().mean() < 0.1


# ----------------------------------------------------------------------------- loaders
def test_batches_have_the_cpu_paths_shapes_dtype_range_and_labels(fake_root, tmp_path):
    flags = ("--sampler.name", "variable_batch_sampler")
    cpu = epoch(build_loaders(config(fake_root, tmp_path, *flags)).train)
    loaders = build_loaders(config(fake_root, tmp_path, "--dataset.cache", "gpu", *flags))
    assert isinstance(loaders.train, DeviceCachedLoader) and len(loaders.train.dataset) == N_TRAIN
    dev = epoch(loaders.train)
    assert len(dev) == len(cpu) == len(loaders.train)
    assert len({images.shape[-1] for images, _ in dev}) > 1  # variable batch sizes
    for (a, la), (b, lb) in zip(cpu, dev):
        assert a.shape == b.shape and b.dtype == torch.float32 and 0 <= b.min() and b.max() <= 1
        assert torch.equal(la, lb)  # same sampler, same items


def test_validation_batches_match_the_cpu_path(fake_root, tmp_path):
    cpu = torch.cat([x for x, _ in build_loaders(config(fake_root, tmp_path)).val])
    dev = torch.cat([x for x, _ in build_loaders(config(fake_root, tmp_path, "--dataset.cache", "gpu")).val])
    assert cpu.shape == dev.shape and (cpu - dev).abs().max() <= 2 / 255 + 1e-6


def test_batches_are_a_function_of_seed_and_epoch(fake_root, tmp_path):
    first = epoch(build_loaders(config(fake_root, tmp_path, "--dataset.cache", "gpu")).train, 3)
    again = epoch(build_loaders(config(fake_root, tmp_path, "--dataset.cache", "gpu")).train, 3)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    other = epoch(build_loaders(config(fake_root, tmp_path, "--dataset.cache", "gpu")).train, 4)
    assert not torch.equal(first[0][0], other[0][0])


def test_ddp_shards_are_disjoint_and_labelled_like_the_sampler_says(fake_root, tmp_path):
    cfg = config(fake_root, tmp_path, "--dataset.cache", "gpu")
    shards = []
    for rank in range(2):
        loader = build_loaders(cfg, rank=rank, world_size=2).train
        loader.batch_sampler.set_epoch(1)
        indices = [i for batch in loader.batch_sampler for i, _ in batch]
        labels = torch.cat([labels for _, labels in loader])
        assert torch.equal(labels, torch.as_tensor(loader.dataset.labels[indices]))
        shards.append(set(indices))
    assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == N_TRAIN


def test_mixup_gives_soft_targets(fake_root, tmp_path):
    loaders = build_loaders(config(fake_root, tmp_path, "--dataset.cache", "gpu",
                                   "--image-augmentation.mixup.cutmix-alpha", "1.0"))
    _, targets = epoch(loaders.train)[0]
    assert targets.shape == (8, FAKE_TREE["classes"]) and torch.allclose(targets.sum(1), torch.ones(8))


def test_cutout_pipeline_and_unsupported_transform(fake_root, tmp_path):
    cutout = "[{name: random_resized_crop}, {name: random_horizontal_flip}, {name: cutout, p: 1.0}]"
    images, _ = epoch(build_loaders(config(fake_root, tmp_path, "--dataset.cache", "gpu",
                                           "--image-augmentation.train", cutout)).train)[0]
    assert ((images == 0).all(dim=1).flatten(1).any(dim=1)).all()  # every image has a hole
    flags = ("--dataset.cache", "gpu", "--image-augmentation.train", "[{name: random_resized_crop}, {name: random_gamma}]")
    with pytest.raises(ConfigError, match=r"image_augmentation.train\[1\]: random_gamma is not supported"):
        build_loaders(config(fake_root, tmp_path, *flags))


@pytest.mark.parametrize("mix", [(), ("--image-augmentation.mixup.mixup-alpha", "0.4")])
def test_device_side_finishing_gives_the_worker_side_batches(fake_root, tmp_path, mix):
    """The CUDA path (uint8 batches finished on the device), run on the CPU."""
    cfg = config(fake_root, tmp_path, *mix)
    reference = build_loaders(cfg).train
    deferred = _loader(cfg, reference.dataset, reference.batch_sampler, torch.device("cpu"), train=True,
                       defer_finish=True)
    assert isinstance(deferred, DeviceFinishedLoader) and len(deferred) == len(reference)
    for (a, ta), (b, tb) in zip(epoch(reference, 2), epoch(deferred, 2)):
        assert torch.equal(a, b) and torch.equal(ta, tb)


def test_training_with_the_gpu_cache_on_the_cpu(fake_root, tmp_path):
    cfg = config(fake_root, tmp_path, "--dataset.cache", "gpu", "--common.config-file", os.path.join(REPO, "config", "mobilevit_tiny.yaml"),
                 "--sampler.crop-size", "32", "--image-augmentation.val", "[{name: resize, size: 36}, {name: center_crop}]",
                 "--scheduler.max-epochs", "1", "--common.results-loc", str(tmp_path / "runs"))
    summary = main_train.build_trainer(cfg).run()
    assert summary["finished"] and summary["epochs_done"] == 1
