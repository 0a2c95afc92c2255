"""Every real image decodes, and the real layouts read as sources and bags."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from cytofm.data.bags import BagConfig, build_bags
from cytofm.data.decode import load_rgb
from cytofm.data.listing import list_images
from cytofm.data.pretrain_dataset import ImageSource, MixtureSampler, PretrainImageDataset


@pytest.mark.realdata
@pytest.mark.slow
def test_every_real_image_decodes(shared_data):
    paths = list_images(shared_data)
    assert len(paths) > 6000
    for relative in paths:
        image = load_rgb(shared_data / relative)
        assert image.mode == "RGB"
        assert min(image.size) >= 1


@pytest.mark.realdata
def test_real_sources_mix(shared_data):
    dataset = PretrainImageDataset(
        [
            ImageSource(shared_data / "pbc" / "unlabeled", weight=1.0),
            ImageSource(shared_data / "cric" / "unlabeled", weight=1.0),
        ],
        np.asarray,
        field_size=224,
    )
    assert dataset.source_sizes == [1600, 1062]
    sampler = MixtureSampler(dataset, samples_per_epoch=8, seed=0)
    for key in sampler:
        field = dataset[key]
        assert field.ndim == 3
        assert field.shape[2] == 3
        assert max(field.shape[:2]) <= 224


@pytest.mark.realdata
def test_real_class_folders_and_points(shared_data):
    diseases = build_bags(BagConfig(kind="class_folders", root=shared_data / "rbc-diseases"))
    assert len(diseases) == 121
    assert sum(bag.label == "Iron deficiency anemia" for bag in diseases) == 18
    tiles = list(diseases[0].iter_instances())
    assert 0 < len(tiles) <= 9  # 640x480 in 224 px tiles with edge tiles: 3 x 3

    points = build_bags(
        BagConfig(
            kind="points",
            root=shared_data / "rbc-smears" / "images",
            points_csv=shared_data / "rbc-smears" / "cells.csv",
            crop_size=64,
        )
    )
    cells_csv = shared_data / "rbc-smears" / "cells.csv"
    with cells_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(points) == len({row["image"] for row in rows})
    assert sum(len(bag.instance_labels) for bag in points) == len(rows)
    crops = list(points[0].iter_instances())
    assert len(crops) == len(points[0].instance_labels)
    assert all(crop.size == (64, 64) for crop, _ in crops)
