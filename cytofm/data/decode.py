"""Decode any supported image file into an 8-bit RGB ``PIL.Image``.

Every colour mode that Pillow opens ends up as 8-bit RGB:

- L, 1, P, CMYK, YCbCr, LAB and HSV are converted with Pillow's own conversions.
- LA, RGBA and palette images with transparency are composited on white, because a transparent
  pixel in a microscope field is empty glass, which looks white under bright-field light.
- 16-bit and 32-bit integer images (``I;16*``, ``I``) are scaled by the bit depth their values
  actually use: the smallest of 8, 10, 12, 14 or 16 bits (32 for ``I``) that contains the image
  maximum maps to 255. A 12-bit camera frame stored in a 16-bit PNG therefore fills the 8-bit
  range instead of coming out black, and images of one collection keep their relative
  brightness. Float images (``F``) with values in [0, 1] are scaled by 255, others by their
  min-max range.
- 16-bit-per-channel colour files (RGB, RGBA and LA in PNG or TIFF) get the same scaling, from
  the largest colour value; alpha is scaled from its full 16-bit range. Pillow keeps only the
  high byte of each such sample, so the file is decoded a second time with the byte order of
  the raw mode swapped, which yields the low bytes, and the two halves are joined.
- The EXIF orientation tag is applied, and multi-page files (TIFF) yield their first page.

A file that is empty, truncated or not an image raises ``ImageDecodeError`` naming the file and
the reason. A file whose pixel count exceeds ``max_pixels`` raises ``ImageTooLargeError`` (a
subclass) from its header, before any pixel is decoded, so a decompression bomb never reaches
memory.

NOTE: if other code sets Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES``, truncated files decode
with grey fill and are not detected. 16-bit colour TIFFs stored plane by plane (planar
configuration 2) are rejected, because Pillow decodes them into wrong colours.
"""

from __future__ import annotations

import struct
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_MAX_PIXELS = 100_000_000
"""Default pixel-count limit: 100 megapixels, e.g. a 10,000 x 10,000 field. Larger scans
belong in the whole-slide reader, which reads regions instead of whole images."""

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"},
)
"""File name suffixes (lower case) that the folder readers treat as images."""

_EXIF_ORIENTATION_TAG = 0x0112
_ORIENTATION_TRANSPOSE = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT,),
    3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,),
    5: (Image.Transpose.TRANSPOSE,),
    6: (Image.Transpose.ROTATE_270,),
    7: (Image.Transpose.TRANSVERSE,),
    8: (Image.Transpose.ROTATE_90,),
}

# Errors that Pillow's format plugins raise on corrupt or unsupported data.
_DECODER_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    TypeError,
    IndexError,
    KeyError,
    struct.error,
    zlib.error,
)


