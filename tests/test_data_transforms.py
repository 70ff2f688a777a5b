"""Per-image transforms (parametrized over the registry), config errors, batch collation, mixup."""
import numpy as np
import pytest
import torch

from data.base import SeededList
from data.collate import BatchCollator, MixupCutmix, Normalize, build_collator
from data.transforms import TRANSFORMS, build_pipeline, build_transform
from options.config import ConfigError, load_config

# Settings that make each transform act (p = 1) so the contract test exercises its real path.
ACTIVE = {
    "cutout": {"p": 1.0}, "random_erasing": {"p": 1.0}, "random_gauss_noise": {"p": 1.0},
    "random_blur": {"p": 1.0}, "random_gamma": {"p": 1.0}, "random_translate": {"p": 1.0},
    "random_horizontal_flip": {"p": 1.0}, "random_vertical_flip": {"p": 1.0},
    "photometric_distort": {"p": 1.0}, "color_jitter": {"hue": 0.1},
    "random_order": {"transforms": [{"name": "random_gamma", "p": 1.0}, {"name": "cutout", "p": 1.0}]},
}


def image(dtype, height=64, width=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=g).permute(2, 0, 1)
    return pixels if dtype == torch.uint8 else pixels.float() / 255  # [3, H, W], the dataset's layout


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("name", TRANSFORMS.names())
def test_transform_keeps_dtype_range_and_shape_contract(name, dtype):
    transform = build_transform({"name": name, **ACTIVE.get(name, {})}, "t")
    torch.manual_seed(0)
    source = image(dtype, 64, 60)
    before = source.clone()
    out = transform(source, 48)
    assert out.dtype == dtype and out.shape[0] == 3
    if dtype == torch.float32:
        assert 0.0 <= out.min() and out.max() <= 1.0
    expected = {"random_resized_crop": (48, 48), "center_crop": (48, 48), "resize": (60, 56)}
    assert tuple(out.shape[1:]) == expected.get(name, (64, 60))
    assert torch.equal(source, before), "transforms must not modify their input"
    torch.manual_seed(0)
    assert torch.equal(transform(source, 48), out), "same torch seed, same output"


@pytest.mark.parametrize("name", sorted(set(TRANSFORMS.names()) - {"resize", "center_crop"}))
def test_active_transform_changes_the_image(name):
    torch.manual_seed(1)
    source = image(torch.uint8)
    out = build_transform({"name": name, **ACTIVE.get(name, {})}, "t")(source, 64)
    assert out.shape != source.shape or not torch.equal(out, source)


def test_paper_val_pipeline_resizes_to_crop_plus_8_then_center_crops():
    pipeline = build_pipeline([{"name": "resize"}, {"name": "center_crop"}], "image_augmentation.val")
    assert pipeline(image(torch.uint8), 64).shape == (3, 64, 64)
    assert pipeline.steps[0](image(torch.uint8), 64).shape == (3, 72, 72)
    explicit = build_pipeline(load_config([]).image_augmentation.val, "image_augmentation.val")
    assert torch.equal(explicit(image(torch.uint8), 64), pipeline(image(torch.uint8), 64))


def test_full_random_resized_crop_is_a_plain_resize():
    crop = build_transform({"name": "random_resized_crop", "scale": [1, 1], "ratio": [1, 1]}, "t")
    source = image(torch.uint8)
    assert torch.equal(crop(source, 64), source)
    assert crop(source, 32).shape == (3, 32, 32)


def test_cutout_holes_respect_the_paper_limits():
    torch.manual_seed(0)
    cutout = build_transform({"name": "cutout", "p": 1.0}, "t")
    white = torch.full((3, 64, 64), 255, dtype=torch.uint8)
    for _ in range(20):
        holes = (cutout(white, 64) == 0).all(0).sum().item()
        assert 1 <= holes <= 4 * 4 * 4


