"""Synthetic feature sets with known ground truth, for tests, benchmarks and sanity checks.

In a planted-signal set every positive bag contains exactly one marker instance whose first
features are shifted by ``marker``; every other instance is standard normal noise. A MIL head
that works separates the classes and puts its attention on the marker instance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cytofm.evaluation.feature_store import (
    FEATURE_FORMAT,
    FEATURE_FORMAT_VERSION,
    IndexRow,
    safe_file_name,
    save_bag_features,
    write_index,
    write_meta,
)


@dataclass
class SyntheticBags:
    """Bags with labels, groups and the position of the planted instance.

    Attributes:
        bag_ids: bag ids.
        bags: per bag, ``[N, D]`` float32 features.
        labels: per bag, ``negative`` or ``positive``.
        groups: per bag, its group (several bags per group).
        marker_index: per bag, the position of the marker instance, or None (negative bags).
    """

    bag_ids: list[str]
    bags: list[Tensor]
    labels: list[str]
    groups: list[str]
    marker_index: list[int | None]


def planted_signal_bags(
    num_bags: int,
    *,
    dim: int = 16,
    min_instances: int = 5,
    max_instances: int = 20,
    marker: float = 4.0,
    marker_dims: int = 1,
    bags_per_group: int = 2,
    random_labels: bool = False,
    seed: int = 0,
) -> SyntheticBags:
    """Generate ``num_bags`` bags, half of them positive (alternating).

    The marker instance has its first ``marker_dims`` features shifted by ``marker``. With
    ``random_labels`` the marker is still planted in the even bags but the labels are a
    random permutation, so no head can beat chance.
    """
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    bag_ids, bags, labels, groups, markers = [], [], [], [], []
    for index in range(num_bags):
        size = int(rng.integers(min_instances, max_instances + 1))
        features = torch.randn(size, dim, generator=generator)
        positive = index % 2 == 0
        marker_index = None
        if positive:
            marker_index = int(rng.integers(0, size))
            features[marker_index, :marker_dims] += marker
        bag_ids.append(f"case {index:04d}/slide")
        bags.append(features)
        labels.append("positive" if positive else "negative")
        groups.append(f"patient{index // bags_per_group:04d}")
        markers.append(marker_index)
    if random_labels:
        labels = [labels[i] for i in rng.permutation(num_bags)]
    return SyntheticBags(bag_ids, bags, labels, groups, markers)


def write_feature_set(
    folder: str | Path,
    data: SyntheticBags,
    *,
    with_groups: bool = True,
    source: str = "synthetic",
) -> Path:
    """Write ``data`` in the layout of ``cytofm-extract`` and return the folder.

    Instance ``i`` gets the box ``(16 i, 0, 16 i + 16, 16)``.
    """
    folder = Path(folder)
    rows = []
    for bag_id, features, label, group in zip(data.bag_ids, data.bags, data.labels, data.groups):
        count = features.shape[0]
        left = torch.arange(count, dtype=torch.int64) * 16
        coords = torch.stack(
            [left, torch.zeros_like(left), left + 16, torch.full_like(left, 16)], 1
        )
        file = safe_file_name(bag_id)
        save_bag_features(folder / "features" / file, features, coords)
        rows.append(IndexRow(bag_id, label, group if with_groups else None, None, count, file))
    write_index(rows, folder / "index.csv")
    embed_dim = int(data.bags[0].shape[1]) if data.bags else 0
    write_meta(
        {
            "format": FEATURE_FORMAT,
            "version": FEATURE_FORMAT_VERSION,
            "backbone": {"source": source},
            "embed_dim": embed_dim,
        },
        folder / "meta.json",
    )
    return folder
