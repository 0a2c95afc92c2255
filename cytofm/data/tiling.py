"""Grid tiling of images and the background (empty glass) filter shared by all tilers.

Tile sizes and strides are given in pixels at the target scale (output pixels per source
pixel); boxes are always reported in source-image pixels, so a tile can be found again in the
original file whatever scale it was read at.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]
"""``(x0, y0, x1, y1)`` in source-image pixels, ``x1``/``y1`` exclusive."""

WHITE = (255, 255, 255)


@dataclass(frozen=True)
class BackgroundFilter:
    """Rule that marks a tile as empty glass.

    A pixel counts as glass when its brightest channel is at least ``min_brightness`` and its
    saturation ``(max - min) / max`` is at most ``max_saturation``: bright-field glass is bright
    and grey, while stained cells are darker or coloured. A tile whose glass share is above
    ``max_glass_fraction`` is dropped; ``max_glass_fraction=1.0`` keeps every tile.
    """

    max_glass_fraction: float = 0.9
    min_brightness: int = 210
    max_saturation: float = 0.12

    def glass_mask(self, tile: Image.Image | np.ndarray) -> np.ndarray:
        """Return a boolean ``[H, W]`` array that is True where an RGB image shows glass."""
        pixels = np.asarray(tile)
        if pixels.ndim != 3 or pixels.shape[2] < 3:
            raise ValueError(f"expected an RGB tile of shape [H, W, 3], got {pixels.shape}")
        pixels = pixels[..., :3].astype(np.int16)
        brightest = pixels.max(axis=2)
        darkest = pixels.min(axis=2)
        saturation = (brightest - darkest) / np.maximum(brightest, 1)
        return (brightest >= self.min_brightness) & (saturation <= self.max_saturation)

    def glass_fraction(self, tile: Image.Image | np.ndarray) -> float:
        """Return the share of pixels in an RGB tile that look like empty glass."""
        glass = self.glass_mask(tile)
        return float(glass.mean()) if glass.size else 1.0

    def is_background(self, tile: Image.Image | np.ndarray) -> bool:
        """Return whether the tile should be dropped as empty glass."""
        if self.max_glass_fraction >= 1.0:
            return False
        return self.glass_fraction(tile) > self.max_glass_fraction


def grid_starts(length: int, tile: int, stride: int, include_edge: bool = True) -> list[int]:
    """Return tile start offsets along one axis of ``length`` pixels.

    Full tiles start at ``0, stride, 2 * stride, ...``. With ``include_edge``, one more tile
    flush with the far edge is added when the grid stops short of it, so every pixel is
    covered. A side shorter than ``tile`` gives a single start at 0 (the tile is then padded).
    """
    if tile < 1 or stride < 1:
        raise ValueError(f"tile size and stride must be positive, got {tile} and {stride}")
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if include_edge and starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def grid_boxes(
    width: int, height: int, tile: int, stride: int, include_edge: bool = True
) -> list[Box]:
    """Return the tile boxes of a ``width`` x ``height`` image, row by row."""
    xs = grid_starts(width, tile, stride, include_edge)
    ys = grid_starts(height, tile, stride, include_edge)
    return [(x, y, x + tile, y + tile) for y in ys for x in xs]


def crop_padded(image: Image.Image, box: Box, fill: tuple[int, int, int] = WHITE) -> Image.Image:
    """Crop ``box`` from an RGB image, filling the part outside the image with ``fill``."""
    x0, y0, x1, y1 = box
    width, height = image.size
    if x0 >= 0 and y0 >= 0 and x1 <= width and y1 <= height:
        return image.crop(box)
    canvas = Image.new("RGB", (x1 - x0, y1 - y0), fill)
    inner = (max(x0, 0), max(y0, 0), min(x1, width), min(y1, height))
    if inner[0] < inner[2] and inner[1] < inner[3]:
        canvas.paste(image.crop(inner), (inner[0] - x0, inner[1] - y0))
    return canvas


def resize_to_scale(image: Image.Image, scale: float) -> Image.Image:
    """Resize by ``scale`` (output pixels per input pixel) with a box-filtered reduction."""
    if scale <= 0 or not math.isfinite(scale):
        raise ValueError(f"scale must be a positive number, got {scale}")
    if scale == 1.0:
        return image
    width, height = image.size
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC
    return image.resize(size, resample)


def iter_grid_tiles(
    image: Image.Image,
    tile_size: int,
    stride: int | None = None,
    *,
    scale: float = 1.0,
    include_edge: bool = True,
    background: BackgroundFilter | None = None,
) -> Iterator[tuple[Image.Image, Box]]:
    """Yield ``(tile, box)`` over an RGB image tiled on a grid.

    Args:
        image: Source image in RGB.
        tile_size: Tile side in pixels at the target scale.
        stride: Step between tiles at the target scale; defaults to ``tile_size``.
        scale: Target scale, output pixels per source pixel (0.5 halves the image).
        include_edge: Add tiles flush with the right and bottom edges (see ``grid_starts``).
        background: Drops glass tiles; ``None`` keeps all.

    Yields:
        The ``tile_size`` x ``tile_size`` tile and its box in source-image pixels. A box may
        extend past the image when the image is smaller than one tile; that part is white.
    """
    stride = tile_size if stride is None else stride
    scaled = resize_to_scale(image, scale)
    for box in grid_boxes(*scaled.size, tile_size, stride, include_edge):
        tile = crop_padded(scaled, box)
        if background is not None and background.is_background(tile):
            continue
        yield tile, scale_box(box, 1.0 / scale)


def scale_box(box: Box, factor: float) -> Box:
    """Multiply box coordinates by ``factor`` and round to whole pixels."""
    if factor == 1.0:
        return box
    return tuple(round(value * factor) for value in box)  # type: ignore[return-value]
