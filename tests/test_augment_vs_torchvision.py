"""rand_augment, trivial_augment and random_erasing against torchvision: every output is one of the
ops of the RandAugment / TrivialAugment papers at their magnitudes, computed with torchvision's
functional ops on the single image; erasing boxes follow torchvision's RandomErasing."""
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as TF

from data.transforms import build_transform


def images(n, size, seed=0):
    """float [n, 3, size, size] in [0.05, 0.95] on 256 levels: every op changes such an image."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(13, 243, (n, 3, size, size), generator=g).float() / 255).contiguous()


def _affine(image, **kw):
    base = dict(angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, 0.0], interpolation=v2.InterpolationMode.NEAREST)
    return TF.affine(image, **{**base, **kw})


# The op table of each method, written from the papers (Cubuk et al. 2020, table of RandAugment's
# 14 ops; Mueller & Hutter 2021, TrivialAugment "wide" ranges): name -> (op(image, magnitude),
# the magnitude of bin k of n for a side of `size` pixels (None: no magnitude), signed).
def _space(wide):
    shear, translate, rotate, enhance = (0.99, None, 135.0, 0.99) if wide else (0.3, 150.0 / 331.0, 30.0, 0.9)
    posterize_levels = 6 if wide else 4
    return {
        "Identity": (lambda x, m: x, None, False),
        "ShearX": (lambda x, m: _affine(x, shear=[math.degrees(math.atan(m)), 0.0], center=[0, 0]),
                   lambda k, n, size: shear * k / (n - 1), True),
        "ShearY": (lambda x, m: _affine(x, shear=[0.0, math.degrees(math.atan(m))], center=[0, 0]),
                   lambda k, n, size: shear * k / (n - 1), True),
        "TranslateX": (lambda x, m: _affine(x, translate=[int(m), 0]),
                       lambda k, n, size: (32.0 if wide else translate * size) * k / (n - 1), True),
        "TranslateY": (lambda x, m: _affine(x, translate=[0, int(m)]),
                       lambda k, n, size: (32.0 if wide else translate * size) * k / (n - 1), True),
        "Rotate": (lambda x, m: TF.rotate(x, m, interpolation=v2.InterpolationMode.NEAREST),
                   lambda k, n, size: rotate * k / (n - 1), True),
        "Brightness": (lambda x, m: TF.adjust_brightness(x, 1 + m), lambda k, n, size: enhance * k / (n - 1), True),
        "Color": (lambda x, m: TF.adjust_saturation(x, 1 + m), lambda k, n, size: enhance * k / (n - 1), True),
        "Contrast": (lambda x, m: TF.adjust_contrast(x, 1 + m), lambda k, n, size: enhance * k / (n - 1), True),
        "Sharpness": (lambda x, m: TF.adjust_sharpness(x, 1 + m), lambda k, n, size: enhance * k / (n - 1), True),
        "Posterize": (lambda x, m: TF.posterize(x, int(m)),
                      lambda k, n, size: 8 - round(k * posterize_levels / (n - 1)), False),
        "Solarize": (lambda x, m: TF.solarize(x, m), lambda k, n, size: 1.0 - k / (n - 1), False),
        "AutoContrast": (lambda x, m: TF.autocontrast(x), None, False),
        "Equalize": (lambda x, m: TF.equalize(x), None, False),
    }


def candidates(image, space, bins, num_bins):
    """(op name, output) of every op of `space` at each magnitude bin in `bins`, both signs."""
    size = image.shape[-1]
    out = []
    for name, (op, magnitude, signed) in space.items():
        if magnitude is None:
            out.append((name, op(image, 0.0)))
            continue
        for k in bins:
            m = magnitude(k, num_bins, size)
            for sign in ((1, -1) if signed and m else (1,)):
                out.append((name, op(image, sign * m)))
    return out


def matching_ops(output, image, space, bins, num_bins):
    return {name for name, candidate in candidates(image, space, bins, num_bins)
            if torch.allclose(output, candidate, atol=1e-5)}


def test_rand_augment_applies_one_of_the_14_ops_at_magnitude_9_of_31():
    augment = build_transform({"name": "rand_augment", "num_ops": 1, "magnitude": 9}, "t")
    batch = images(140, 24)
    out = augment(batch, 24, np.random.default_rng(0))
    space, seen = _space(wide=False), set()
    for b in range(len(batch)):
        names = matching_ops(out[b], batch[b], space, [9], 31)
        assert names, f"sample {b} is no RandAugment op at magnitude 9"
        seen |= names
    assert seen == set(space)  # every op of the paper's list is drawn, and no other


def test_rand_augment_chains_num_ops_ops():
    augment = build_transform({"name": "rand_augment", "num_ops": 2, "magnitude": 5, "num_magnitude_bins": 11}, "t")
    batch = images(3, 16, seed=1)
    out = augment(batch, 16, np.random.default_rng(1))
    space = _space(wide=False)
    for b in range(len(batch)):
        firsts = [first for _, first in candidates(batch[b], space, [5], 11)]
        assert any(matching_ops(out[b], first, space, [5], 11) for first in firsts)


def test_trivial_augment_applies_one_op_at_a_random_magnitude_of_the_wide_ranges():
    num_bins = 5
    augment = build_transform({"name": "trivial_augment", "num_magnitude_bins": num_bins}, "t")
    batch = images(100, 40, seed=2)
    out = augment(batch, 40, np.random.default_rng(2))
    space, seen = _space(wide=True), set()
    for b in range(len(batch)):
        names = matching_ops(out[b], batch[b], space, range(num_bins), num_bins)
        assert names, f"sample {b} is no TrivialAugmentWide op"
        seen |= names
    assert seen == set(space)


# ----------------------------------------------------------------------------- random erasing
def _tv_boxes(n, size, scale, ratio):
    """(h, w) of torchvision's RandomErasing draws; (0, 0) where it erases nothing."""
    erase = v2.RandomErasing(p=1.0, scale=scale, ratio=ratio)
    torch.manual_seed(0)
    out = []
    for _ in range(n):
        params = erase.make_params([torch.zeros(3, size, size)])
        out.append((params["h"], params["w"]) if params["v"] is not None else (0, 0))
    return np.array(out, dtype=float)


