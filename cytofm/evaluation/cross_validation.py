"""k-fold cross-validation of MIL heads over one or more feature sets."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cytofm.evaluation.abmil import StandardizedHead, build_mil_head, feature_statistics
from cytofm.evaluation.bag_table import (
    LabelTable,
    LoadedFeatures,
    load_features,
    load_label_table,
)
from cytofm.evaluation.config import EvalConfig
from cytofm.evaluation.feature_store import FeatureSet
from cytofm.evaluation.metrics import classification_metrics, confusion
from cytofm.evaluation.report import write_fold_outputs
from cytofm.evaluation.splits import cross_validation_folds, train_validation_split
from cytofm.evaluation.train import predict, train_head

logger = logging.getLogger(__name__)


@dataclass
class FoldResult:
    """Metrics and bookkeeping of one (seed, fold) run."""

    seed: int
    fold: int
    metrics: dict[str, float]
    confusion: list[list[int]]
    best_epoch: int
    epochs_run: int
    num_train: int
    num_val: int
    num_test: int


@dataclass
class RowResult:
    """All folds of one feature set with one head: a row of the comparison table."""

    feature_set: str
    head: str
    folds: list[FoldResult] = field(default_factory=list)


@dataclass
class CrossValidationResult:
    """Output of :func:`run_cross_validation`."""

    class_names: list[str]
    rows: list[RowResult]
    num_bags: int


class DeviceUnavailableError(RuntimeError):
    """The configured device does not exist on this machine."""


def resolve_device(name: str) -> torch.device:
    """Turn ``auto`` into CUDA when available (else CPU); other names pass to torch.device.

    Raises:
        DeviceUnavailableError: a CUDA device is requested but CUDA is not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"CUDA requested but not available (device={name}); use device=cpu or auto"
        )
    return device


def fold_seed(seed: int, fold: int) -> int:
    """Seed of the model initialisation and batch order of one fold, shared by every row."""
    return seed * 1000 + fold


def load_task(config: EvalConfig) -> LabelTable:
    """Check the feature sets and read the labels of their bags, as configured.

    Every feature set is opened here, before any training, so a missing folder or a set with
    different bags fails at once.

    Raises:
        FileNotFoundError: a feature set folder or its index is missing.
        ValueError: the feature sets do not all contain the same bag ids, or a label error
            of :func:`load_label_table`.
    """
    if not config.feature_sets:
        raise ValueError("feature_sets is empty; list at least one {name, path} to evaluate")
    stores = [FeatureSet(feature_set.path) for feature_set in config.feature_sets]
    check_same_bags(config, stores)
    first, store = config.feature_sets[0], stores[0]
    return load_label_table(
        config.labels,
        store.root / "index.csv",
        store.bag_ids,
        feature_set=f"{first.name!r} ({store.root})",
    )


def check_same_bags(config: EvalConfig, stores: list[FeatureSet]) -> None:
    """Raise a ValueError naming the sets and example ids when two sets contain different bags."""
    reference = set(stores[0].bag_ids)
    first = config.feature_sets[0]
    for feature_set, store in zip(config.feature_sets[1:], stores[1:]):
        ids = set(store.bag_ids)
        if ids == reference:
            continue
        only_first = sorted(reference - ids)
        only_other = sorted(ids - reference)
        parts = []
        for name, missing in ((feature_set.name, only_first), (first.name, only_other)):
            if missing:
                examples = ", ".join(repr(bag_id) for bag_id in missing[:5])
                more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                parts.append(f"{len(missing)} bag(s) missing from {name!r}: {examples}{more}")
        raise ValueError(
            f"feature sets {first.name!r} ({stores[0].root}) and {feature_set.name!r} "
            f"({store.root}) contain different bags ({'; '.join(parts)}); extract every "
            "set from the same bags"
        )


Splits = dict[int, list[tuple[tuple[np.ndarray, np.ndarray], np.ndarray]]]


def build_splits(table: LabelTable, config: EvalConfig) -> Splits:
    """Per seed, the folds as ``((train, validation), test)`` positions into ``table``."""
    splits: Splits = {}
    for seed in config.seeds:
        folds = cross_validation_folds(
            table.labels, table.groups, config.folds, seed, class_names=table.class_names
        )
        splits[seed] = []
        for fold, (train, test) in enumerate(folds):
            inner = train_validation_split(
                train,
                table.labels,
                table.groups,
                config.train.val_fraction,
                fold_seed(seed, fold),
            )
            splits[seed].append((inner, test))
    return splits


