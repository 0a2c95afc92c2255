"""Decoding of every colour mode, bit depth and broken file into 8-bit RGB."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cytofm.data.decode import (
    ImageDecodeError,
    ImageTooLargeError,
    integer_full_scale,
    load_rgb,
)
from tests.wide_samples import png16, tiff16


def test_gray16_png_12bit_range_scaled(tmp_path):
    values = np.zeros((8, 8), dtype=np.uint16)
    values[0, 0] = 4095
    values[0, 1] = 2048
    values[0, 2] = 1000
    path = tmp_path / "gray12.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"

    image = load_rgb(path)
    pixels = np.asarray(image)
    assert image.mode == "RGB"
    assert pixels.dtype == np.uint8
    assert tuple(pixels[0, 0]) == (255, 255, 255)
    assert pixels[0, 1, 0] == round(2048 * 255 / 4095)
    assert pixels[0, 2, 0] == round(1000 * 255 / 4095)
    assert pixels[1, 1, 0] == 0


def test_gray16_full_range_scaled(tmp_path):
    values = np.array([[65535, 32768], [0, 256]], dtype=np.uint16)
    path = tmp_path / "gray16.tif"
    Image.fromarray(values).save(path)
    pixels = np.asarray(load_rgb(path))[..., 0]
    assert pixels[0, 0] == 255
    assert pixels[0, 1] == round(32768 * 255 / 65535)
    assert pixels[1, 1] == 1


def test_integer_full_scale_table():
    assert integer_full_scale(200) == 255
    assert integer_full_scale(1023) == 1023
    assert integer_full_scale(4095) == 4095
    assert integer_full_scale(4096) == 16383
    assert integer_full_scale(65535) == 65535


def test_rgba_composited_on_white(tmp_path):
    pixels = np.zeros((2, 3, 4), dtype=np.uint8)
    pixels[0, 0] = (200, 0, 0, 0)  # transparent red: glass
    pixels[0, 1] = (200, 0, 0, 255)  # opaque red
    pixels[0, 2] = (0, 0, 0, 128)  # half-transparent black
    path = tmp_path / "rgba.png"
    Image.fromarray(pixels, "RGBA").save(path)

    rgb = np.asarray(load_rgb(path))
    assert tuple(rgb[0, 0]) == (255, 255, 255)
    assert tuple(rgb[0, 1]) == (200, 0, 0)
    expected = round(255 * (1 - 128 / 255))
    assert all(abs(int(value) - expected) <= 1 for value in rgb[0, 2])


def test_la_composited_on_white(tmp_path):
    pixels = np.array([[[50, 0], [50, 255]]], dtype=np.uint8)
    path = tmp_path / "la.png"
    Image.fromarray(pixels, "LA").save(path)
    rgb = np.asarray(load_rgb(path))
    assert tuple(rgb[0, 0]) == (255, 255, 255)
    assert tuple(rgb[0, 1]) == (50, 50, 50)


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)
    rgb = np.asarray(load_rgb(path))
    assert tuple(rgb[0, 0]) == (255, 255, 255)
    assert tuple(rgb[0, 1]) == (200, 100, 50)


def test_palette_without_transparency(tmp_path):
    image = Image.new("P", (1, 1))
    image.putpalette([10, 20, 30] + [0] * 765)
    path = tmp_path / "palette.bmp"
    image.save(path)
    assert tuple(np.asarray(load_rgb(path))[0, 0]) == (10, 20, 30)


def test_grayscale_l_replicated(tmp_path):
    path = tmp_path / "gray.png"
    Image.fromarray(np.full((3, 3), 77, dtype=np.uint8), "L").save(path)
    assert tuple(np.asarray(load_rgb(path))[1, 1]) == (77, 77, 77)


def test_cmyk_converted(tmp_path):
    pixels = np.array([[[0, 0, 0, 0], [0, 255, 255, 0], [0, 0, 0, 255]]], dtype=np.uint8)
    path = tmp_path / "cmyk.tif"
    Image.fromarray(pixels, "CMYK").save(path)
    rgb = np.asarray(load_rgb(path))
    assert tuple(rgb[0, 0]) == (255, 255, 255)
    assert tuple(rgb[0, 1]) == (255, 0, 0)
    assert tuple(rgb[0, 2]) == (0, 0, 0)


def test_float_image_unit_range(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F").save(path)
    rgb = np.asarray(load_rgb(path))[0, :, 0]
    assert list(rgb) == [0, 128, 255]


def _left_red_right_blue(width: int = 40, height: int = 20) -> Image.Image:
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_exif_orientation_applied(tmp_path, suffix):
    image = _left_red_right_blue()
    exif = Image.Exif()
    exif[0x0112] = 6  # display needs a 90 degree clockwise turn
    path = tmp_path / f"rotated{suffix}"
    image.save(path, exif=exif.tobytes(), **({"quality": 95} if suffix == ".jpg" else {}))

    rgb = load_rgb(path)
    assert rgb.size == (20, 40)
    pixels = np.asarray(rgb).astype(int)
    # Turning clockwise moves the left (red) half to the top.
    assert pixels[5, 10, 0] > 200
    assert pixels[5, 10, 2] < 60
    assert pixels[35, 10, 2] > 200
    assert pixels[35, 10, 0] < 60


def test_multipage_tiff_first_page(tmp_path):
    first = Image.new("RGB", (4, 4), (255, 0, 0))
    second = Image.new("RGB", (4, 4), (0, 0, 255))
    path = tmp_path / "pages.tif"
    first.save(path, save_all=True, append_images=[second])
    assert Image.open(path).n_frames == 2
    assert tuple(np.asarray(load_rgb(path))[0, 0]) == (255, 0, 0)


@pytest.mark.parametrize("suffix,options", [(".bmp", {}), (".webp", {"lossless": True})])
def test_bmp_webp_round_trip(tmp_path, suffix, options):
    pixels = np.random.default_rng(0).integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    path = tmp_path / f"image{suffix}"
    Image.fromarray(pixels).save(path, **options)
    np.testing.assert_array_equal(np.asarray(load_rgb(path)), pixels)


def test_truncated_jpeg_raises(tmp_path):
    path = tmp_path / "truncated.jpg"
    buffer = tmp_path / "full.jpg"
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, quality=90)
    data = buffer.read_bytes()
    path.write_bytes(data[: len(data) * 7 // 10])
    with pytest.raises(ImageDecodeError) as error:
        load_rgb(path)
    assert error.value.path == path
    assert "truncated" in error.value.reason.lower()


def test_zero_byte_file_raises(tmp_path):
    path = tmp_path / "empty.png"
    path.touch()
    with pytest.raises(ImageDecodeError, match="empty file"):
        load_rgb(path)


def test_text_named_png_raises(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageDecodeError, match="not a recognised image"):
        load_rgb(path)


def test_missing_file_raises(tmp_path):
    with pytest.raises(ImageDecodeError, match="cannot read file"):
        load_rgb(tmp_path / "absent.png")


def test_pixel_limit_rejects(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 60)).save(path)
    with pytest.raises(ImageTooLargeError, match="6,000 pixels is over the limit of 5,999"):
        load_rgb(path, max_pixels=5999)
    assert load_rgb(path, max_pixels=6000).size == (100, 60)


def test_decode_error_pickles():
    import pickle

    error = pickle.loads(pickle.dumps(ImageDecodeError("/a b/c.png", "bad")))
    assert str(error.path) == "/a b/c.png"
    assert error.reason == "bad"


def _expected_8bit(values: np.ndarray, full_scale: int) -> np.ndarray:
    return np.rint(values * (255.0 / full_scale)).astype(np.uint8)


@pytest.mark.parametrize("filter_kind", [0, 1, 2, 4])
def test_rgb16_png_12bit_range_scaled(tmp_path, filter_kind):
    values = np.random.default_rng(filter_kind).integers(0, 4096, size=(5, 6, 3))
    values[0, 0] = (4095, 17, 256)  # the maximum sets the scale; 256 has a zero low byte
    path = tmp_path / "rgb12.png"
    path.write_bytes(png16(values, filter_kind))
    assert Image.open(path).mode == "RGB"  # Pillow's own reading keeps only the high byte

    pixels = np.asarray(load_rgb(path))
    np.testing.assert_array_equal(pixels, _expected_8bit(values, 4095))
    assert tuple(pixels[0, 0]) == (255, 1, 16)


def test_rgb16_png_full_range(tmp_path):
    values = np.array([[[65535, 32768, 0], [1, 255, 256]]])
    path = tmp_path / "rgb16.png"
    path.write_bytes(png16(values))
    pixels = np.asarray(load_rgb(path))
    np.testing.assert_array_equal(pixels, _expected_8bit(values, 65535))


def test_rgba16_png_alpha_from_full_range(tmp_path):
    # 12-bit colour, 16-bit alpha: opaque red, fully transparent, half transparent black.
    values = np.array([[[4095, 0, 0, 65535], [0, 4095, 0, 0], [0, 0, 0, 32768]]])
    path = tmp_path / "rgba16.png"
    path.write_bytes(png16(values))
    pixels = np.asarray(load_rgb(path)).astype(int)
    assert tuple(pixels[0, 0]) == (255, 0, 0)
    assert tuple(pixels[0, 1]) == (255, 255, 255)  # transparent shows the white glass
    assert np.all(np.abs(pixels[0, 2] - 127) <= 1)


def test_la16_png_scaled_and_composited(tmp_path):
    values = np.array([[[1000, 65535], [4095, 65535], [0, 0]]])
    path = tmp_path / "la16.png"
    path.write_bytes(png16(values))
    pixels = np.asarray(load_rgb(path))
    assert tuple(pixels[0, 0]) == (round(1000 * 255 / 4095),) * 3
    assert tuple(pixels[0, 1]) == (255, 255, 255)
    assert tuple(pixels[0, 2]) == (255, 255, 255)


@pytest.mark.parametrize("deflate", [False, True])
@pytest.mark.parametrize("byte_order", ["<", ">"])
@pytest.mark.parametrize("channels", [3, 4])
def test_rgb16_tiff_scaled(tmp_path, byte_order, channels, deflate):
    values = np.random.default_rng(channels).integers(0, 1024, size=(4, 5, channels))
    values[1, 2, :3] = 1023  # 10-bit camera
    if channels == 4:
        values[..., 3] = 65535
    path = tmp_path / "rgb10.tif"
    path.write_bytes(tiff16(values, byte_order, deflate=deflate))
    pixels = np.asarray(load_rgb(path))
    np.testing.assert_array_equal(pixels, _expected_8bit(values[..., :3], 1023))


def test_rgb16_planar_tiff_rejected(tmp_path):
    values = np.random.default_rng(0).integers(0, 4096, size=(4, 5, 3))
    path = tmp_path / "planar.tif"
    path.write_bytes(tiff16(values, planar=True))
    with pytest.raises(ImageDecodeError, match="planar.tif.*stored plane by plane"):
        load_rgb(path)
