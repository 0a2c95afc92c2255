"""Small synthetic inputs shared by the visualisation tests: a tiny checkpoint, feature sets
and an evaluation run folder in the layout cytofm-eval-mil writes."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cytofm.evaluation.feature_store import (
    IndexRow,
    safe_file_name,
    save_bag_features,
    write_index,
)
from cytofm.models.vit import build_vit

TINY_HEADS = 2


def tiny_model(reg_tokens: int = 0, seed: int = 0):
    """A ViT with embed_dim 32, depth 2, 2 heads and 8-pixel patches, in eval mode."""
    torch.manual_seed(seed)
    model = build_vit(
        "vit_small",
        embed_dim=32,
        depth=2,
        num_heads=TINY_HEADS,
        patch_size=8,
        img_size=32,
        reg_tokens=reg_tokens,
    )
    return model.eval()


def write_tiny_checkpoint(path: Path, reg_tokens: int = 0) -> Path:
    """Save ``tiny_model`` as a cytofm pretraining checkpoint that load_backbone reads."""
    model = tiny_model(reg_tokens=reg_tokens)
    torch.save(
        {
            "format": "cytofm-pretrain",
            "version": 1,
            "student": model.state_dict(),
            "teacher": model.state_dict(),
            "model": {"arch": "vit_small", "num_heads": TINY_HEADS, "depth": 2, "embed_dim": 32},
            "step": 0,
        },
        path,
    )
    return path


def write_noise_image(path: Path, height: int, width: int, seed: int = 0) -> Path:
    """Write a random RGB PNG of the given size."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_feature_set(
    root: Path, bags: dict[str, tuple[str, np.ndarray]], coords: np.ndarray | None = None
) -> Path:
    """Write a feature set folder with the feature store's own writers.

    Args:
        root: Feature set folder.
        bags: bag id to (label, features [N, D]); an empty label is written as missing.
        coords: Boxes used for every bag; default zeros.
    """
    (root / "features").mkdir(parents=True, exist_ok=True)
    rows = []
    for bag_id, (label, features) in bags.items():
        boxes = np.zeros((len(features), 4)) if coords is None else coords
        file_name = safe_file_name(bag_id)
        save_bag_features(
            root / "features" / file_name,
            torch.as_tensor(features, dtype=torch.float32),
            torch.as_tensor(boxes, dtype=torch.int64),
        )
        rows.append(IndexRow(bag_id, label or None, None, None, len(features), file_name))
    write_index(rows, root / "index.csv")
    return root


def write_fold(
    fold_dir: Path,
    bags: dict[str, dict],
    class_names: tuple[str, ...] = ("negative", "positive"),
) -> Path:
    """Write ``predictions.csv`` and ``attention.pt`` of one fold.

    Args:
        fold_dir: ``<run>/<feature set>/<head>/seed<s>/fold<k>``.
        bags: bag id to ``{"label", "predicted", "probabilities", "attention", "coords"}``.
        class_names: Order of the ``prob_<class>`` columns.
    """
    fold_dir.mkdir(parents=True, exist_ok=True)
    with (fold_dir / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["bag_id", "group", "label", "predicted"] + [f"prob_{c}" for c in class_names]
        )
        for bag_id, bag in bags.items():
            probabilities = [f"{p:.6f}" for p in bag["probabilities"]]
            writer.writerow([bag_id, "", bag["label"], bag["predicted"], *probabilities])
    torch.save(
        {
            bag_id: {
                "attention": torch.as_tensor(bag["attention"], dtype=torch.float32),
                "coords": torch.as_tensor(bag["coords"], dtype=torch.int64),
            }
            for bag_id, bag in bags.items()
        },
        fold_dir / "attention.pt",
    )
    return fold_dir


def grid_boxes(height: int, width: int, tile: int) -> np.ndarray:
    """Boxes ``x0, y0, x1, y1`` of a row-major grid of ``tile``-pixel tiles."""
    return np.array(
        [
            (x, y, x + tile, y + tile)
            for y in range(0, height - tile + 1, tile)
            for x in range(0, width - tile + 1, tile)
        ],
        dtype=np.int64,
    )
