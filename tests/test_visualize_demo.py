"""All three subcommands on the demo set, after real cytofm-extract and cytofm-eval-mil runs."""

from __future__ import annotations

import csv

import pytest
from PIL import Image
from threadpoolctl import threadpool_limits

from cytofm.cli.demo_data import main as demo_main
from cytofm.cli.eval_mil import main as eval_main
from cytofm.cli.extract import main as extract_main
from cytofm.cli.visualize import LOG_NAME, main
from tests.visualize_fixtures import write_tiny_checkpoint


@pytest.mark.slow
def test_demo_set_attention_mil_embeddings(tmp_path):
    demo = tmp_path / "demo"
    assert demo_main([str(demo), "--num-images", "12", "--image-size", "96", "--seed", "1"]) == 0
    features = tmp_path / "features"
    extract_args = [
        f"bags.root={demo}",
        f"bags.labels_csv={demo / 'labels.csv'}",
        "bags.tile_size=32",
        "backbone.source=handcrafted",
        f"out={features}",
        "num_workers=0",
        "device=cpu",
    ]
    assert extract_main(extract_args) == 0
    run = tmp_path / "eval"
    eval_args = [
        f"feature_sets=[{{name: handcrafted, path: {features / 'handcrafted'}}}]",
        f"out={run}",
        "folds=2",
        "device=cpu",
        "train.epochs=2",
        "model.hidden_dim=16",
        "model.attention_dim=8",
    ]
    assert eval_main(eval_args) == 0

    with (run / "handcrafted" / "abmil" / "seed0" / "fold0" / "predictions.csv").open() as handle:
        bag_id = next(csv.DictReader(handle))["bag_id"]
    out = tmp_path / "figures"
    assert main(["mil", "--run", str(run), "--bag", bag_id, "--out", str(out)]) == 0
    assert (out / f"{bag_id}_mil_heatmap.png").is_file()

    with threadpool_limits(limits=1):
        embeddings = ["embeddings", str(features / "handcrafted"), "--method", "tsne"]
        assert main([*embeddings, "--out", str(out)]) == 0
    assert (out / "embeddings_bag_tsne.png").is_file()

    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.pt")
    image = demo / "images" / f"{bag_id}.png"
    assert main(["attention", str(image), "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    with Image.open(out / f"{bag_id}_attention.png") as figure:
        assert figure.format == "PNG"
    log = (out / LOG_NAME).read_text()
    assert f"wrote {out / f'{bag_id}_attention.png'}" in log
