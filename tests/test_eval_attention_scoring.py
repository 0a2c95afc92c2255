"""Tests of attention scoring against per-cell ground truth."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cytofm.evaluation.attention_scoring import (
    abnormal_instances,
    read_cell_boxes,
    score_attention,
)

# A 2 x 2 grid of 10 px tiles.
TILES = np.array([[0, 0, 10, 10], [10, 0, 20, 10], [0, 10, 10, 20], [10, 10, 20, 20]])


def test_abnormal_instance_by_cell_centre():
    cells = np.array(
        [
            [12, 2, 18, 8, 1],  # centre (15, 5): tile 1
            [0, 0, 20, 20, 1],  # centre (10, 10) on a corner: tile 3 only
            [2, 12, 8, 18, 0],  # normal cell in tile 2
        ]
    )
    assert abnormal_instances(TILES, cells).tolist() == [False, True, False, True]
    assert abnormal_instances(TILES, cells[2:]).tolist() == [False] * 4
    assert abnormal_instances(TILES, np.zeros((0, 5))).tolist() == [False] * 4


def test_score_attention_fixed_values():
    cells = {
        "hit": np.array([[12, 2, 18, 8, 1]]),  # tile 1 abnormal
        "miss": np.array([[2, 2, 8, 8, 1], [12, 12, 18, 18, 1]]),  # tiles 0 and 3 abnormal
        "negative": np.array([[2, 2, 8, 8, 0]]),  # no abnormal tile: not scored
    }
    attention = {
        "hit": (np.array([0.1, 0.6, 0.2, 0.1]), TILES),
        "miss": (np.array([0.3, 0.4, 0.1, 0.2]), TILES),
        "negative": (np.array([0.25] * 4), TILES),
    }
    score = score_attention(attention, cells)
    assert score.num_bags == 2
    assert score.top1_hit_rate == pytest.approx(0.5)
    assert score.top1_chance == pytest.approx((1 / 4 + 2 / 4) / 2)
    # "hit": the abnormal tile ranks first, AUROC 1. "miss": abnormal 0.3 and 0.2 against
    # normal 0.4 and 0.1 win 2 of 4 pairs, AUROC 0.5.
    assert score.mean_instance_auroc == pytest.approx(0.75)


def test_score_without_scorable_bags_is_nan():
    score = score_attention({"a": (np.ones(4) / 4, TILES)}, {})
    assert score.num_bags == 0
    assert math.isnan(score.top1_hit_rate)


def test_read_cell_boxes(tmp_path):
    path = tmp_path / "cells.csv"
    path.write_text("bag_id,x0,y0,x1,y1,abnormal\na,0,0,4,4,1\na,4,4,8,8,0\nb,1,1,2,2,0\n")
    cells = read_cell_boxes(path)
    assert sorted(cells) == ["a", "b"]
    assert cells["a"].tolist() == [[0, 0, 4, 4, 1], [4, 4, 8, 8, 0]]
    (tmp_path / "bad.csv").write_text("bag_id,x0\n")
    with pytest.raises(ValueError, match="missing column"):
        read_cell_boxes(tmp_path / "bad.csv")


def test_read_cell_boxes_with_bom(tmp_path):
    path = tmp_path / "cells.csv"
    path.write_text("bag_id,x0,y0,x1,y1,abnormal\nb,1,2,3,4,1\n", encoding="utf-8-sig")
    cells = read_cell_boxes(path)
    assert list(cells) == ["b"]
    assert cells["b"].tolist() == [[1.0, 2.0, 3.0, 4.0, 1.0]]
