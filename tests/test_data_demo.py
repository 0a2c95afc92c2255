"""Synthetic demo set: determinism, label consistency and the command line."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from cytofm.cli.demo_data import main
from cytofm.data.bags import BagConfig, build_bags
from cytofm.data.demo import generate_demo_set


def _read(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _file_bytes(folder):
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_demo_deterministic_by_seed(tmp_path):
    generate_demo_set(tmp_path / "a", num_images=4, image_size=96, seed=7)
    generate_demo_set(tmp_path / "b", num_images=4, image_size=96, seed=7)
    generate_demo_set(tmp_path / "c", num_images=4, image_size=96, seed=8)
    first, second = _file_bytes(tmp_path / "a"), _file_bytes(tmp_path / "b")
    assert sorted(first) == [
        "cells.csv",
        *[f"images/demo_0000{i}.png" for i in range(4)],
        "labels.csv",
    ]
    assert first == second
    assert _file_bytes(tmp_path / "c")["images/demo_00000.png"] != first["images/demo_00000.png"]


def test_demo_prefix_stable(tmp_path):
    generate_demo_set(tmp_path / "small", num_images=2, image_size=64, seed=1)
    generate_demo_set(tmp_path / "large", num_images=5, image_size=64, seed=1)
    small, large = _file_bytes(tmp_path / "small"), _file_bytes(tmp_path / "large")
    assert small["images/demo_00001.png"] == large["images/demo_00001.png"]


def test_demo_labels_match_cells(tmp_path):
    summary = generate_demo_set(tmp_path, num_images=20, image_size=256, seed=0)
    labels = {row["bag_id"]: row["label"] for row in _read(tmp_path / "labels.csv")}
    cells = _read(tmp_path / "cells.csv")
    abnormal_per_bag = {bag_id: 0 for bag_id in labels}
    cells_per_bag = {bag_id: 0 for bag_id in labels}
    for row in cells:
        abnormal_per_bag[row["bag_id"]] += int(row["abnormal"])
        cells_per_bag[row["bag_id"]] += 1
        x0, y0, x1, y1 = (int(row[key]) for key in ("x0", "y0", "x1", "y1"))
        assert 0 <= x0 < x1 <= 256
        assert 0 <= y0 < y1 <= 256
    for bag_id, label in labels.items():
        assert label == ("positive" if abnormal_per_bag[bag_id] > 0 else "negative")
        assert abnormal_per_bag[bag_id] <= 3
    positives = sum(label == "positive" for label in labels.values())
    assert summary.num_positive == positives
    assert 4 <= positives <= 16  # about half of 20
    assert summary.num_abnormal_cells / summary.num_cells < 0.1


def test_demo_abnormal_nuclei_darker(tmp_path):
    generate_demo_set(tmp_path, num_images=30, image_size=128, seed=3)
    darkest = {0: [], 1: []}
    images = {}
    for row in _read(tmp_path / "cells.csv"):
        if row["bag_id"] not in images:
            path = tmp_path / "images" / f"{row['bag_id']}.png"
            images[row["bag_id"]] = np.asarray(Image.open(path).convert("L"))
        x0, y0, x1, y1 = (int(row[key]) for key in ("x0", "y0", "x1", "y1"))
        patch = images[row["bag_id"]][y0:y1, x0:x1]
        darkest[int(row["abnormal"])].append(np.percentile(patch, 5))
    assert np.median(darkest[1]) < np.median(darkest[0]) - 20


def test_demo_positive_fraction_extremes(tmp_path):
    none = generate_demo_set(tmp_path / "n", num_images=6, image_size=64, positive_fraction=0.0)
    every = generate_demo_set(tmp_path / "p", num_images=6, image_size=64, positive_fraction=1.0)
    assert none.num_positive == 0
    assert none.num_abnormal_cells == 0
    assert every.num_positive == 6


def test_demo_reads_as_bags(tmp_path):
    generate_demo_set(tmp_path, num_images=3, image_size=128, seed=0)
    config = BagConfig(root=tmp_path, labels_csv=tmp_path / "labels.csv", tile_size=64)
    bags = build_bags(config)
    assert [bag.bag_id for bag in bags] == ["demo_00000", "demo_00001", "demo_00002"]
    for bag in bags:
        for tile, box in bag.iter_instances():
            assert tile.size == (64, 64)
            assert box[2] - box[0] == 64


def test_demo_cli(tmp_path):
    assert (
        main([str(tmp_path / "out"), "--num-images", "3", "--image-size", "64", "--seed", "2"]) == 0
    )
    assert len(list((tmp_path / "out" / "images").glob("*.png"))) == 3
    assert len(_read(tmp_path / "out" / "labels.csv")) == 3


def test_demo_rewrite_removes_stale_images(tmp_path):
    generate_demo_set(tmp_path, num_images=4, image_size=64)
    (tmp_path / "images" / "mine.png").write_bytes(b"a user's file")
    generate_demo_set(tmp_path, num_images=2, image_size=64)
    names = sorted(path.name for path in (tmp_path / "images").iterdir())
    assert names == ["demo_00000.png", "demo_00001.png", "mine.png"]
    assert len(_read(tmp_path / "labels.csv")) == 2


@pytest.mark.parametrize(
    "option,value,message",
    [
        ("--num-images", "0", "--num-images: must be at least 1, got 0"),
        ("--image-size", "32", "--image-size: must be at least 64, got 32"),
        ("--positive-fraction", "1.5", "--positive-fraction: must be between 0 and 1"),
        ("--num-images", "x", "--num-images: invalid integer value: 'x'"),
    ],
)
def test_demo_cli_rejects_bad_values(tmp_path, capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "out"), option, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