class ImageDecodeError(Exception):
    """Error for an image file that cannot be decoded, with its ``path`` and the ``reason``."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot decode image {self.path}: {reason}")

    def __reduce__(self):  # keeps the two arguments when sent between DataLoader workers
        return (type(self), (self.path, self.reason))


class ImageTooLargeError(ImageDecodeError):
    """An image whose pixel count is over the configured ``max_pixels`` limit."""


def load_rgb(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read an image file and return it as an 8-bit RGB image.

    Args:
        path: Image file (JPEG, PNG, TIFF, BMP, WebP or any other format Pillow reads).
        max_pixels: Reject images with more pixels than this (width times height), checked from
            the header before decoding. ``None`` disables the check.

    Returns:
        A fully loaded ``PIL.Image`` in mode ``RGB``, orientation fixed from EXIF.

    Raises:
        ImageDecodeError: The file is missing, empty, truncated or not a readable image.
        ImageTooLargeError: The image has more than ``max_pixels`` pixels.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise ImageDecodeError(path, f"cannot read file ({error.strerror or error})") from error
    if size == 0:
        raise ImageDecodeError(path, "empty file (0 bytes)")

    image = _open_checked(path, max_pixels)
    try:
        with image:
            image.seek(0)
            _reject_wide_planar_tiff(path, image)
            # Checked before the EXIF read, which makes Pillow's PNG reader decode the pixels.
            if _has_wide_colour_samples(image):
                rgb = _load_wide_colour(path, image)
            else:
                image.load()
                rgb = to_rgb(image)
            orientation = _exif_orientation(image)
    except ImageDecodeError:
        raise
    except _DECODER_ERRORS as error:
        raise ImageDecodeError(path, _describe(error)) from error
    for method in _ORIENTATION_TRANSPOSE.get(orientation, ()):
        rgb = rgb.transpose(method)
    return rgb


def _open_checked(path: Path, max_pixels: int | None) -> Image.Image:
    # Image.open reads only the header, so the size check runs before any pixel is decoded.
    # Pillow's own bomb check is silenced or converted because ours is the configured one.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(path, f"over Pillow's pixel limit ({error})") from error
    except Image.UnidentifiedImageError as error:
        raise ImageDecodeError(path, "not a recognised image format") from error
    except _DECODER_ERRORS as error:
        raise ImageDecodeError(path, _describe(error)) from error
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        image.close()
        raise ImageTooLargeError(
            path,
            f"{width}x{height} = {width * height:,} pixels is over the limit of {max_pixels:,};"
            " raise max_pixels if the file is trusted, or read it as a whole-slide image",
        )
    if width == 0 or height == 0:
        image.close()
        raise ImageDecodeError(path, f"image has zero size {width}x{height}")
    return image


# Raw mode suffix of the high-byte decode -> suffix that yields the low bytes. Native order
# (";16N", which Pillow uses for compressed TIFFs) is little-endian on common machines.
_BYTE_ORDER_SWAP = {
    ";16B": ";16L",
    ";16L": ";16B",
    ";16N": ";16B" if sys.byteorder == "little" else ";16L",
}


def _tile_rawmode(tile: tuple) -> str | None:
    # Tiles are (codec, extents, offset, args); args is the raw mode or starts with it.
    args = tile[3]
    if isinstance(args, str):
        return args
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return None


def _swap_byte_order(tile: tuple) -> tuple:
    rawmode = _tile_rawmode(tile)
    assert rawmode is not None
    swapped = rawmode[:-4] + _BYTE_ORDER_SWAP[rawmode[-4:]]
    args = swapped if isinstance(tile[3], str) else (swapped, *tile[3][1:])
    return type(tile)(*tile[:3], args) if hasattr(tile, "_fields") else (*tile[:3], args)


_TIFF_BITS_PER_SAMPLE = 258
_TIFF_PLANAR_CONFIGURATION = 284


def _reject_wide_planar_tiff(path: Path, image: Image.Image) -> None:
    tags = getattr(image, "tag_v2", None)
    if image.format != "TIFF" or tags is None or tags.get(_TIFF_PLANAR_CONFIGURATION) != 2:
        return
    bits = tags.get(_TIFF_BITS_PER_SAMPLE, (8,))
    bits = bits if isinstance(bits, tuple) else (bits,)
    if max(bits) > 8 and image.mode in ("RGB", "RGBA"):
        raise ImageDecodeError(
            path,
            f"{max(bits)}-bit colour TIFF stored plane by plane is not supported; convert it "
            "to interleaved samples, e.g. `tiffcp -p contig in.tif out.tif`",
        )


def _has_wide_colour_samples(image: Image.Image) -> bool:
    """Return whether Pillow would reduce the image's 16-bit colour samples to their high byte."""
    if image.mode not in ("RGB", "RGBA", "LA") or not image.tile:
        return False
    rawmodes = [_tile_rawmode(tile) for tile in image.tile]
    if not all(mode is not None and mode[-4:] in _BYTE_ORDER_SWAP for mode in rawmodes):
        return False
    # Grey+alpha is re-read as 8-bit RGBA bytes, which needs an RGBA image of 4-byte pixels.
    return not rawmodes[0].startswith("LA;") or (image.mode == "RGBA" and len(rawmodes) == 1)


