"""Bags for multiple-instance learning: CSV images, tile folders, points, class folders, slides."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cytofm.data import wsi
from cytofm.data.bags import BagConfig, build_bags, read_labels_csv
from tests.test_data_tiling import PURPLE, FakeSlide


def _stained_image(path, size=(64, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size[1], size[0], 3), 250, dtype=np.uint8)
    pixels[4:28, 4:28] = PURPLE  # only the first 32 px tile contains a cell
    Image.fromarray(pixels).save(path)
    return pixels


def test_image_tiles_bags_with_path_column(tmp_path):
    _stained_image(tmp_path / "fields" / "case one.png")
    _stained_image(tmp_path / "case two.png")
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "bag_id,label,group,split,path\n"
        "a,positive,patient 1,train,fields/case one.png\n"
        "case two.png,negative,,test,\n"
    )
    bags = build_bags(BagConfig(root=tmp_path, labels_csv=labels, tile_size=32))
    assert [bag.bag_id for bag in bags] == ["a", "case two.png"]
    assert [bag.label for bag in bags] == ["positive", "negative"]
    assert [bag.group for bag in bags] == ["patient 1", None]
    assert [bag.split for bag in bags] == ["train", "test"]
    instances = list(bags[0].iter_instances())
    assert [box for _, box in instances] == [(0, 0, 32, 32)]  # the glass tile is dropped
    keep_all = BagConfig(root=tmp_path, labels_csv=labels, tile_size=32, background_threshold=1.0)
    assert len(list(build_bags(keep_all)[0].iter_instances())) == 2


def test_missing_bag_file_named(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("bag_id,label\nabsent.png,x\n")
    with pytest.raises(FileNotFoundError, match="absent.png"):
        build_bags(BagConfig(root=tmp_path, labels_csv=labels))


@pytest.mark.parametrize(
    "content,message",
    [
        ("bag,label\na,x\n", "lacks column"),
        ("bag_id,label\na,x\na,y\n", "repeated"),
        ("bag_id,label\na,\n", "empty bag_id or label"),
        ("bag_id,label\n", "has no rows"),
    ],
)
def test_labels_csv_errors(tmp_path, content, message):
    path = tmp_path / "labels.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_labels_csv(path)


def test_tile_folder_bags_boxes_from_names(tmp_path):
    folder = tmp_path / "slide 1"
    folder.mkdir()
    Image.new("RGB", (16, 16), PURPLE).save(folder / "slide1_x64_y128.png")
    Image.new("RGB", (16, 16), PURPLE).save(folder / "plain.png")
    Image.new("RGB", (16, 16), (255, 255, 255)).save(folder / "glass_x0_y0.png")
    labels = tmp_path / "labels.csv"
    labels.write_text("bag_id,label\nslide 1,positive\n")
    bags = build_bags(BagConfig(kind="tile_folder", root=tmp_path, labels_csv=labels))
    boxes = [box for _, box in bags[0].iter_instances()]
    assert boxes == [(0, 0, 16, 16), (64, 128, 80, 144)]  # sorted names: plain, slide1_...


def test_class_folders_one_bag_per_image(tmp_path):
    _stained_image(tmp_path / "Iron deficiency anemia" / "img 1.jpg")
    _stained_image(tmp_path / "HE" / "b.png")
    _stained_image(tmp_path / "HE" / "a.png")
    (tmp_path / "HE" / "notes.txt").write_text("ignored")
    bags = build_bags(BagConfig(kind="class_folders", root=tmp_path, tile_size=32))
    assert [(bag.bag_id, bag.label) for bag in bags] == [
        ("HE/a.png", "HE"),
        ("HE/b.png", "HE"),
        ("Iron deficiency anemia/img 1.jpg", "Iron deficiency anemia"),
    ]
    assert len(list(bags[2].iter_instances())) == 1


def _expected_point_crop(pixels, x, y, size):
    padded = np.pad(pixels, ((size, size), (size, size), (0, 0)), constant_values=255)
    x0, y0 = int(round(x - size / 2)), int(round(y - size / 2))
    return padded[y0 + size : y0 + 2 * size, x0 + size : x0 + 2 * size]


def test_point_crops_padded_at_borders(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 200, size=(80, 100, 3), dtype=np.uint8)
    (tmp_path / "images").mkdir()
    Image.fromarray(pixels).save(tmp_path / "images" / "smear 1.png")
    Image.fromarray(pixels[::-1].copy()).save(tmp_path / "images" / "smear 2.png")
    points = tmp_path / "cells.csv"
    points.write_text(
        "image,x,y,label\n"
        "smear 1.png,2,3,normal\n"
        "smear 1.png,50,40,target\n"
        "smear 1.png,99,79,normal\n"
        "smear 2.png,10.6,20.4,spherocyte\n"
    )
    config = BagConfig(kind="points", root=tmp_path / "images", points_csv=points, crop_size=32)
    bags = build_bags(config)
    assert [bag.bag_id for bag in bags] == ["smear 1.png", "smear 2.png"]
    assert bags[0].label is None
    assert bags[0].instance_labels == ["normal", "target", "normal"]

    instances = list(bags[0].iter_instances())
    assert len(instances) == 3  # border points padded, not dropped
    assert [box for _, box in instances] == [
        (-14, -13, 18, 19),
        (34, 24, 66, 56),
        (83, 63, 115, 95),
    ]
    for (crop, _), (x, y) in zip(instances, [(2, 3), (50, 40), (99, 79)]):
        np.testing.assert_array_equal(np.asarray(crop), _expected_point_crop(pixels, x, y, 32))
    assert np.asarray(instances[0][0])[0, 0].tolist() == [255, 255, 255]


def test_point_bags_per_point_and_labels_csv(tmp_path):
    Image.new("RGB", (40, 40), PURPLE).save(tmp_path / "a.png")
    Image.new("RGB", (40, 40), PURPLE).save(tmp_path / "b.png")
    points = tmp_path / "cells.csv"
    points.write_text("image,x,y,label\na.png,5,5,normal\na.png,20,20,target\nb.png,1,1,x\n")
    per_point = build_bags(
        BagConfig(kind="points", root=tmp_path, points_csv=points, point_bags="point")
    )
    assert [(bag.bag_id, bag.label, bag.group) for bag in per_point] == [
        ("a.png#0", "normal", "a.png"),
        ("a.png#1", "target", "a.png"),
        ("b.png#0", "x", "b.png"),
    ]
    labels = tmp_path / "labels.csv"
    labels.write_text("bag_id,label,split\na.png,sick,val\n")
    per_image = build_bags(
        BagConfig(kind="points", root=tmp_path, points_csv=points, labels_csv=labels)
    )
    assert [(bag.bag_id, bag.label, bag.split) for bag in per_image] == [("a.png", "sick", "val")]


def test_wsi_bags_with_fake_slide(tmp_path, monkeypatch):
    (tmp_path / "slide one.svs").write_bytes(b"fake")
    labels = tmp_path / "labels.csv"
    labels.write_text("bag_id,label\nslide one.svs,positive\n")
    slides = []

    def fake_open(path):
        slides.append(FakeSlide())
        return slides[-1]

    monkeypatch.setattr(wsi, "open_slide", fake_open)
    config = BagConfig(kind="wsi", root=tmp_path, labels_csv=labels, tile_size=128, magnification=5)
    bag = build_bags(config)[0]
    boxes = [box for _, box in bag.iter_instances()]
    assert boxes == [(x, y, x + 1024, y + 1024) for y in (0, 1024) for x in (0, 1024)]
    assert slides[0].closed


def test_image_tiles_without_labels_csv_names_key(tmp_path):
    with pytest.raises(ValueError, match="set bags.labels_csv to a file with columns bag_id,label"):
        build_bags(BagConfig(root=tmp_path))


def test_bag_id_without_extension_finds_image(tmp_path):
    _stained_image(tmp_path / "demo_00000.png")
    _stained_image(tmp_path / "demo_00001.jpg")
    (tmp_path / "demo_00000.txt").write_text("not an image")
    labels = tmp_path / "labels.csv"
    labels.write_text("bag_id,label\ndemo_00000,x\ndemo_00001,y\n")
    bags = build_bags(BagConfig(root=tmp_path, labels_csv=labels, tile_size=32))
    assert [bag.reader.path for bag in bags] == [
        tmp_path / "demo_00000.png",
        tmp_path / "demo_00001.jpg",
    ]


def test_bag_id_with_two_image_files_rejected(tmp_path):
    _stained_image(tmp_path / "a.png")
    _stained_image(tmp_path / "a.tif")
    labels = tmp_path / "labels.csv"
    labels.write_text("bag_id,label\na,x\n")
    with pytest.raises(ValueError) as raised:
        build_bags(BagConfig(root=tmp_path, labels_csv=labels))
    message = str(raised.value)
    assert "several files match it: a.png, a.tif" in message
    assert f"add a path column to {labels}" in message
