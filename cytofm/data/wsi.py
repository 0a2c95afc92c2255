"""Whole-slide images: tiling at a chosen magnification (optional extra ``cytofm[wsi]``).

OpenSlide is imported only when a slide is opened, so the rest of CytoFM works without it.
Everything else here reads the slide through the small ``SlideLike`` interface that
``openslide.OpenSlide`` provides, which lets tests use a fake slide.

Magnification arithmetic: a tile at ``magnification`` M on a slide scanned at base
magnification B covers ``tile_size * B / M`` level-0 pixels. It is read from the deepest
pyramid level whose downsample does not exceed ``B / M`` (so no detail is invented) and
resized by the remaining factor. Boxes are reported in level-0 pixels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from cytofm.data.tiling import BackgroundFilter, Box, grid_starts

logger = logging.getLogger(__name__)

SLIDE_EXTENSIONS = frozenset(
    {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".tif", ".tiff", ".svslide"}
)
"""Suffixes OpenSlide reads (generic TIFF included)."""

MICRONS_PER_PIXEL_AT_40X = 0.25
"""Common convention used to infer magnification from pixel size when a slide lacks it."""


class SlideLike(Protocol):
    """The part of ``openslide.OpenSlide`` that the tiler uses."""

    level_count: int
    level_dimensions: Sequence[tuple[int, int]]
    level_downsamples: Sequence[float]
    properties: Mapping[str, str]

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> Image.Image: ...


def open_slide(path: str | Path) -> Any:
    """Open a whole-slide image with OpenSlide.

    Raises:
        ImportError: openslide-python or the OpenSlide library is not installed.
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    try:
        import openslide
    except ImportError as error:  # also covers a missing OpenSlide shared library
        raise ImportError(
            f"reading whole-slide image {path} needs OpenSlide, which is not installed: "
            "run `pip install cytofm[wsi]` (installs openslide-python and openslide-bin)"
        ) from error
    if not path.is_file():
        raise FileNotFoundError(f"slide not found: {path}")
    return openslide.OpenSlide(str(path))


def _positive_number(text: str | None) -> float | None:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def base_magnification(slide: SlideLike, default: float | None = None) -> float:
    """Return the objective magnification of level 0.

    Read from ``openslide.objective-power``; else inferred from ``openslide.mpp-x``
    (0.25 um/px taken as 40x); else ``default``. A value that is not a positive number counts
    as missing.

    Raises:
        ValueError: The slide records neither and no ``default`` is given.
    """
    properties = slide.properties
    power = _positive_number(properties.get("openslide.objective-power"))
    if power is not None:
        return power
    microns = _positive_number(properties.get("openslide.mpp-x"))
    if microns is not None:
        return 40.0 * MICRONS_PER_PIXEL_AT_40X / microns
    if default is not None:
        return float(default)
    raise ValueError(
        "slide records neither objective power nor microns per pixel; set base_magnification "
        "in the config to the scanner's objective (e.g. 40)"
    )


@dataclass(frozen=True)
class LevelPlan:
    """How to read tiles at a target magnification.

    Attributes:
        level: Pyramid level to read from.
        downsample: Level-0 pixels per output pixel (base magnification / target).
        level_downsample: Downsample of ``level`` itself.
        read_scale: Output pixels per pixel read at ``level`` (at most 1).
    """

    level: int
    downsample: float
    level_downsample: float
    read_scale: float


def plan_level(
    slide: SlideLike, magnification: float | None, base: float | None = None
) -> LevelPlan:
    """Choose the pyramid level and the residual resize for ``magnification``.

    ``magnification=None`` reads level 0 at full resolution and needs no base magnification.
    ``base`` is the level-0 magnification used only when the slide records neither objective
    power nor microns per pixel (see ``base_magnification``); the same holds for the ``base``
    argument of the other functions here.

    Raises:
        ValueError: ``magnification`` exceeds the slide's base magnification, or the slide
            records no magnification and ``base`` is None.
    """
    if magnification is None:
        return LevelPlan(0, 1.0, float(slide.level_downsamples[0]), 1.0)
    base = base_magnification(slide, default=base)
    if magnification <= 0:
        raise ValueError(f"magnification must be positive, got {magnification}")
    downsample = base / magnification
    if downsample < 1.0 - 1e-6:
        raise ValueError(
            f"magnification {magnification}x is above the slide's base {base:g}x; "
            f"choose {base:g}x or lower"
        )
    level = 0
    for candidate, level_downsample in enumerate(slide.level_downsamples):
        # A small tolerance accepts levels whose stored downsample is 4.0001 for a 4x request.
        if level_downsample <= downsample * (1 + 1e-3):
            level = candidate
    level_downsample = float(slide.level_downsamples[level])
    return LevelPlan(level, downsample, level_downsample, min(1.0, level_downsample / downsample))


