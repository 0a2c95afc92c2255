"""Whole-slide images as a pretraining source: thumbnail tile selection, index, reading."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cytofm.data import wsi
from cytofm.data.bags import BagConfig, build_bags
from cytofm.data.pretrain_dataset import (
    ImageSource,
    PretrainImageDataset,
    read_skipped_manifest,
)
from cytofm.data.slide_source import SlideTileTable, SlideTiling
from cytofm.data.tiling import BackgroundFilter
from tests.pretrain_helpers import REPO_ROOT, run_tiny, tiny_overrides
from tests.slide_samples import write_tiled_tiff
from tests.test_data_tiling import FakeSlide

needs_openslide = pytest.mark.skipif(
    importlib.util.find_spec("openslide") is None, reason="needs pip install cytofm[wsi]"
)
TISSUE = (150, 70, 160)


def _per_tile_boxes(slide, tile_size, magnification, background):
    tiles = wsi.iter_slide_tiles(
        slide, tile_size, magnification=magnification, background=background
    )
    return [box for _, box in tiles]


@pytest.mark.parametrize("threshold", [0.3, 0.9, 1.0])
def test_thumbnail_boxes_match_per_tile_filter(threshold):
    background = BackgroundFilter(max_glass_fraction=threshold)
    boxes = wsi.foreground_tile_boxes(FakeSlide(), 128, magnification=5, background=background)
    assert boxes == _per_tile_boxes(FakeSlide(), 128, 5, background)


def test_thumbnail_boxes_read_one_region():
    slide = FakeSlide()
    boxes = wsi.foreground_tile_boxes(
        slide, 128, magnification=5, background=BackgroundFilter(max_glass_fraction=0.9)
    )
    # Tissue ends at x=2000: boxes starting at 0 and 1024 contain some, the one at 2048 none.
    assert boxes == [(x, y, x + 1024, y + 1024) for y in (0, 1024) for x in (0, 1024)]
    assert slide.reads == [((0, 0), 2, (250, 187))]


def test_thumbnail_too_large_filters_each_tile():
    slide = FakeSlide()
    background = BackgroundFilter(max_glass_fraction=0.9)
    boxes = wsi.foreground_tile_boxes(
        slide, 128, magnification=5, background=background, max_mask_pixels=1000
    )
    assert boxes == _per_tile_boxes(FakeSlide(), 128, 5, background)
    assert len(slide.reads) == 6  # every grid tile read once, no thumbnail


def _tissue_slide(path, width=512, height=384):
    """Write a two-level 40x slide: glass with a tissue block at x 128..320, y 64..192."""
    level0 = np.full((height, width, 3), 245, dtype=np.uint8)
    level0[64:192, 128:320] = TISSUE
    level0[64:192, 128:320, 1] += np.arange(192, dtype=np.uint8)[None, :] // 4  # a gradient
    level1 = np.asarray(Image.fromarray(level0).resize((width // 2, height // 2), Image.BOX))
    write_tiled_tiff(path, [level0, level1], tile=64, microns_per_pixel=0.25)
    return level0, level1


@needs_openslide
def test_slide_table_reads_openslide_tiles(tmp_path):
    _, level1 = _tissue_slide(tmp_path / "a.tif")
    tiling = SlideTiling(
        tile_size=32, magnification=20, background=BackgroundFilter(max_glass_fraction=0.5)
    )
    table = SlideTileTable(tmp_path, ["a.tif"], tiling)

    # 20x on a 40x slide: 64-pixel level-0 boxes on a grid; tissue covers boxes whose x
    # start is 128..256 and y start is 64..128 completely.
    expected = [(x, y, x + 64, y + 64) for y in (64, 128) for x in (128, 192, 256)]
    assert [table.box(i) for i in range(len(table))] == expected
    assert table.tiles_per_slide().tolist() == [6]
    tile = np.asarray(table.load(1))
    # The tile comes from level 1 (downsample 2) without resizing.
    np.testing.assert_array_equal(tile, level1[32:64, 96:128])
    assert table.path(1) == tmp_path / "a.tif"


@needs_openslide
def test_slide_source_mixes_with_images(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    _tissue_slide(slides / "good.tif")
    (slides / "broken.svs").write_text("not a slide")
    images = tmp_path / "images"
    images.mkdir()
    for number in range(3):
        Image.new("RGB", (40, 40), (number, 90, 90)).save(images / f"{number}.png")
    manifest = tmp_path / "run" / "skipped.csv"

    dataset = PretrainImageDataset(
        [ImageSource(images), ImageSource(slides, kind="slides", magnification=20)],
        field_size=32,
        skipped_manifest=manifest,
    )
    assert dataset.source_sizes == [3, 6]
    skipped = read_skipped_manifest(manifest)
    assert [row[0] for row in skipped] == [str(slides / "broken.svs")]
    assert "cannot open slide" in skipped[0][1]
    field = dataset[(4, 0)]
    assert field.size == (32, 32)
    assert dataset.path(4) == slides / "good.tif"


def _counting_opener(calls):
    def opener(path):
        calls.append(path)
        return FakeSlide()

    return opener


def test_slide_index_cache_reused_and_keyed(tmp_path):
    for name in ("a.svs", "b.svs"):
        (tmp_path / name).write_bytes(b"stand-in for a slide")
    tiling = SlideTiling(tile_size=128, magnification=5)
    calls = []
    first = SlideTileTable(
        tmp_path,
        ["a.svs", "b.svs"],
        tiling,
        cache_dir=tmp_path / "cache",
        opener=_counting_opener(calls),
    )
    assert len(calls) == 2
    again = SlideTileTable(
        tmp_path,
        ["a.svs", "b.svs"],
        tiling,
        cache_dir=tmp_path / "cache",
        opener=_counting_opener(calls),
    )
    assert len(calls) == 2  # the saved index was read, no slide opened
    assert [again.box(i) for i in range(len(again))] == [first.box(i) for i in range(len(first))]
    assert again.tiles_per_slide().tolist() == [4, 4]

    SlideTileTable(
        tmp_path,
        ["a.svs", "b.svs"],
        SlideTiling(tile_size=128, magnification=10),
        cache_dir=tmp_path / "cache",
        opener=_counting_opener(calls),
    )
    assert len(calls) == 4  # another magnification is another index
    assert len(list((tmp_path / "cache").glob("slide-tiles-*.npz"))) == 2


class FailingSlide(FakeSlide):
    """A fake slide whose tile at the origin fails to read, like a corrupt JPEG tile."""

    def read_region(self, location, level, size):
        if level == 1 and location == (0, 0):
            raise OSError("corrupt JPEG tile")
        return super().read_region(location, level, size)


def test_unreadable_tile_substituted_and_listed(tmp_path, monkeypatch):
    monkeypatch.setattr("cytofm.data.slide_source.open_slide", lambda path: FailingSlide())
    (tmp_path / "bad.svs").write_bytes(b"x")
    manifest = tmp_path / "skipped.csv"
    dataset = PretrainImageDataset(
        [ImageSource(tmp_path, kind="slides", magnification=5)],
        field_size=128,
        skipped_manifest=manifest,
        max_bad_fraction=1.0,
    )
    assert len(dataset) == 4
    field = dataset[(0, 3)]
    assert field.size == (128, 128)
    assert dataset.num_bad_files == 1
    assert read_skipped_manifest(manifest) == [
        (str(tmp_path / "bad.svs"), "tile at (0, 0): corrupt JPEG tile")
    ]


def test_slides_need_field_size(tmp_path):
    (tmp_path / "s.svs").write_bytes(b"x")
    with pytest.raises(ValueError, match="set field_size"):
        PretrainImageDataset([ImageSource(tmp_path, kind="slides")], field_size=None)


class GlassSlide(FakeSlide):
    """A fake slide with nothing scanned: every pixel is transparent."""

    def read_region(self, location, level, size):
        return Image.new("RGBA", size, (0, 0, 0, 0))


def test_no_foreground_raises(tmp_path):
    (tmp_path / "s.svs").write_bytes(b"x")
    with pytest.raises(ValueError, match="no foreground tile found in 1 slide"):
        SlideTileTable(
            tmp_path,
            ["s.svs"],
            SlideTiling(tile_size=128, magnification=5),
            opener=lambda path: GlassSlide(),
        )


@needs_openslide
def test_pretraining_run_on_slides(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    for number in range(2):
        _tissue_slide(slides / f"slide {number}.tif")  # a space in the name on purpose
    source = f"[{{path: {slides}, kind: slides, magnification: 20, max_glass_fraction: 0.5}}]"
    trainer, result = run_tiny(
        slides, tmp_path / "run", **{"data.sources": source, "data.field_size": 32}
    )

    # Six foreground tiles per slide (see test_slide_table_reads_openslide_tiles), so an
    # epoch of 12 tiles is 3 batches of 4.
    assert trainer.data.dataset.source_sizes == [12]
    assert trainer.steps_per_epoch == 3
    assert result.step == 6
    assert all(np.isfinite(value) for value in result.losses.values())
    assert len(list((tmp_path / "run" / "slide_index").glob("slide-tiles-*.npz"))) == 1


@needs_openslide
def test_wsi_bag_reads_openslide_tiles(tmp_path):
    _, level1 = _tissue_slide(tmp_path / "case 1.tif")
    labels = tmp_path / "labels.csv"
    labels.write_text("bag_id,label\ncase 1.tif,positive\n")
    config = BagConfig(
        kind="wsi",
        root=tmp_path,
        labels_csv=labels,
        tile_size=32,
        magnification=20,
        background_threshold=0.5,
    )
    instances = list(build_bags(config)[0].iter_instances())

    # The exact per-tile filter keeps the same six tiles as the thumbnail mask here.
    expected = [(x, y, x + 64, y + 64) for y in (64, 128) for x in (128, 192, 256)]
    assert [box for _, box in instances] == expected
    np.testing.assert_array_equal(np.asarray(instances[0][0]), level1[32:64, 64:96])


@needs_openslide
@pytest.mark.slow
def test_torchrun_ranks_share_slide_index(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    _tissue_slide(slides / "a.tif")
    source = f"[{{path: {slides}, kind: slides, magnification: 20, max_glass_fraction: 0.5}}]"
    config_file = tmp_path / "empty.yaml"
    config_file.write_text("{}\n")
    overrides = tiny_overrides(
        slides,
        tmp_path / "ddp",
        **{
            "data.sources": source,
            "data.field_size": 32,
            "data.batch_size_per_gpu": 2,
            "run.max_steps": 1,
            "run.num_threads": 1,
        },
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", "-m", "cytofm.cli.pretrain", "--config"]
    command += [str(config_file), *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert completed.returncode == 0, completed.stderr[-3000:]

    # Rank 0 built and saved the index before rank 1 read it: one file, no partial ones.
    index_files = sorted(path.name for path in (tmp_path / "ddp" / "slide_index").iterdir())
    assert len(index_files) == 1
    assert index_files[0].startswith("slide-tiles-")
    assert "slide " in (tmp_path / "ddp" / "train.log").read_text()


def test_base_magnification_only_fills_missing_value():
    slide = FakeSlide(properties={"openslide.mpp-x": "0.5"})  # a 20x scan
    # The configured 40x must not override the slide's own 20x.
    assert wsi.plan_level(slide, 10, base=40).downsample == pytest.approx(2.0)
    unlabelled = FakeSlide(properties={"openslide.objective-power": "n/a"})
    assert wsi.plan_level(unlabelled, 10, base=40).downsample == pytest.approx(4.0)


def test_unfitting_magnification_stops_index(tmp_path):
    (tmp_path / "s.svs").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"slide .*s.svs: magnification 80x is above"):
        SlideTileTable(
            tmp_path,
            ["s.svs"],
            SlideTiling(tile_size=128, magnification=80),
            opener=lambda path: FakeSlide(),
        )


def test_corrupt_saved_index_rebuilt(tmp_path, caplog):
    (tmp_path / "s.svs").write_bytes(b"x")
    tiling = SlideTiling(tile_size=128, magnification=5)
    options = {"cache_dir": tmp_path / "cache", "opener": lambda path: FakeSlide()}
    first = SlideTileTable(tmp_path, ["s.svs"], tiling, **options)
    (saved,) = (tmp_path / "cache").glob("slide-tiles-*.npz")
    saved.write_bytes(saved.read_bytes()[:100])

    again = SlideTileTable(tmp_path, ["s.svs"], tiling, **options)
    assert "is unreadable" in caplog.text
    assert [again.box(i) for i in range(len(again))] == [first.box(i) for i in range(len(first))]
