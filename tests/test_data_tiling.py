"""Grid tiling, the glass filter, and whole-slide tiling on a fake slide."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

from cytofm.data import wsi
from cytofm.data.tiling import (
    BackgroundFilter,
    crop_padded,
    grid_boxes,
    grid_starts,
    iter_grid_tiles,
)

PURPLE = (120, 60, 150)


def _expected_starts(length, tile, stride, include_edge):
    starts = [x for x in range(0, length) if x + tile <= length and x % stride == 0]
    if include_edge and starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


@pytest.mark.parametrize("include_edge", [False, True])
def test_grid_counts_and_coordinates(include_edge):
    boxes = grid_boxes(100, 60, 32, 16, include_edge)
    xs = _expected_starts(100, 32, 16, include_edge)
    ys = _expected_starts(60, 32, 16, include_edge)
    assert len(boxes) == len(xs) * len(ys)
    assert boxes == [(x, y, x + 32, y + 32) for y in ys for x in xs]
    if include_edge:
        assert len(boxes) == 6 * 3
        assert boxes[-1] == (68, 28, 100, 60)
    else:
        assert len(boxes) == 5 * 2
        assert boxes[-1] == (64, 16, 96, 48)


def test_grid_starts_edge_cases():
    assert grid_starts(64, 32, 32) == [0, 32]  # exact fit adds no edge tile
    assert grid_starts(20, 32, 32) == [0]  # shorter than one tile
    with pytest.raises(ValueError, match="must be positive"):
        grid_starts(64, 32, 0)


def test_glass_filter_blank_and_cell_tiles():
    rule = BackgroundFilter(max_glass_fraction=0.9)
    blank = Image.new("RGB", (32, 32), (245, 244, 240))
    assert rule.glass_fraction(blank) == 1.0
    assert rule.is_background(blank)

    cell = np.array(blank)
    cell[8:24, 8:24] = PURPLE  # 256 of 1024 pixels stained
    assert rule.glass_fraction(cell) == pytest.approx(1 - 256 / 1024)
    assert not rule.is_background(cell)

    pale_pink = Image.new("RGB", (8, 8), (240, 200, 210))  # saturation 0.17: not glass
    assert rule.glass_fraction(pale_pink) == 0.0
    assert not BackgroundFilter(max_glass_fraction=1.0).is_background(blank)


def test_tiles_drop_glass_keep_boxes():
    image = Image.new("RGB", (96, 64), (250, 250, 250))
    image.paste(PURPLE, (40, 8, 56, 24))  # inside the tile at (32, 0)
    tiles = list(iter_grid_tiles(image, 32, background=BackgroundFilter(0.9)))
    assert [box for _, box in tiles] == [(32, 0, 64, 32)]
    assert np.asarray(tiles[0][0])[10, 10].tolist() == list(PURPLE)


def test_tiles_at_scale_report_source_boxes():
    pixels = np.zeros((64, 128, 3), dtype=np.uint8)
    pixels[:, :64] = (255, 0, 0)
    pixels[:, 64:] = (0, 0, 255)
    tiles = list(iter_grid_tiles(Image.fromarray(pixels), 32, scale=0.5))
    assert [box for _, box in tiles] == [(0, 0, 64, 64), (64, 0, 128, 64)]
    assert all(tile.size == (32, 32) for tile, _ in tiles)
    assert np.asarray(tiles[0][0])[16, 16].tolist() == [255, 0, 0]
    assert np.asarray(tiles[1][0])[16, 16].tolist() == [0, 0, 255]


def test_crop_padded_fills_white():
    image = Image.new("RGB", (10, 10), (0, 0, 0))
    crop = np.asarray(crop_padded(image, (-3, 8, 5, 14)))
    assert crop.shape == (6, 8, 3)
    assert crop[0, 0].tolist() == [255, 255, 255]  # left of the image
    assert crop[0, 3].tolist() == [0, 0, 0]  # inside
    assert crop[2, 3].tolist() == [255, 255, 255]  # below the image


class FakeSlide:
    """Three-level pyramid over a level-0 array; right half transparent like unscanned glass."""

    def __init__(self, width=4000, height=3000, properties=None):
        self.level_dimensions = [
            (width, height),
            (width // 4, height // 4),
            (width // 16, height // 16),
        ]
        self.level_downsamples = [1.0, 4.0, 16.0]
        self.level_count = 3
        self.properties = {"openslide.objective-power": "40"} if properties is None else properties
        self.reads = []
        self.closed = False

    def read_region(self, location, level, size):
        self.reads.append((location, level, size))
        x, y = location
        image = Image.new("RGBA", size, (*PURPLE, 255))
        downsample = self.level_downsamples[level]
        border = (self.level_dimensions[0][0] // 2 - x) / downsample
        if border < size[0]:
            image.paste((0, 0, 0, 0), (max(0, int(border)), 0, size[0], size[1]))
        return image

    def close(self):
        self.closed = True


@pytest.mark.parametrize(
    "magnification,level,read_scale",
    [(40, 0, 1.0), (20, 0, 0.5), (10, 1, 1.0), (5, 1, 0.5), (2.5, 2, 1.0), (1.25, 2, 0.5)],
)
def test_plan_level_arithmetic(magnification, level, read_scale):
    plan = wsi.plan_level(FakeSlide(), magnification)
    assert plan.level == level
    assert plan.downsample == pytest.approx(40 / magnification)
    assert plan.read_scale == pytest.approx(read_scale)


def test_plan_level_rejects_upsampling():
    with pytest.raises(ValueError, match="above the slide's base 40x"):
        wsi.plan_level(FakeSlide(), 80)


def test_base_magnification_sources():
    assert wsi.base_magnification(FakeSlide(properties={"openslide.mpp-x": "0.5"})) == 20.0
    assert wsi.base_magnification(FakeSlide(properties={}), default=40) == 40.0
    with pytest.raises(ValueError, match="set base_magnification"):
        wsi.base_magnification(FakeSlide(properties={}))


def test_slide_tile_boxes_level0():
    boxes = wsi.slide_tile_boxes(FakeSlide(), 256, magnification=10)
    span = 256 * 4
    assert len(boxes) == 3 * 2  # floor((4000 - 1024) / 1024) + 1 by floor((3000 - 1024) / 1024) + 1
    assert boxes[0] == (0, 0, span, span)
    assert boxes[-1] == (2 * span, span, 3 * span, 2 * span)


def test_slide_tiles_filter_transparent_glass():
    slide = FakeSlide()
    tiles = list(
        wsi.iter_slide_tiles(
            slide, 128, magnification=5, background=BackgroundFilter(max_glass_fraction=0.9)
        )
    )
    boxes = [box for _, box in tiles]
    # 8x downsample: 1024-pixel boxes; only boxes starting left of x=2000 hold tissue.
    assert boxes == [(x, y, x + 1024, y + 1024) for y in (0, 1024) for x in (0, 1024)]
    assert all(tile.size == (128, 128) for tile, _ in tiles)
    assert all(level == 1 and size == (256, 256) for _, level, size in slide.reads)
    mixed = np.asarray(tiles[1][0])  # box 1024..2048 is half tissue, half glass
    assert mixed[64, 10].tolist() == list(PURPLE)
    assert mixed[64, 126].tolist() == [255, 255, 255]  # glass starts at (2000 - 1024) / 8 = 122


def test_open_slide_without_openslide(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openslide", None)  # makes `import openslide` fail
    with pytest.raises(ImportError, match=r"pip install cytofm\[wsi\]"):
        wsi.open_slide(tmp_path / "slide.svs")
