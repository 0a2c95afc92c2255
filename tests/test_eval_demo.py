"""End to end on the synthetic demo set: extract, cross-validate, score the attention."""

from __future__ import annotations

import json

from cytofm.cli.eval_mil import main as eval_mil_main
from cytofm.cli.extract import main as extract_main
from cytofm.data.demo import generate_demo_set
from cytofm.evaluation.attention_scoring import load_run_attention, read_cell_boxes, score_attention
from tests.test_eval_extract import demo_handcrafted_argv


def test_demo_set_abmil_finds_abnormal_cells(tmp_path):
    demo = tmp_path / "demo"
    generate_demo_set(demo, num_images=48, image_size=128, seed=0)
    features = tmp_path / "features"
    assert extract_main(demo_handcrafted_argv(demo, features)) == 0

    run = tmp_path / "run"
    eval_argv = [
        f"feature_sets=[{{name: handcrafted, path: {features / 'handcrafted'}}}]",
        f"out={run}",
        "folds=3",
        "model.heads=[abmil]",
        "model.hidden_dim=64",
        "model.attention_dim=32",
        "model.dropout=0.0",
        "train.lr=0.005",
        "train.epochs=40",
        "train.patience=10",
        "train.batch_size=8",
        "device=cpu",
    ]
    assert eval_mil_main(eval_argv) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["classes"] == ["negative", "positive"]
    assert results["rows"][0]["auroc"]["mean"] > 0.85

    score = score_attention(
        load_run_attention(run, "handcrafted"), read_cell_boxes(demo / "cells.csv")
    )
    assert score.num_bags >= 15
    # 16 tiles per bag and usually one abnormal cell: chance is about 1 in 16.
    assert score.top1_chance < 0.2
    assert score.top1_hit_rate > 3 * score.top1_chance
    assert score.mean_instance_auroc > 0.7