def _load_wide_colour(path: Path, image: Image.Image) -> Image.Image:
    # Pillow opens 16-bit grey+alpha PNGs in mode RGBA with raw mode "LA;16B".
    grey = _tile_rawmode(image.tile[0]).startswith("LA;")
    if grey:
        values = _decode_la16_as_bytes(image)
    else:
        # Pillow's unpackers for "RGB;16B" and "RGB;16L" both read 6 bytes per pixel and keep
        # the byte that their byte order marks as high. Decoding with the other byte order
        # therefore returns the low bytes, because decompression and unfiltering are unchanged.
        low_tiles = [_swap_byte_order(tile) for tile in image.tile]
        image.load()
        high = np.asarray(image, dtype=np.uint16)
        with Image.open(path) as second:
            second.seek(0)
            second.tile = low_tiles
            second.load()
            low = np.asarray(second, dtype=np.uint16)
        if low.shape != high.shape:
            raise ImageDecodeError(path, "the two decodes of the 16-bit samples differ in shape")
        values = (high << 8) | low
    colour_channels = 1 if grey else 3
    colour = values[..., :colour_channels]
    full_scale = integer_full_scale(int(colour.max()) if colour.size else 0)
    scaled = np.rint(values * (255.0 / full_scale))
    if values.shape[-1] > colour_channels:  # alpha always spans the full 16 bits
        scaled[..., colour_channels:] = np.rint(values[..., colour_channels:] * (255.0 / 65535))
    eight_bit = np.clip(scaled, 0, 255).astype(np.uint8)
    return to_rgb(Image.fromarray(eight_bit))  # 2, 3 or 4 channels: LA, RGB or RGBA


def _decode_la16_as_bytes(image: Image.Image) -> np.ndarray:
    # Pillow has no low-byte unpacker for "LA;16B". A 16-bit grey+alpha pixel is 4 bytes, as
    # is an 8-bit RGBA pixel, so decoding it as RGBA returns all four bytes unchanged.
    image.tile = [
        type(tile)(*tile[:3], "RGBA") if hasattr(tile, "_fields") else (*tile[:3], "RGBA")
        for tile in image.tile
    ]
    image.load()
    raw = np.asarray(image, dtype=np.uint16)
    return np.stack([(raw[..., 0] << 8) | raw[..., 1], (raw[..., 2] << 8) | raw[..., 3]], -1)


def _exif_orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except _DECODER_ERRORS:
        return 1  # a corrupt EXIF block should not make the pixels unreadable


def _describe(error: BaseException) -> str:
    message = str(error).strip()
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a loaded image of any Pillow mode to 8-bit RGB (see the module docstring)."""
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        gray = _scale_to_uint8(np.asarray(image), mode)
        return Image.fromarray(gray).convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("PA",):
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("LA", "La", "RGBA", "RGBa"):
        return _composite_on_white(image)
    return image.convert("RGB")


def _composite_on_white(image: Image.Image) -> Image.Image:
    if image.mode in ("La", "RGBa"):  # premultiplied alpha
        image = image.convert("RGBA")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    if mode == "F":
        values = values.astype(np.float64)
        finite = values[np.isfinite(values)]
        low = float(finite.min()) if finite.size else 0.0
        high = float(finite.max()) if finite.size else 1.0
        if low >= 0.0 and high <= 1.0:
            low, high = 0.0, 1.0
        scaled = (np.nan_to_num(values, nan=low) - low) / max(high - low, 1e-12)
        return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)

    values = values.astype(np.int64)
    values = np.clip(values, 0, None)  # signed 32-bit images may hold negatives; treat as black
    full_scale = integer_full_scale(int(values.max()) if values.size else 0)
    return np.rint(values * (255.0 / full_scale)).astype(np.uint8)


def integer_full_scale(maximum: int) -> int:
    """Return the full-scale value of the smallest common bit depth holding ``maximum``.

    Depths tried are 8, 10, 12, 14, 16 and 32 bits, so 4095 gives 4095 and 4096 gives 16383.
    """
    for bits in (8, 10, 12, 14, 16, 32):
        if maximum <= (1 << bits) - 1:
            return (1 << bits) - 1
    return maximum