def _our_boxes(n, size, scale, ratio):
    erase = build_transform({"name": "random_erasing", "p": 1.0, "scale": list(scale), "ratio": list(ratio)}, "t")
    params = erase.draw(np.random.default_rng(0), n, size, size, size)
    boxes, active = params["boxes"][:, 0], params["active"][:, 0]
    return np.where(active[:, None], boxes[:, 2:4], 0.0)  # (h, w)


@pytest.mark.parametrize("scale, ratio", [((0.02, 0.33), (2.0, 4.0)), ((0.02, 0.33), (0.3, 3.3)),
                                          ((0.5, 0.99), (0.3, 3.3))])
def test_random_erasing_boxes_follow_torchvisions_rule(scale, ratio):
    n, size = 3000, 32
    ours, theirs = _our_boxes(n, size, scale, ratio), _tv_boxes(n, size, scale, ratio)

    def stats(hw):
        found = hw[:, 0] > 0
        h, w = hw[found, 0], hw[found, 1]
        return found.mean(), (h * w).mean() / size ** 2, np.log(h / w).mean(), (h > w).mean()

    (f_ours, area_ours, log_ours, tall_ours), (f_tv, area_tv, log_tv, tall_tv) = stats(ours), stats(theirs)
    assert abs(f_ours - f_tv) <= 5 * math.sqrt(max(f_tv * (1 - f_tv), 1e-4) / n)  # how often no box fits
    assert abs(area_ours - area_tv) <= 0.02
    assert abs(log_ours - log_tv) <= 0.06  # aspect ratio h/w, as torchvision means `ratio`
    assert abs(tall_ours - tall_tv) <= 0.05
    found = ours[:, 0] > 0
    assert (ours[found] < size).all()  # never the whole height or width, as torchvision


def test_random_erasing_fills_the_drawn_box_as_torchvisions_erase():
    erase = build_transform({"name": "random_erasing", "p": 1.0, "value": 0.25}, "t")
    batch = images(8, 20, seed=3)
    params = erase.draw(np.random.default_rng(3), 8, 20, 20, 20)
    out = erase.apply(batch, params)
    for b in range(8):
        top, left, h, w = (int(v) for v in params["boxes"][b, 0])
        expected = TF.erase(batch[b], top, left, h, w, torch.tensor(0.25)) if params["active"][b, 0] else batch[b]
        assert torch.equal(out[b], expected)

