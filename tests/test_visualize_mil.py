"""MIL heatmaps: boxes painted at their coordinates, run-folder lookup, tile ranking."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from cytofm.visualize.mil import (
    BagNotFoundError,
    downscale_for_display,
    find_source_image,
    locate_source_image,
    rank_tiles,
    read_mil_bag,
    run_mil,
    scale_attention,
    tile_heatmap,
)
from tests.visualize_fixtures import grid_boxes, write_fold, write_noise_image

HEIGHT, WIDTH, TILE = 48, 80, 16
PLANTED = 7  # row 1, column 2 of the 3x5 tile grid: x 32..48, y 16..32


def planted_bag():
    boxes = grid_boxes(HEIGHT, WIDTH, TILE)
    attention = np.full(len(boxes), 0.02)
    attention[PLANTED] = 1.0 - 0.02 * (len(boxes) - 1)
    return boxes, attention


def bag_record(label="positive", predicted="positive", probabilities=(0.2, 0.8)):
    boxes, attention = planted_bag()
    return {
        "label": label,
        "predicted": predicted,
        "probabilities": probabilities,
        "attention": attention,
        "coords": boxes,
    }


def make_run(root):
    """A run with two folds of one seed; ``slide_7`` is a test bag of fold 1."""
    base = root / "features_a" / "abmil" / "seed0"
    write_fold(base / "fold0", {"slide_1": bag_record("negative", "negative", (0.9, 0.1))})
    write_fold(base / "fold1", {"slide_7": bag_record(), "slide_8": bag_record()})
    return root


def test_tile_heatmap_planted_tile_lands_on_its_box():
    boxes, attention = planted_bag()
    heatmap = tile_heatmap(attention, boxes, (HEIGHT, WIDTH))
    assert heatmap.shape == (HEIGHT, WIDTH)

    rows, columns = np.nonzero(heatmap == heatmap.max())
    assert (rows.min(), rows.max() + 1) == (16, 32)
    assert (columns.min(), columns.max() + 1) == (32, 48)
    assert len(rows) == TILE * TILE
    assert heatmap[16:32, 32:48].min() == pytest.approx(attention[PLANTED])
    outside = np.ones((HEIGHT, WIDTH), dtype=bool)
    outside[16:32, 32:48] = False
    np.testing.assert_allclose(heatmap[outside], 0.02)


def test_tile_heatmap_uncovered_overlap_and_clipping():
    boxes = np.array([[0, 0, 4, 4], [2, 2, 6, 6], [8, 8, 20, 20]])
    heatmap = tile_heatmap(np.array([1.0, 3.0, 5.0]), boxes, (10, 10))
    assert heatmap[0, 0] == 1.0
    assert heatmap[3, 3] == 2.0  # covered by the first two boxes: their mean
    assert heatmap[5, 5] == 3.0
    assert heatmap[9, 9] == 5.0  # the third box is clipped to the image
    assert np.isnan(heatmap[0, 9])
    assert np.isnan(heatmap[7, 0])


def test_rank_tiles_and_percentiles():
    attention = np.array([0.1, 0.4, 0.05, 0.3, 0.15])
    top, bottom = rank_tiles(attention, 2)
    np.testing.assert_array_equal(top, [1, 3])
    np.testing.assert_array_equal(bottom, [2, 0])
    np.testing.assert_allclose(scale_attention(attention, "percentile"), [25, 100, 0, 75, 50])
    small_top, small_bottom = rank_tiles(np.array([0.2, 0.5, 0.3]), 8)
    np.testing.assert_array_equal(small_top, [1])
    np.testing.assert_array_equal(small_bottom, [0])
    np.testing.assert_array_equal(scale_attention(attention, "raw"), attention)


def test_downscale_for_display_scales_boxes():
    image = Image.new("RGB", (400, 200))
    scaled, boxes = downscale_for_display(image, np.array([[100, 50, 200, 150]]), 100)
    assert scaled.size == (100, 50)
    np.testing.assert_array_equal(boxes, [[25, 12, 50, 38]])


def test_read_mil_bag_finds_fold(tmp_path):
    run = make_run(tmp_path / "run")
    result = read_mil_bag(run, "slide_7")
    assert result.fold_dir == run / "features_a" / "abmil" / "seed0" / "fold1"
    assert result.run_name == "features_a/abmil/seed0/fold1"
    assert (result.label, result.predicted) == ("positive", "positive")
    assert result.probabilities == {"negative": 0.2, "positive": 0.8}
    boxes, attention = planted_bag()
    np.testing.assert_allclose(result.attention, attention, rtol=1e-6)
    np.testing.assert_array_equal(result.coords, boxes)


def test_read_mil_bag_unknown_bag(tmp_path):
    run = make_run(tmp_path / "run")
    with pytest.raises(BagNotFoundError, match="'slide_99' not found") as error:
        read_mil_bag(run, "slide_99")
    assert "slide_1" in str(error.value)


def test_read_mil_bag_empty_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="no fold folders"):
        read_mil_bag(tmp_path, "slide_7")
    with pytest.raises(FileNotFoundError, match="run folder not found"):
        read_mil_bag(tmp_path / "missing", "slide_7")


def test_find_source_image(tmp_path):
    write_noise_image(tmp_path / "slide_7.jpg", 8, 8)
    assert find_source_image("slide_7", tmp_path) == tmp_path / "slide_7.jpg"
    with pytest.raises(FileNotFoundError, match="--image"):
        find_source_image("slide_8", tmp_path)


def write_run_records(run, tmp_path, bags_meta):
    """Write the run's config.yaml and the feature set's meta.json that point at the images."""
    feature_dir = tmp_path / "features" / "features_a"
    feature_dir.mkdir(parents=True)
    meta = {"format": "cytofm-features", "version": 1, "bags": bags_meta}
    (feature_dir / "meta.json").write_text(json.dumps(meta))
    config = {"feature_sets": [{"name": "features_a", "path": str(feature_dir)}]}
    (run / "config.yaml").write_text(yaml.safe_dump(config))


def test_locate_source_image_from_labels_csv(tmp_path):
    run = make_run(tmp_path / "run")
    (tmp_path / "data" / "images").mkdir(parents=True)
    image = write_noise_image(tmp_path / "data" / "images" / "s7.png", 8, 8)
    labels = tmp_path / "data" / "labels.csv"
    labels.write_text("bag_id,label,path\nslide_7,positive,images/s7.png\n")
    bags_meta = {"kind": "image_tiles", "root": str(tmp_path / "data"), "labels_csv": str(labels)}
    write_run_records(run, tmp_path, bags_meta)
    fold_dir = read_mil_bag(run, "slide_7").fold_dir
    assert locate_source_image(run, fold_dir, "slide_7") == image


def test_locate_source_image_class_folders_and_points(tmp_path):
    run = make_run(tmp_path / "run")
    fold_dir = read_mil_bag(run, "slide_7").fold_dir
    (tmp_path / "data" / "abnormal").mkdir(parents=True)
    image = write_noise_image(tmp_path / "data" / "abnormal" / "a.png", 8, 8)

    write_run_records(run, tmp_path, {"kind": "class_folders", "root": str(tmp_path / "data")})
    assert locate_source_image(run, fold_dir, "abnormal/a.png") == image

    points_meta = {"kind": "points", "root": str(tmp_path / "data"), "point_bags": "point"}
    (run / "config.yaml").unlink()
    (tmp_path / "features").rename(tmp_path / "old_features")
    write_run_records(run, tmp_path, points_meta)
    assert locate_source_image(run, fold_dir, "abnormal/a.png#3") == image


@pytest.mark.parametrize(
    ("kind", "message"), [("tile_folder", "no single source image"), ("wsi", "whole-slide")]
)
def test_locate_source_image_needs_image(tmp_path, kind, message):
    run = make_run(tmp_path / "run")
    write_run_records(run, tmp_path, {"kind": kind, "root": str(tmp_path)})
    fold_dir = read_mil_bag(run, "slide_7").fold_dir
    with pytest.raises(FileNotFoundError, match=message):
        locate_source_image(run, fold_dir, "slide_7")


def test_run_mil_writes_heatmap_and_tiles(tmp_path):
    run = make_run(tmp_path / "run")
    images = tmp_path / "images"
    images.mkdir()
    write_noise_image(images / "slide_7.png", HEIGHT, WIDTH)
    written = run_mil(run, "slide_7", tmp_path / "out", image_root=images, tiles=3)
    assert [path.name for path in written] == ["slide_7_mil_heatmap.png", "slide_7_mil_tiles.png"]
    for path in written:
        with Image.open(path) as figure:
            assert figure.format == "PNG"


def test_run_mil_without_records_asks_for_image(tmp_path):
    run = make_run(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="pass --image"):
        run_mil(run, "slide_7", tmp_path / "out")


def test_read_mil_bag_unknown_seed_lists_runs(tmp_path):
    run = make_run(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="seed 5") as error:
        read_mil_bag(run, "slide_7", seed=5)
    assert "the run contains features_a/abmil/seed0;" in str(error.value)


def test_locate_source_image_adds_extension(tmp_path):
    run = make_run(tmp_path / "run")
    (tmp_path / "data").mkdir()
    image = write_noise_image(tmp_path / "data" / "slide_7.jpg", 8, 8)
    labels = tmp_path / "data" / "labels.csv"
    labels.write_text("bag_id,label\nslide_7,positive\n")
    bags_meta = {"kind": "image_tiles", "root": str(tmp_path / "data"), "labels_csv": str(labels)}
    write_run_records(run, tmp_path, bags_meta)
    fold_dir = read_mil_bag(run, "slide_7").fold_dir
    assert locate_source_image(run, fold_dir, "slide_7") == image
