"""Batch transforms (parametrized over the registry), the augment-tiny transforms, resampling,
and config errors."""
import colorsys
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from data.transforms import TRANSFORMS, build_transform, build_transforms, resample, select

# Settings that make each transform act (p = 1) so the contract test exercises its real path.
ACTIVE = {
    "cutout": {"p": 1.0}, "random_erasing": {"p": 1.0}, "random_gauss_noise": {"p": 1.0},
    "random_blur": {"p": 1.0}, "random_gamma": {"p": 1.0}, "random_translate": {"p": 1.0},
    "random_horizontal_flip": {"p": 1.0}, "random_vertical_flip": {"p": 1.0},
    "photometric_distort": {"p": 1.0}, "color_jitter": {"hue": 0.1},
    "random_order": {"transforms": [{"name": "random_gamma", "p": 1.0}, {"name": "cutout", "p": 1.0}]},
}
N = 4000  # samples per frequency check


def batch(n=6, height=64, width=64, seed=0):
    """float [n, 3, H, W] in [0, 1], on 256 levels like decoded pixels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, height, width), generator=g).float() / 255


def run(transform, images, crop_size=64, seed=0):
    return transform(images, crop_size, np.random.default_rng(seed))


def build(name, **settings):
    return build_transform({"name": name, **settings}, "t")


def within(rate, expected, n=N):
    """A Bernoulli rate within 5 standard errors of `expected`."""
    return abs(rate - expected) <= 5 * math.sqrt(expected * (1 - expected) / n)


# ----------------------------------------------------------------------------- the contract
@pytest.mark.parametrize("name", TRANSFORMS.names())
def test_transform_contract_shape_range_input_and_seed(name):
    transform = build(name, **ACTIVE.get(name, {}))
    source = batch(height=64, width=60)
    before = source.clone()
    out = run(transform, source, 48)
    assert out.dtype == torch.float32 and out.shape[:2] == (6, 3)
    assert 0.0 <= out.min() and out.max() <= 1.0
    expected = {"random_resized_crop": (48, 48), "center_crop": (48, 48), "resize": (60, 56)}
    assert tuple(out.shape[2:]) == expected.get(name, (64, 60))
    assert (tuple(out.shape[2:]) == (64, 60)) == transform.keeps_size
    assert torch.equal(source, before), "transforms must not modify their input"
    assert torch.equal(run(transform, source, 48), out), "same draws, same output"


@pytest.mark.parametrize("name", sorted(set(TRANSFORMS.names()) - {"resize", "center_crop"}))
def test_active_transform_changes_the_batch(name):
    source = batch()
    out = run(build(name, **ACTIVE.get(name, {})), source, seed=1)
    assert out.shape != source.shape or not torch.equal(out, source)


@pytest.mark.parametrize("name", TRANSFORMS.names())
def test_draws_are_per_sample_and_independent_of_the_images(name):
    """The draws depend on the generator and the batch's shape only (never on pixel values),
    and applying them to a subset of the samples gives those samples' rows: what random_order
    and both placements rely on."""
    transform = build(name, **ACTIVE.get(name, {}))
    params = transform.draw(np.random.default_rng(3), 6, 64, 64, 64)
    again = transform.draw(np.random.default_rng(3), 6, 64, 64, 64)
    assert repr(params) == repr(again)
    if transform.keeps_size:
        source = batch()
        whole = transform.apply(source, params)
        chosen = np.array([1, 4])
        part = transform.apply(source[chosen], select(params, chosen))
        assert torch.allclose(part, whole[chosen], atol=1e-6)


# ----------------------------------------------------------------------------- resampling
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("antialias", [True, False])
def test_resampling_equals_torch_interpolate_of_the_crop(interpolation, antialias):
    rng = np.random.default_rng(0)
    images = batch(8)
    for _ in range(12):
        heights, widths = rng.integers(1, 65, (2, 8))
        boxes = np.array([[rng.integers(0, 65 - h), rng.integers(0, 65 - w), h, w]
                          for h, w in zip(heights, widths)], float)
        out_h, out_w = (int(v) for v in rng.integers(8, 100, 2))  # in one batch, samples shrink and enlarge
        got = resample(images, boxes, out_h, out_w, interpolation, antialias)
        for image, (top, left, h, w), result in zip(images, boxes.astype(int), got):
            crop = image[None, :, top:top + h, left:left + w]
            expected = F.interpolate(crop, size=(out_h, out_w), mode=interpolation, antialias=antialias,
                                     align_corners=False).clamp(0, 1)
            assert torch.allclose(result, expected[0], atol=1e-5), (h, w, out_h, out_w)


def test_nearest_resampling_picks_torchs_source_pixels():
    rng = np.random.default_rng(1)
    images = batch(1)
    for _ in range(30):
        h, w = rng.integers(1, 65, 2)
        top, left = rng.integers(0, 65 - h), rng.integers(0, 65 - w)
        out = int(rng.integers(8, 100))
        expected = F.interpolate(images[:, :, top:top + h, left:left + w], size=(out, out), mode="nearest-exact")
        got = resample(images, np.array([[top, left, h, w]], float), out, out, "nearest", True)
        # torch's own kernels disagree with each other where (i + 0.5) * scale lands on a pixel edge
        assert (got != expected).float().mean() < 0.05


def test_random_resized_crop_antialias_false_is_a_plain_bilinear_resize():
    source = batch(1)
    crop = build("random_resized_crop", scale=[1, 1], ratio=[1, 1], antialias=False)
    plain = F.interpolate(source, size=(40, 40), mode="bilinear", antialias=False, align_corners=False)
    smooth = F.interpolate(source, size=(40, 40), mode="bilinear", antialias=True, align_corners=False)
    assert torch.allclose(run(crop, source, 40), plain, atol=1e-5)
    assert torch.allclose(run(build("random_resized_crop", scale=[1, 1], ratio=[1, 1]), source, 40), smooth, atol=1e-5)
    assert not torch.allclose(plain, smooth, atol=1e-2)  # the setting matters when shrinking


def test_full_random_resized_crop_is_a_plain_resize():
    crop = build("random_resized_crop", scale=[1, 1], ratio=[1, 1])
    source = batch()
    assert torch.allclose(run(crop, source), source, atol=1e-6)
    assert run(crop, source, 32).shape == (6, 3, 32, 32)


def test_crop_boxes_lie_inside_the_image_and_follow_the_area_range():
    crop = build("random_resized_crop", scale=[0.1, 0.5], ratio=[0.75, 1.33])
    boxes = crop.draw(np.random.default_rng(0), N, 64, 64, 64)["boxes"]
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 64).all() and (left + w <= 64).all()
    area = h * w / 64**2
    assert area.min() > 0.08 and area.max() < 0.55 and 0.25 < area.mean() < 0.35


def test_paper_val_pipeline_resizes_to_crop_plus_8_then_center_crops():
    resize, center = build_transforms([{"name": "resize"}, {"name": "center_crop"}], "image_augmentation.val")
    wide = run(resize, batch(), 64)
    assert wide.shape == (6, 3, 72, 72) and run(center, wide, 64).shape == (6, 3, 64, 64)
    assert torch.equal(run(center, wide, 64), TF.center_crop(wide, [64, 64]))


# ----------------------------------------------------------------------------- augment tiny
def test_random_flip_is_horizontal_vertical_or_none_a_third_each():
    ramp = (torch.arange(4.0)[:, None] * 4 + torch.arange(4.0)) / 16  # distinct pixels, [4, 4]
    images = ramp.expand(N, 3, 4, 4).contiguous()
    out = run(build("random_flip"), images)
    horizontal = (out == ramp.flip(-1)).flatten(1).all(1)
    vertical = (out == ramp.flip(-2)).flatten(1).all(1)
    unchanged = (out == ramp).flatten(1).all(1)
    assert (horizontal.int() + vertical.int() + unchanged.int() == 1).all()  # exactly one outcome each
    for outcome in (horizontal, vertical, unchanged):
        assert within(outcome.float().mean().item(), 1 / 3)


def test_diagonal_translate_shifts_both_axes_the_same_way_with_zero_fill():
    translate = build("random_translate", translate=0.2, p=1.0, diagonal=True)
    images = torch.rand(N, 3, 20, 30) * 0.9 + 0.1  # no zero pixels of its own
    out = run(translate, images)
    shift = translate.draw(np.random.default_rng(0), N, 20, 30, 64)["shift"]
    dy, dx = shift.T.astype(int)
    assert ((dy > 0) == (dx > 0)).all() and (dy != 0).all() and (dx != 0).all()  # same direction
    assert within((dy > 0).mean(), 0.5)
    assert np.abs(dy).max() == 4 and np.abs(dx).max() == 6  # ceil(0.2 * side)
    for b in range(20):  # the pixels moved by (dy, dx), zeros filled in
        y, x = dy[b], dx[b]
        moved = out[b, :, max(y, 0):20 + min(y, 0), max(x, 0):30 + min(x, 0)]
        assert torch.equal(moved, images[b, :, max(-y, 0):20 - max(y, 0), max(-x, 0):30 - max(x, 0)])
        assert (out[b] == 0).float().sum() == 3 * (20 * 30 - moved.shape[1] * moved.shape[2])


def test_plain_translate_draws_each_axis_on_its_own():
    shift = build("random_translate", translate=0.2, p=1.0).draw(np.random.default_rng(0), N, 20, 30, 64)["shift"]
    assert set(np.unique(shift[:, 0])) == set(range(-4, 5)) and set(np.unique(shift[:, 1])) == set(range(-6, 7))
    assert 0.3 < ((shift[:, 0] > 0) != (shift[:, 1] > 0)).mean() < 0.6  # directions independent


def test_cutout_with_exact_settings_blanks_exactly_4x4_holes_half_the_time():
    cutout = build("cutout", holes=4, height=4, width=4, p=0.5, fill=0.0)
    out = run(cutout, torch.ones(N, 3, 16, 16))
    holes = out[:, 0] == 0
    assert torch.equal(holes, out[:, 2] == 0)  # holes span every channel
    cut = holes.flatten(1).any(1)
    assert within(cut.float().mean().item(), 0.5)
    params = cutout.draw(np.random.default_rng(0), N, 16, 16, 64)
    assert (params["boxes"][..., 2:] == 4).all() and (params["active"].sum(1) % 4 == 0).all()
    for b in np.flatnonzero(cut.numpy())[:50]:  # each blanked pixel lies in one of 4 exact 4x4 boxes
        expected = torch.zeros(16, 16, dtype=torch.bool)
        for top, left, h, w in params["boxes"][b].astype(int):
            expected[top:top + h, left:left + w] = True
        assert torch.equal(holes[b], expected)
        assert 16 <= holes[b].sum() <= 64  # 4 boxes of 16 pixels, overlaps allowed


def test_cutout_ranges_and_the_renamed_settings():
    ranges = build("cutout", holes=[1, 3], height=[2, 5], width=[1, 2], p=1.0)
    params = ranges.draw(np.random.default_rng(0), N, 16, 16, 64)
    assert set(params["active"].sum(1)) == {1, 2, 3}
    assert set(np.unique(params["boxes"][..., 2])) == {2, 3, 4, 5} and set(np.unique(params["boxes"][..., 3])) == {1, 2}
    with pytest.raises(ValueError, match=r"\(cutout\): setting 'max_holes' was renamed: use holes: \[1, N\]"):
        build("cutout", max_holes=4)
    with pytest.raises(ValueError, match="holes must be one int >= 1 or"):
        build("cutout", holes=[3, 1])


def test_additive_brightness_adds_an_offset():
    distort = build("photometric_distort", brightness=[0.2, 0.2], contrast=[1, 1], saturation=[1, 1], hue=[0, 0],
                    additive_brightness=True, p=1.0)
    params = distort.draw(np.random.default_rng(0), 6, 8, 8, 64)
    params["permutation"][:] = np.arange(3)  # leave the channel order for this check
    images = torch.rand(6, 3, 8, 8) * 0.5
    assert torch.allclose(distort.apply(images, params), images + 0.2, atol=1e-6)
    factor = build("photometric_distort", brightness=[0.5, 0.5], contrast=[1, 1], saturation=[1, 1], hue=[0, 0], p=1.0)
    params = factor.draw(np.random.default_rng(0), 6, 8, 8, 64)
    params["permutation"][:] = np.arange(3)
    assert torch.allclose(factor.apply(images, params), images * 0.5, atol=1e-6)
    with pytest.raises(ValueError, match=r"brightness must be \[min, max\] with -1.0 <= min"):
        build("photometric_distort", brightness=[-2, 0.2], additive_brightness=True)


def test_photometric_colour_steps_match_torchvision():
    images = batch(4, 16, 16)
    hue = build("photometric_distort", brightness=[1, 1], contrast=[1, 1], saturation=[1, 1], hue=[-0.3, 0.3], p=1.0)
    params = hue.draw(np.random.default_rng(0), 4, 16, 16, 64)
    params["permutation"][:] = np.arange(3)
    out = hue.apply(images, params)
    for b in range(4):
        assert torch.allclose(out[b], TF.adjust_hue(images[b], float(params["hue"][b])), atol=1e-5)
    saturation = build("photometric_distort", brightness=[1, 1], contrast=[1, 1], saturation=[0.2, 1.8], hue=[0, 0],
                       p=1.0)
    params = saturation.draw(np.random.default_rng(0), 4, 16, 16, 64)
    params["permutation"][:] = np.arange(3)
    out = saturation.apply(images, params)
    for b in range(4):
        assert torch.allclose(out[b], TF.adjust_saturation(images[b], float(params["saturation"][b])), atol=1e-5)


def fork_photometric(rgb, alpha1, beta, gamma, hue_steps, alpha2, permutation):
    """One pixel through ml-cvnets v0.1's PhotometricDistort, in floats (the fork rounds to uint8
    between steps): gain, offset, clip; HSV saturation scaled (clipped at 1) and hue moved by
    whole OpenCV steps of 1/180 turn (clipped at 0, wrapped at 1); gain again; channel swap."""
    rgb = [min(max(c * alpha1 + beta, 0.0), 1.0) for c in rgb]
    h, s, v = colorsys.rgb_to_hsv(*rgb)
    rgb = colorsys.hsv_to_rgb(max(h + hue_steps / 180, 0.0) % 1.0, min(s * gamma, 1.0), v)
    rgb = [min(max(c * alpha2, 0.0), 1.0) for c in rgb]
    return [rgb[i] for i in permutation]


def test_cvnets_photometric_follows_the_forks_steps():
    distort = build("photometric_distort", style="cvnets", additive_brightness=True, brightness=[0.1, 0.1],
                    contrast=[1.3, 1.3], saturation=[1.4, 1.4], hue=[-0.03, -0.03], p=0.5)
    images = batch(32, 4, 4)
    params = distort.draw(np.random.default_rng(0), 32, 4, 4, 64)
    steps = params["hue"] * 180
    assert set(np.round(steps, 6)) == {0.0, -7.0}  # int(-0.03 * 255) = int(-7.65) = -7 steps
    first, again = params["contrast_before"], params["contrast_after"]
    assert set(first) == set(again) == {1.0, 1.3} and not ((first != 1) & (again != 1)).any()
    out = distort.apply(images, params)
    for b in range(32):
        settings = (first[b], params["brightness"][b], params["saturation"][b], round(steps[b]), again[b],
                    params["permutation"][b])
        for y in range(4):
            for x in range(4):
                expected = fork_photometric(images[b, :, y, x].tolist(), *settings)
                assert torch.allclose(out[b, :, y, x], torch.tensor(expected, dtype=torch.float32), atol=1e-5), (b, y, x)


def test_cvnets_photometric_contrast_acts_three_times_in_four_at_p_half():
    distort = build("photometric_distort", style="cvnets", additive_brightness=True, p=0.5)
    params = distort.draw(np.random.default_rng(0), N, 8, 8, 64)
    contrast = (params["contrast_before"] != 1) | (params["contrast_after"] != 1)
    assert within(contrast.mean(), 0.75)  # first with p, then again with p where the first did not act
    assert within((params["hue"] != 0).mean(), 0.5 * 24 / 25.5, N)  # int() maps |255 delta| < 1 to no shift
    assert np.abs(params["hue"]).max() <= 12 / 180 + 1e-12
    with pytest.raises(ValueError, match="style cvnets adds its brightness: set additive_brightness: true"):
        build("photometric_distort", style="cvnets")


def test_gamma_noise_and_blur_act_as_configured():
    images = batch(N // 10, 8, 8)
    gamma = build("random_gamma", gamma=[0.5, 1.5], p=0.5)
    drawn = gamma.draw(np.random.default_rng(0), len(images), 8, 8, 64)["gamma"]
    assert within((drawn != 1).mean(), 0.5, len(images)) and 0.5 <= drawn.min() and drawn.max() <= 1.5
    expected = images ** torch.tensor(drawn).float().view(-1, 1, 1, 1)
    assert torch.allclose(gamma.apply(images, {"gamma": drawn}), expected)
    noise = build("random_gauss_noise", std=[0.05, 0.05], p=1.0)
    grey = torch.full((200, 3, 16, 16), 0.5)
    assert abs((run(noise, grey) - grey).std().item() - 0.05) < 0.002
    blur = build("random_blur", kernel_size=3, sigma=[1.0, 1.0], p=1.0)
    assert torch.allclose(run(blur, images[:4]), TF.gaussian_blur(images[:4], [3, 3], [1.0, 1.0]), atol=1e-6)


def test_random_order_applies_every_step_in_a_per_sample_order():
    order = build("random_order", transforms=[{"name": "random_gamma", "gamma": [2, 2], "p": 1.0},
                                              {"name": "photometric_distort", "brightness": [0.1, 0.1],
                                               "additive_brightness": True, "contrast": [1, 1], "saturation": [1, 1],
                                               "hue": [0, 0], "p": 0.0}])
    # add 0.1 then square, or square then add 0.1: the two orders give two known results
    images = torch.full((N // 10, 3, 2, 2), 0.5)
    params = order.draw(np.random.default_rng(0), len(images), 2, 2, 64)
    params["steps"][1]["brightness"][:] = 0.1  # act on every sample whatever p drew
    out = order.apply(images, params)[:, 0, 0, 0]
    first = params["order"][:, 0]
    assert torch.allclose(out[first == 0], torch.tensor(0.35)) and torch.allclose(out[first == 1], torch.tensor(0.36))
    assert within((first == 0).mean(), 0.5, len(images))
    with pytest.raises(ValueError, match=r"transforms\[0\]: random_resized_crop changes the image size"):
        build("random_order", transforms=[{"name": "random_resized_crop"}])


def test_per_image_torchvision_ops_are_seeded_per_sample_and_leave_the_callers_stream():
    augment = build("rand_augment", num_ops=2, magnitude=9)
    images = batch(4, 16, 16)
    torch.manual_seed(0)
    out = run(augment, images, seed=5)
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(run(augment, images, seed=5), out) and torch.equal(torch.rand(3), after)
    # one sample alone, with its own draw, gives its row of the batch
    seeds = augment.draw(np.random.default_rng(5), 4, 16, 16, 64)["seeds"]
    assert torch.equal(augment.apply(images[2:3], {"seeds": seeds[2:3]}), out[2:3])


# ----------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("entry, message", [
    ({"name": "random_resized_crp"},
     "unknown transform 'random_resized_crp'; known: center_crop, .* did you mean 'random_resized_crop'"),
    ({"name": "cutout", "hole": 3}, r"\(cutout\): unknown setting 'hole' — did you mean 'holes'\? \(settings: holes"),
    ({"name": "cutout", "p": 2}, r"\(cutout\): p must be in \[0, 1\], got 2"),
    ({"name": "random_resized_crop", "scale": [0.9, 0.1]}, r"\(random_resized_crop\): scale must be"),
    ({"name": "random_resized_crop", "interpolation": "bilinar"}, "did you mean 'bilinear'"),
    ({"name": "random_resized_crop", "antialias": "maybe"}, "antialias: 'maybe' is not a boolean"),
    ({"name": "random_translate", "diagonal": 3}, "diagonal"),
    ({"name": "random_blur", "kernel_size": 4}, "kernel_size must be odd"),
    ({"name": "random_order", "transforms": [{"name": "fli"}]},
     r"\(random_order\): transforms\[0\]: unknown transform 'fli'"),
    ({"name": "normalization"}, "image_augmentation.mean and image_augmentation.std"),
])
def test_config_errors_name_the_entry_and_the_fix(entry, message):
    with pytest.raises(ValueError, match=message) as err:
        build_transforms([{"name": "random_horizontal_flip"}, entry], "image_augmentation.train")
    assert str(err.value).startswith("image_augmentation.train[1]") and "\n" not in str(err.value)


def test_crop_size_awareness_is_reported():
    assert build("random_resized_crop").uses_crop_size and build("resize").uses_crop_size
    assert not build("center_crop", size=64).uses_crop_size and not build("random_flip").uses_crop_size
