"""End-to-end smoke test on the real cytology images: pretrain, extract, cross-validate.

A few iBOT steps on real blood smears, features of the diagnosis smears from the resulting
checkpoint, and a 2-fold ABMIL run. Skips when the data folder is missing.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch

from cytofm.cli import eval_mil, extract, pretrain
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

TINY_MODEL = [
    "model.arch=vit_tiny",
    "model.embed_dim=48",
    "model.depth=2",
    "model.num_heads=2",
    "model.patch_size=8",
    "model.img_size=32",
    "model.drop_path_rate=0.0",
]


def test_real_pretrain_extract_evaluate(shared_data, tmp_path):
    run_dir = tmp_path / "pretrain"
    exit_code = pretrain.main(
        [
            "--config",
            str(REPO_ROOT / "configs" / "pretrain" / "demo_cpu.yaml"),
            f"data.root={shared_data}",
            "data.sources=[{path: rbc-smears/images}]",
            "data.batch_size_per_gpu=4",
            "data.num_workers=0",
            "data.samples_per_epoch=16",
            "crops.global_crop_size=32",
            "crops.local_crop_size=16",
            "crops.local_crops_number=2",
            "head.out_dim=64",
            "head.patch_out_dim=64",
            "head.hidden_dim=32",
            "head.bottleneck_dim=16",
            "run.max_steps=3",
            "run.progress_bar=false",
            f"run.output_dir={run_dir}",
            *TINY_MODEL,
        ]
    )
    assert exit_code == 0
    checkpoints = sorted((run_dir / "checkpoints").glob("checkpoint-*.pt"))
    assert [path.name for path in checkpoints] == ["checkpoint-000000003.pt"]
    state = torch.load(checkpoints[0], map_location="cpu", weights_only=True)
    assert state["step"] == 3

    features = tmp_path / "features"
    exit_code = extract.main(
        [
            "bags.kind=class_folders",
            f"bags.root={shared_data / 'rbc-diseases'}",
            "bags.tile_size=32",
            "bags.stride=32",
            "bags.scale=0.125",
            "bags.background_threshold=1.0",
            f"backbone.source={checkpoints[0]}",
            "batch_size=64",
            "num_workers=0",
            f"out={features}",
            "name=smoke",
        ]
    )
    assert exit_code == 0
    with (features / "smoke" / "index.csv").open() as handle:
        index = list(csv.DictReader(handle))
    assert len(index) == 121
    # 640x480 at scale 1/8 is 80x60: tiles at x 0, 32, 48 and y 0, 28 with edge tiles.
    assert {row["num_instances"] for row in index} == {"6"}
    first = torch.load(
        features / "smoke" / "features" / index[0]["file"], map_location="cpu", weights_only=True
    )
    assert first["features"].shape == (6, 48)

    out = tmp_path / "eval"
    exit_code = eval_mil.main(
        [
            f"feature_sets=[{{name: smoke, path: {features / 'smoke'}}}]",
            "folds=2",
            "seeds=[0]",
            "num_threads=1",
            "train.epochs=3",
            "train.patience=3",
            f"out={out}",
        ]
    )
    assert exit_code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["num_bags"] == 121
    row = results["rows"][0]
    assert row["runs"] == 2
    assert 0.0 <= row["balanced_accuracy"]["mean"] <= 1.0
    predicted = set()
    for fold in ("fold0", "fold1"):
        with (out / "smoke" / "abmil" / "seed0" / fold / "predictions.csv").open() as handle:
            predicted.update(row["bag_id"] for row in csv.DictReader(handle))
    assert predicted == {row["bag_id"] for row in index}