def run_fold(
    config: EvalConfig,
    table: LabelTable,
    features: LoadedFeatures,
    bags: list[torch.Tensor],
    head: str,
    seed: int,
    fold: int,
    positions: tuple[tuple[np.ndarray, np.ndarray], np.ndarray],
    *,
    device: torch.device,
    name: str,
    out_dir: Path | None,
) -> FoldResult:
    """Train one head on one fold, test it, and write its predictions and attention."""
    (train, validation), test = positions
    num_classes = len(table.class_names)
    torch.manual_seed(fold_seed(seed, fold))
    model = build_mil_head(
        head,
        features.embed_dim,
        num_classes,
        hidden_dim=config.model.hidden_dim,
        attention_dim=config.model.attention_dim,
        dropout=config.model.dropout,
    )
    if config.train.standardize:
        mean, std = feature_statistics(bags, train.tolist())
        model = StandardizedHead(model, mean.to(bags[0].device), std.to(bags[0].device))
    trained = train_head(
        model,
        bags,
        table.labels,
        train,
        validation,
        config.train,
        num_classes=num_classes,
        seed=fold_seed(seed, fold),
        device=device,
        description=name,
    )
    probabilities, attention = predict(
        model, bags, test, batch_size=config.train.batch_size, device=device
    )
    metrics = classification_metrics(table.labels[test], probabilities)
    logger.info("%s: %s (best epoch %d)", name, _format(metrics), trained.best_epoch)
    if out_dir is not None:
        coords = [features.coords[position] for position in test]
        write_fold_outputs(out_dir, table, test, probabilities, attention, coords)
    return FoldResult(
        seed=seed,
        fold=fold,
        metrics=metrics,
        confusion=confusion(table.labels[test], probabilities).tolist(),
        best_epoch=trained.best_epoch,
        epochs_run=trained.epochs_run,
        num_train=len(train),
        num_val=len(validation),
        num_test=len(test),
    )


def run_cross_validation(
    config: EvalConfig, out_dir: str | Path | None = None, *, table: LabelTable | None = None
) -> CrossValidationResult:
    """Cross-validate every configured head on every feature set.

    All rows see the same folds, validation splits and initialisation seeds, so their
    differences come from the features and the head. Per-fold predictions and attention go to
    ``out_dir/<feature set>/<head>/seed<s>/fold<k>/`` when ``out_dir`` is given. ``table`` is
    the result of :func:`load_task` when the caller has already run it on ``config``.

    Raises:
        ValueError: on an empty or unreadable bag, a missing label, feature sets with
            different bags, or too few bags per class or group (each message names the bag,
            label or value).
        FileNotFoundError: a feature set folder, index or feature file is missing.
        DeviceUnavailableError: CUDA is requested but not available.
    """
    device = resolve_device(config.device)
    if table is None:
        table = load_task(config)
    counts = np.bincount(table.labels, minlength=len(table.class_names))
    logger.info(
        "%d bags, classes %s, %s",
        len(table.bag_ids),
        dict(zip(table.class_names, counts.tolist())),
        "grouped" if table.groups is not None else "no groups",
    )
    splits = build_splits(table, config)

    runs = len(config.feature_sets) * len(config.model.heads) * len(config.seeds) * config.folds
    progress = tqdm(total=runs, desc="cross-validation", unit="fold", disable=None)
    rows = []
    for feature_set in config.feature_sets:
        features = load_features(feature_set, table.bag_ids)
        bags = features.bags
        if device.type == "cuda":
            bags = [bag.to(device) for bag in bags]
        for head in config.model.heads:
            row = RowResult(feature_set.name, head)
            for seed in config.seeds:
                for fold, positions in enumerate(splits[seed]):
                    name = f"{feature_set.name}/{head}/seed{seed}/fold{fold}"
                    fold_dir = None if out_dir is None else Path(out_dir) / name
                    result = run_fold(
                        config,
                        table,
                        features,
                        bags,
                        head,
                        seed,
                        fold,
                        positions,
                        device=device,
                        name=name,
                        out_dir=fold_dir,
                    )
                    row.folds.append(result)
                    progress.update(1)
            rows.append(row)
    progress.close()
    return CrossValidationResult(table.class_names, rows, len(table.bag_ids))


def _format(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{name} {value:.3f}" for name, value in metrics.items())
