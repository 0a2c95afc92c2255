"""Score MIL attention against per-cell ground truth: does attention find the abnormal cells?

An instance counts as abnormal when its box contains the centre of an abnormal cell box
(``cells.csv`` of the demo set: ``bag_id,x0,y0,x1,y1,abnormal``). For every bag with both
abnormal and normal instances, two scores are computed:

- top-1 hit: the instance with the highest attention is abnormal. Its chance level is the
  share of abnormal instances in the bag, averaged over bags;
- instance AUROC: attention as a score for abnormal instances (chance 0.5).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score


@dataclass
class AttentionScore:
    """Agreement of attention with the abnormal instances.

    Attributes:
        num_bags: bags scored (those with both abnormal and normal instances).
        top1_hit_rate: share of scored bags whose highest-attention instance is abnormal.
        top1_chance: expected hit rate of a random ranking (mean share of abnormal instances).
        mean_instance_auroc: mean over scored bags of the AUROC of attention for abnormal
            instances; 0.5 is chance.
    """

    num_bags: int
    top1_hit_rate: float
    top1_chance: float
    mean_instance_auroc: float


def read_cell_boxes(cells_csv: str | Path) -> dict[str, np.ndarray]:
    """Read ``bag_id,x0,y0,x1,y1,abnormal`` rows into ``{bag_id: float array [M, 5]}``."""
    cells_csv = Path(cells_csv)
    if not cells_csv.is_file():
        raise FileNotFoundError(f"cell annotations not found: {cells_csv}")
    cells: dict[str, list[list[float]]] = {}
    with cells_csv.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        required = ["bag_id", "x0", "y0", "x1", "y1", "abnormal"]
        missing = [column for column in required if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{cells_csv}: missing column(s) {missing}")
        for row in reader:
            values = [float(row[key]) for key in required[1:]]
            cells.setdefault(row["bag_id"], []).append(values)
    return {bag_id: np.asarray(rows, dtype=np.float64) for bag_id, rows in cells.items()}


def abnormal_instances(coords: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Mark instances whose box ``[N, 4]`` contains the centre of an abnormal cell ``[M, 5]``.

    A centre on the left or top edge belongs to the box, one on the right or bottom edge does
    not, so a centre is never counted in two tiles of a grid without overlap.
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 4)
    abnormal = cells[cells[:, 4] > 0] if len(cells) else np.zeros((0, 5))
    if len(abnormal) == 0:
        return np.zeros(len(coords), dtype=bool)
    centre_x = (abnormal[:, 0] + abnormal[:, 2]) / 2
    centre_y = (abnormal[:, 1] + abnormal[:, 3]) / 2
    inside = (
        (coords[:, None, 0] <= centre_x[None])
        & (centre_x[None] < coords[:, None, 2])
        & (coords[:, None, 1] <= centre_y[None])
        & (centre_y[None] < coords[:, None, 3])
    )
    return inside.any(axis=1)


def score_attention(
    attention: Mapping[str, tuple[np.ndarray, np.ndarray]],
    cells: Mapping[str, np.ndarray],
) -> AttentionScore:
    """Score attention maps against cell annotations.

    Args:
        attention: ``{bag_id: (weights [N], coords [N, 4])}``.
        cells: ``{bag_id: [M, 5]}`` as returned by :func:`read_cell_boxes`.

    Returns:
        The scores; NaN rates when no bag has both abnormal and normal instances.
    """
    hits, chances, aurocs = [], [], []
    for bag_id, (weights, coords) in attention.items():
        truth = abnormal_instances(np.asarray(coords), cells.get(bag_id, np.zeros((0, 5))))
        if truth.all() or not truth.any():
            continue
        weights = np.asarray(weights, dtype=np.float64)
        hits.append(float(truth[int(weights.argmax())]))
        chances.append(float(truth.mean()))
        aurocs.append(float(roc_auc_score(truth, weights)))
    if not hits:
        return AttentionScore(0, math.nan, math.nan, math.nan)
    return AttentionScore(
        num_bags=len(hits),
        top1_hit_rate=float(np.mean(hits)),
        top1_chance=float(np.mean(chances)),
        mean_instance_auroc=float(np.mean(aurocs)),
    )


def load_run_attention(
    run_dir: str | Path, feature_set: str, head: str = "abmil", seed: int | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Collect the test-fold attention of one row of a ``cytofm-eval-mil`` output folder.

    Every bag is in the test set of exactly one fold per seed; with ``seed`` None the first
    seed found is used.
    """
    base = Path(run_dir) / feature_set / head
    seeds = sorted(base.glob("seed*"), key=lambda path: int(path.name[4:]))
    if not seeds:
        raise FileNotFoundError(f"no attention found under {base}; run cytofm-eval-mil first")
    seed_dir = base / f"seed{seed}" if seed is not None else seeds[0]
    collected: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for path in sorted(seed_dir.glob("fold*/attention.pt")):
        record = torch.load(path, map_location="cpu", weights_only=True)
        for bag_id, entry in record.items():
            collected[bag_id] = (entry["attention"].numpy(), entry["coords"].numpy())
    return collected