def slide_tile_boxes(
    slide: SlideLike,
    tile_size: int,
    stride: int | None = None,
    *,
    magnification: float | None,
    base: float | None = None,
    include_edge: bool = False,
) -> list[Box]:
    """Return the level-0 boxes of a grid of ``tile_size`` tiles at ``magnification``.

    ``tile_size`` and ``stride`` are in pixels at the target magnification.
    """
    stride = tile_size if stride is None else stride
    plan = plan_level(slide, magnification, base)
    width, height = slide.level_dimensions[0]
    span = round(tile_size * plan.downsample)
    step = max(1, round(stride * plan.downsample))
    xs = grid_starts(width, span, step, include_edge)
    ys = grid_starts(height, span, step, include_edge)
    return [(x, y, x + span, y + span) for y in ys for x in xs]


def _on_white(region: Image.Image) -> Image.Image:
    # OpenSlide returns premultiplied RGBA with alpha 0 outside the scanned area.
    if region.mode == "RGBA":
        background = Image.new("RGBA", region.size, (255, 255, 255, 255))
        region = Image.alpha_composite(background, region)
    return region.convert("RGB")


def read_slide_tile(slide: SlideLike, box: Box, tile_size: int, plan: LevelPlan) -> Image.Image:
    """Read one level-0 box as a ``tile_size`` RGB tile, transparent parts made white."""
    x0, y0, x1, y1 = box
    read_size = max(1, math.ceil((x1 - x0) / plan.level_downsample))
    region = _on_white(slide.read_region((x0, y0), plan.level, (read_size, read_size)))
    if region.size != (tile_size, tile_size):
        region = region.resize((tile_size, tile_size), Image.Resampling.BOX)
    return region


def iter_slide_tiles(
    slide: SlideLike,
    tile_size: int,
    stride: int | None = None,
    *,
    magnification: float | None,
    base: float | None = None,
    background: BackgroundFilter | None = None,
) -> Iterator[tuple[Image.Image, Box]]:
    """Yield ``(tile, level-0 box)`` over a slide, dropping glass tiles.

    The background filter is applied to every tile at the target magnification. This is exact
    but reads the whole slide, whereas ``foreground_tile_boxes`` selects tiles from a thumbnail.
    """
    plan = plan_level(slide, magnification, base)
    boxes = slide_tile_boxes(slide, tile_size, stride, magnification=magnification, base=base)
    for box in boxes:
        tile = read_slide_tile(slide, box, tile_size, plan)
        if background is not None and background.is_background(tile):
            continue
        yield tile, box


DEFAULT_MAX_MASK_PIXELS = 64_000_000
"""Largest pyramid level, in pixels, that ``foreground_tile_boxes`` reads whole as a mask."""


def foreground_tile_boxes(
    slide: SlideLike,
    tile_size: int,
    stride: int | None = None,
    *,
    magnification: float | None,
    base: float | None = None,
    background: BackgroundFilter | None = None,
    max_mask_pixels: int = DEFAULT_MAX_MASK_PIXELS,
) -> list[Box]:
    """Return the level-0 boxes of the grid tiles that are not empty glass.

    The glass mask is computed once on the slide's smallest pyramid level, and a tile is kept
    when the glass share of the mask pixels under its box is at most
    ``background.max_glass_fraction``. A slide without a level of at most ``max_mask_pixels``
    pixels falls back to reading every tile at the target magnification.

    NOTE: the mask is computed on averaged thumbnail pixels, so a tile with a few small cells on
    glass can count as glass in the mask while it passes the per-tile filter of
    ``iter_slide_tiles``.
    """
    boxes = slide_tile_boxes(slide, tile_size, stride, magnification=magnification, base=base)
    if background is None or background.max_glass_fraction >= 1.0 or not boxes:
        return boxes
    level = slide.level_count - 1
    width, height = slide.level_dimensions[level]
    if width * height > max_mask_pixels:
        logger.warning(
            "smallest level of the slide is %dx%d pixels, too large for a mask; filtering "
            "%d tiles one by one",
            width,
            height,
            len(boxes),
        )
        tiles = iter_slide_tiles(
            slide, tile_size, stride, magnification=magnification, base=base, background=background
        )
        return [box for _, box in tiles]

    thumbnail = _on_white(slide.read_region((0, 0), level, (width, height)))
    glass = background.glass_mask(thumbnail)
    # Summed-area table: the glass count of any rectangle from four look-ups.
    counts = np.zeros((height + 1, width + 1), dtype=np.int64)
    counts[1:, 1:] = glass.cumsum(axis=0).cumsum(axis=1)
    downsample = float(slide.level_downsamples[level])
    corners = np.asarray(boxes, dtype=np.float64) / downsample
    x0 = np.clip(np.floor(corners[:, 0]).astype(np.int64), 0, width - 1)
    y0 = np.clip(np.floor(corners[:, 1]).astype(np.int64), 0, height - 1)
    x1 = np.clip(np.ceil(corners[:, 2]).astype(np.int64), x0 + 1, width)
    y1 = np.clip(np.ceil(corners[:, 3]).astype(np.int64), y0 + 1, height)
    glass_pixels = counts[y1, x1] - counts[y0, x1] - counts[y1, x0] + counts[y0, x0]
    fractions = glass_pixels / ((x1 - x0) * (y1 - y0))
    keep = fractions <= background.max_glass_fraction
    return [box for box, kept in zip(boxes, keep) if kept]
