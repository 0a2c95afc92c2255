"""Bag labels, groups and features gathered for cross-validation."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cytofm.evaluation.config import FeatureSetConfig, LabelsConfig
from cytofm.evaluation.feature_store import FeatureSet

logger = logging.getLogger(__name__)


@dataclass
class LabelTable:
    """The labelled bags of a task, in a fixed order shared by every feature set.

    Attributes:
        bag_ids: bag ids.
        labels: ``[n]`` class indices into ``class_names``.
        groups: ``[n]`` group names, or None when the task has no groups.
        class_names: class names in output order.
    """

    bag_ids: list[str]
    labels: np.ndarray
    groups: np.ndarray | None
    class_names: list[str]


def _read_rows(config: LabelsConfig, csv_path: Path) -> list[dict[str, str]]:
    if not csv_path.is_file():
        raise FileNotFoundError(f"labels table not found: {csv_path}; check labels.csv")
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        for column in (config.id_column, config.label_column):
            if column not in columns:
                raise ValueError(f"{csv_path}: column {column!r} not found (columns: {columns})")
        return list(reader)


def load_label_table(
    config: LabelsConfig,
    default_csv: Path,
    feature_bag_ids: list[str],
    *,
    feature_set: str | None = None,
) -> LabelTable:
    """Read bag labels and groups and map labels onto classes.

    Args:
        config: the label task.
        default_csv: labels table used when ``config.csv`` is None (a feature index).
        feature_bag_ids: bags that have features; each needs a label unless
            ``config.drop_unlabelled``.
        feature_set: the feature set named in errors; None names ``default_csv``'s folder.

    Raises:
        ValueError: a bag without a label (naming it), a labelled bag without features unless
            ``config.allow_missing_features``, a label absent from ``mapping`` or
            ``classes``, duplicated bag ids, a bag with a group missing while others have one,
            or fewer than two classes.
    """
    csv_path = Path(config.csv) if config.csv is not None else default_csv
    rows = _read_rows(config, csv_path)
    raw_labels: dict[str, str] = {}
    raw_groups: dict[str, str] = {}
    has_groups = bool(config.group_column) and bool(rows) and config.group_column in rows[0]
    for row in rows:
        bag_id = row[config.id_column]
        if bag_id in raw_labels:
            raise ValueError(f"{csv_path}: bag {bag_id!r} is listed twice")
        raw_labels[bag_id] = (row[config.label_column] or "").strip()
        if has_groups:
            raw_groups[bag_id] = (row[config.group_column] or "").strip()

    _check_labelled_bags_have_features(
        config,
        csv_path,
        raw_labels,
        feature_bag_ids,
        feature_set or str(default_csv.parent),
    )
    bag_ids: list[str] = []
    for bag_id in feature_bag_ids:
        if not raw_labels.get(bag_id):
            if config.drop_unlabelled:
                logger.warning("bag %r has no label in %s; left out", bag_id, csv_path)
                continue
            raise ValueError(
                f"bag {bag_id!r} has no label in {csv_path} (column {config.label_column!r}); "
                "add it or set labels.drop_unlabelled=true"
            )
        bag_ids.append(bag_id)

    names: list[str] = []
    kept: list[str] = []
    for bag_id in bag_ids:
        raw = raw_labels[bag_id]
        if config.mapping is not None:
            if raw not in config.mapping:
                raise ValueError(
                    f"label {raw!r} of bag {bag_id!r} is not in labels.mapping "
                    f"(keys: {sorted(config.mapping)}); map it, or map it to null to leave it out"
                )
            if config.mapping[raw] is None:
                continue
            raw = str(config.mapping[raw])
        kept.append(bag_id)
        names.append(raw)

    class_names = list(config.classes) if config.classes else sorted(set(names))
    unknown = sorted(set(names) - set(class_names))
    if unknown:
        raise ValueError(f"labels {unknown} are not in labels.classes {class_names}")
    if len(class_names) < 2:
        raise ValueError(f"the task needs at least two classes, found {class_names} in {csv_path}")
    labels = np.array([class_names.index(name) for name in names], dtype=np.int64)

    groups = None
    group_values = [raw_groups.get(bag_id, "") for bag_id in kept]
    if has_groups and any(group_values):
        missing = [bag_id for bag_id, group in zip(kept, group_values) if not group]
        if missing:
            raise ValueError(
                f"bag {missing[0]!r} has no {config.group_column!r} in {csv_path} while other "
                "bags do; give every bag a group or set labels.group_column=null"
            )
        groups = np.array(group_values)
    return LabelTable(kept, labels, groups, class_names)


def _check_labelled_bags_have_features(
    config: LabelsConfig,
    csv_path: Path,
    raw_labels: dict[str, str],
    feature_bag_ids: list[str],
    feature_set: str,
) -> None:
    """Raise unless every bag with a label (not mapped to null) has features."""
    have_features = set(feature_bag_ids)
    missing = []
    for bag_id, raw in raw_labels.items():
        if not raw or bag_id in have_features:
            continue
        if config.mapping is not None and config.mapping.get(raw, "") is None:
            continue
        missing.append(bag_id)
    if not missing:
        return
    examples = ", ".join(repr(bag_id) for bag_id in missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    if config.allow_missing_features:
        logger.warning(
            "%d labelled bag(s) of %s have no features in %s and are left out: %s%s",
            len(missing),
            csv_path,
            feature_set,
            examples,
            more,
        )
        return
    raise ValueError(
        f"{len(missing)} labelled bag(s) of {csv_path} have no features in the feature set "
        f"{feature_set}: {examples}{more}; extract them, remove them from the "
        "labels, or set labels.allow_missing_features=true"
    )


@dataclass
class LoadedFeatures:
    """Instance features of one feature set, aligned with a :class:`LabelTable`.

    Attributes:
        bags: per bag, ``[N, D]`` float32 instance features.
        coords: per bag, ``[N, 4]`` int64 instance boxes (x0, y0, x1, y1) in source pixels.
        embed_dim: ``D``.
    """

    bags: list[Tensor]
    coords: list[Tensor]
    embed_dim: int


def _token_boxes(tile_boxes: Tensor, grid: tuple[int, int]) -> Tensor:
    """Split each tile box ``[N, 4]`` into a ``rows x cols`` grid of token boxes ``[N*T, 4]``."""
    rows, cols = grid
    x0, y0, x1, y1 = tile_boxes.double().unbind(dim=1)
    col = torch.arange(cols, dtype=torch.float64)
    row = torch.arange(rows, dtype=torch.float64)
    width = ((x1 - x0) / cols)[:, None, None]
    height = ((y1 - y0) / rows)[:, None, None]
    left = x0[:, None, None] + width * col[None, None, :]
    top = y0[:, None, None] + height * row[None, :, None]
    left, top = torch.broadcast_tensors(left, top)
    boxes = torch.stack([left, top, left + width.expand_as(left), top + height.expand_as(top)], -1)
    return boxes.round().long().reshape(-1, 4)


def _check_finite(values: Tensor, bag_id: str, file: Path, what: str) -> None:
    if not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise ValueError(
            f"bag {bag_id!r} has {bad} non-finite value(s) in its {what} ({file}); extract "
            "it again with overwrite=true, e.g. with precision=fp32"
        )


def load_features(feature_set: FeatureSetConfig, bag_ids: list[str]) -> LoadedFeatures:
    """Load the features of ``bag_ids`` from a feature set folder.

    Raises:
        BagNotFoundError: a bag has no features in this set (naming the bag and the folder).
        ValueError: a bag has no instances or non-finite values, a file cannot be read,
            patch tokens are requested but were not
            extracted, or the feature size differs between bags.
    """
    store = FeatureSet(feature_set.path)
    bags, coords = [], []
    for bag_id in bag_ids:
        record = store.load(bag_id)
        file = store.root / "features" / store.row(bag_id).file
        if record["features"].shape[0] == 0:
            raise ValueError(
                f"bag {bag_id!r} has no instances ({file}): its image is smaller than "
                "bags.tile_size (the padding counts as glass), or bags.background_threshold "
                "dropped every tile. Extract it "
                "again with a smaller tile_size or a higher background_threshold, or leave it "
                "out with a labels.csv without it and labels.drop_unlabelled=true"
            )
        if feature_set.instances == "patch_tokens":
            if "patch_tokens" not in record or "patch_grid" not in record:
                raise ValueError(
                    f"{file} has no patch tokens; extract {feature_set.name!r} with "
                    "patch_tokens=true or use instances=tiles"
                )
            tokens = record["patch_tokens"]
            _check_finite(tokens, bag_id, file, "patch tokens")
            grid = tuple(int(size) for size in record["patch_grid"].tolist())
            bags.append(tokens.reshape(-1, tokens.shape[-1]).float())
            coords.append(_token_boxes(record["coords"], grid))
        else:
            _check_finite(record["features"], bag_id, file, "features")
            bags.append(record["features"].float())
            coords.append(record["coords"])
    dims = {bag.shape[1] for bag in bags}
    if len(dims) != 1:
        raise ValueError(f"feature set {feature_set.path} mixes feature sizes {sorted(dims)}")
    return LoadedFeatures(bags, coords, dims.pop())
