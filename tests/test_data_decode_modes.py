"""decode_image turns every PIL colour mode into the 8-bit RGB it means, or refuses the file by name.

Expected pixels are computed here with numpy from the array the file was written from, not
with PIL's conversions (which clip 16-bit values to white and ignore transparency).
"""
import numpy as np
import pytest
from PIL import Image

from data.base import CorruptImageError, decode_image

S = 64
rng = np.random.default_rng(23)


def _gray3(gray):
    return np.repeat(np.asarray(gray, np.uint8)[..., None], 3, axis=2)


def _over_black(rgb, alpha):
    return np.rint(rgb.astype(np.float64) * alpha[..., None].astype(np.float64) / 255).astype(np.uint8)


def test_16_bit_grayscale_png_is_scaled_not_saturated(tmp_path):
    values = rng.integers(0, 65536, (S, S)).astype(np.uint16)
    values[0, :2] = (32 * 257, 128 * 257)  # what a saturating decoder shows as [255, 255]
    path = str(tmp_path / "gray16.png")
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    pixels = decode_image(path)
    assert pixels[0, :2, 0].tolist() == [32, 128]
    assert np.array_equal(pixels, _gray3(np.rint(values / 257.0)))


def test_16_bit_big_endian_tiff_is_scaled(tmp_path):
    values = rng.integers(0, 65536, (S, S)).astype(">u2")
    path = str(tmp_path / "gray16be.tif")
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I;16")
    assert np.array_equal(decode_image(path), _gray3(np.rint(values.astype(np.float64) / 257.0)))


def test_32_bit_integer_image_in_16_bit_range_is_scaled(tmp_path):
    values = rng.integers(0, 65536, (S, S)).astype(np.int32)
    path = str(tmp_path / "gray32.tif")
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I"
    assert np.array_equal(decode_image(path), _gray3(np.rint(values / 257.0)))


def test_32_bit_integer_image_beyond_16_bits_is_refused_by_name(tmp_path):
    values = np.full((S, S), 70000, np.int32)
    path = str(tmp_path / "wide.tif")
    Image.fromarray(values).save(path)
    with pytest.raises(CorruptImageError, match=f"cannot decode image {path} .*mode I.*beyond 16 bits"):
        decode_image(path)


def test_float_image_is_refused_by_name(tmp_path):
    path = str(tmp_path / "float.tif")
    Image.fromarray(rng.random((S, S)).astype(np.float32)).save(path)
    assert Image.open(path).mode == "F"
    with pytest.raises(CorruptImageError, match=f"cannot decode image {path} .*mode F.*8-bit") as err:
        decode_image(path)
    assert "\n" not in str(err.value)


def test_lab_image_is_refused_by_name(tmp_path):
    path = str(tmp_path / "lab.tif")
    Image.fromarray(rng.integers(0, 256, (S, S, 3), dtype=np.uint8), "LAB").save(path)
    assert Image.open(path).mode == "LAB"
    with pytest.raises(CorruptImageError, match=f"cannot decode image {path} .*mode LAB"):
        decode_image(path)


def test_rgba_is_composited_over_black(tmp_path):
    rgba = rng.integers(0, 256, (S, S, 4), dtype=np.uint8)
    rgba[0, 0] = (250, 10, 200, 0)  # colour hidden under full transparency
    path = str(tmp_path / "rgba.png")
    Image.fromarray(rgba, "RGBA").save(path)
    pixels = decode_image(path)
    assert pixels[0, 0].tolist() == [0, 0, 0]
    assert np.array_equal(pixels, _over_black(rgba[..., :3], rgba[..., 3]))


def test_gray_with_alpha_is_composited_over_black(tmp_path):
    la = rng.integers(0, 256, (S, S, 2), dtype=np.uint8)
    path = str(tmp_path / "la.png")
    Image.fromarray(la, "LA").save(path)
    assert np.array_equal(decode_image(path), _over_black(_gray3(la[..., 0]), la[..., 1]))


def _palette_image():
    """(a "P" image of random indices into a random palette, its palette, its indices)."""
    palette, index = rng.integers(0, 256, (256, 3), dtype=np.uint8), rng.integers(0, 256, (S, S), dtype=np.uint8)
    img = Image.fromarray(index, "P")
    img.putpalette(palette.flatten().tolist())
    return img, palette, index


def test_palette_with_a_transparent_index_makes_it_black(tmp_path):
    img, palette, index = _palette_image()
    path = str(tmp_path / "p_transparent.png")
    img.save(path, transparency=int(index[0, 0]))
    expected = palette[index].copy()
    expected[index == index[0, 0]] = 0
    assert np.array_equal(decode_image(path), expected)


def test_palette_with_per_entry_alpha_is_composited(tmp_path):
    img, palette, index = _palette_image()
    alpha = rng.integers(0, 256, 256, dtype=np.uint8)
    path = str(tmp_path / "p_alpha.png")
    img.save(path, transparency=alpha.tobytes())
    assert isinstance(Image.open(path).info["transparency"], bytes)
    assert np.array_equal(decode_image(path), _over_black(palette[index], alpha[index]))


def test_grayscale_png_with_a_transparent_value_makes_it_black(tmp_path):
    gray = rng.integers(0, 256, (S, S), dtype=np.uint8)
    path = str(tmp_path / "l_trns.png")
    Image.fromarray(gray, "L").save(path, transparency=int(gray[0, 0]))
    expected = _gray3(gray)
    expected[gray == gray[0, 0]] = 0
    assert np.array_equal(decode_image(path), expected)


def test_palette_without_transparency_is_its_palette_colours(tmp_path):
    img, palette, index = _palette_image()
    path = str(tmp_path / "p.png")
    img.save(path)
    assert np.array_equal(decode_image(path), palette[index])


def test_cmyk_follows_the_subtractive_formula(tmp_path):
    cmyk = rng.integers(0, 256, (S, S, 4), dtype=np.uint8)
    path = str(tmp_path / "cmyk.tif")
    Image.fromarray(cmyk, "CMYK").save(path)
    c = cmyk.astype(np.float64)
    expected = np.rint((255 - c[..., :3]) * (255 - c[..., 3:]) / 255).astype(np.uint8)
    assert np.array_equal(decode_image(path), expected)


def test_bilevel_is_black_and_white(tmp_path):
    bits = rng.integers(0, 2, (S, S)).astype(bool)
    path = str(tmp_path / "bits.png")
    Image.fromarray(bits).save(path)
    assert Image.open(path).mode == "1"
    assert np.array_equal(decode_image(path), _gray3(bits * 255))


def test_grayscale_and_rgb_are_kept_exactly(tmp_path):
    gray = rng.integers(0, 256, (S, S), dtype=np.uint8)
    rgb = rng.integers(0, 256, (S, S, 3), dtype=np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "l.png")
    Image.fromarray(rgb, "RGB").save(tmp_path / "rgb.png")
    assert np.array_equal(decode_image(str(tmp_path / "l.png")), _gray3(gray))
    assert np.array_equal(decode_image(str(tmp_path / "rgb.png")), rgb)