@pytest.mark.parametrize("entry, message", [
    ({"name": "random_resized_crp"},
     "unknown transform 'random_resized_crp'; known: center_crop, .* did you mean 'random_resized_crop'"),
    ({"name": "cutout", "max_hole": 3},
     r"\(cutout\): unknown setting 'max_hole' — did you mean 'max_holes'\? \(settings: max_holes"),
    ({"name": "cutout", "p": 2}, r"\(cutout\): p must be in \[0, 1\], got 2"),
    ({"name": "random_resized_crop", "scale": [0.9, 0.1]}, "scale must be"),
    ({"name": "random_resized_crop", "interpolation": "bilinar"}, "did you mean 'bilinear'"),
    ({"name": "random_blur", "kernel_size": 4}, "kernel_size must be odd"),
    ({"name": "random_order", "transforms": [{"name": "fli"}]},
     r"\(random_order\): transforms\[0\]: unknown transform 'fli'"),
    ({"name": "normalization"}, "image_augmentation.mean and image_augmentation.std"),
])
def test_config_errors_name_the_entry_and_the_fix(entry, message):
    with pytest.raises(ConfigError, match=message) as err:
        build_pipeline([{"name": "random_horizontal_flip"}, entry], "image_augmentation.train")
    assert str(err.value).startswith("image_augmentation.train[1]") and "\n" not in str(err.value)


def test_crop_size_awareness_is_reported():
    assert build_pipeline([{"name": "random_resized_crop"}], "t").uses_crop_size
    assert not build_pipeline([{"name": "center_crop", "size": 64}], "t").uses_crop_size
    nested = [{"name": "random_order", "transforms": [{"name": "center_crop"}]}]
    assert build_pipeline(nested, "t").uses_crop_size


# ----------------------------------------------------------------------------- batches
def samples(n=8, num_classes=4):
    return [(image(torch.uint8, seed=i), i % num_classes) for i in range(n)]


def test_collator_scales_to_float_and_keeps_hard_labels():
    images, targets = BatchCollator()(samples())
    assert images.dtype == torch.float32 and images.shape == (8, 3, 64, 64)
    assert torch.equal(images[3], image(torch.uint8, seed=3).float() / 255)
    assert targets.dtype == torch.int64 and targets.tolist() == [0, 1, 2, 3] * 2


def test_normalization_is_a_batch_step_configured_by_mean_and_std():
    images, _ = BatchCollator(Normalize([0.5] * 3, [0.25] * 3))(samples())
    assert torch.allclose(images[0], (image(torch.uint8).float() / 255 - 0.5) / 0.25)
    cfg = load_config(["--image-augmentation.mean", "0.5,0.5"])
    with pytest.raises(ConfigError, match="image_augmentation.mean/std"):
        build_collator(cfg.image_augmentation, 4, train=True)


@pytest.mark.parametrize("mixup, cutmix", [(0.2, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixed_targets_are_soft_and_sum_to_one(mixup, cutmix):
    mix = MixupCutmix(4, mixup, cutmix)
    collate = BatchCollator(mix=mix)
    plain, _ = BatchCollator()(samples())
    for seed in range(10):
        images, targets = collate(SeededList(samples(), seed))
        assert targets.shape == (8, 4) and targets.dtype == torch.float32
        assert torch.allclose(targets.sum(1), torch.ones(8))
        # every pixel is a convex combination of the image and its partner in the reversed batch
        low, high = torch.minimum(plain, plain.flip(0)), torch.maximum(plain, plain.flip(0))
        assert (images >= low - 1e-6).all() and (images <= high + 1e-6).all()


def test_cutmix_weight_is_the_share_of_pixels_kept():
    mix = MixupCutmix(2, cutmix_alpha=1.0)
    images = torch.stack([torch.zeros(3, 64, 64), torch.ones(3, 64, 64)])
    mixed, targets = mix(images.clone(), torch.tensor([0, 1]), np.random.default_rng(3))
    kept = (mixed[0] == 0).float().mean().item()
    assert targets[0, 0].item() == pytest.approx(kept)


def test_mixing_can_be_switched_off_per_batch():
    images, targets = BatchCollator(mix=MixupCutmix(4, mixup_alpha=1.0, prob=0.0))(samples())
    assert torch.equal(targets, torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3] * 2), 4).float())
    assert torch.equal(images, BatchCollator()(samples())[0])


def test_bad_mixup_settings_are_config_errors():
    cfg = load_config(["--image-augmentation.mixup.prob", "1.5", "--image-augmentation.mixup.mixup-alpha", "1"])
    with pytest.raises(ConfigError, match="image_augmentation.mixup: prob"):
        build_collator(cfg.image_augmentation, 4, train=True)
