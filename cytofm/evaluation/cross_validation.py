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


def resolve_device(name: str) -> torch.device:
    """Turn ``auto`` into CUDA when available (else CPU); other names pass to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available; use device=cpu")
    return device


def fold_seed(seed: int, fold: int) -> int:
    """Seed of the model initialisation and batch order of one fold, shared by every row."""
    return seed * 1000 + fold


def load_task(config: EvalConfig) -> LabelTable:
    """Read the labels of the bags of the first feature set, as configured."""
    if not config.feature_sets:
        raise ValueError("feature_sets is empty; list at least one {name, path} to evaluate")
    first = FeatureSet(config.feature_sets[0].path)
    return load_label_table(config.labels, first.root / "index.csv", first.bag_ids)


Splits = dict[int, list[tuple[tuple[np.ndarray, np.ndarray], np.ndarray]]]


def build_splits(table: LabelTable, config: EvalConfig) -> Splits:
    """Per seed, the folds as ``((train, validation), test)`` positions into ``table``."""
    splits: Splits = {}
    for seed in config.seeds:
        folds = cross_validation_folds(table.labels, table.groups, config.folds, seed)
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
    config: EvalConfig, out_dir: str | Path | None = None
) -> CrossValidationResult:
    """Cross-validate every configured head on every feature set.

    All rows see the same folds, validation splits and initialisation seeds, so their
    differences come from the features and the head. Per-fold predictions and attention go to
    ``out_dir/<feature set>/<head>/seed<s>/fold<k>/`` when ``out_dir`` is given.

    Raises:
        ValueError: on an empty bag, a missing label or too few bags per class or group
            (each message names the bag, label or value).
        KeyError: a labelled bag has no features in one of the sets.
    """
    device = resolve_device(config.device)
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
