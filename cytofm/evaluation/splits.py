"""Cross-validation splits: stratified by label and grouped (a patient never spans folds)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

Split = tuple[np.ndarray, np.ndarray]


def _folds(labels: np.ndarray, groups: np.ndarray | None, n_splits: int, seed: int) -> list[Split]:
    placeholder = np.zeros(len(labels))
    if groups is None:
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        return list(splitter.split(placeholder, labels))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return list(splitter.split(placeholder, labels, groups))


def cross_validation_folds(
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[str] | np.ndarray | None,
    n_splits: int,
    seed: int,
    *,
    class_names: Sequence[str] | None = None,
) -> list[Split]:
    """Split bag positions into ``n_splits`` (train, test) folds.

    Folds are stratified by label; when ``groups`` is given, all bags of one group land in
    the same test fold. The same seed always gives the same folds. ``class_names`` (indexed
    by label) only serve error messages.

    Raises:
        ValueError: fewer groups (or bags) than folds, or a class with fewer bags than folds.
    """
    labels = np.asarray(labels)
    if n_splits < 2:
        raise ValueError(f"folds must be at least 2, got {n_splits}")
    counts = np.bincount(labels)
    present = counts[counts > 0]
    if present.min() < n_splits:
        smallest = int(np.flatnonzero(counts == present.min())[0])
        name = repr(class_names[smallest]) if class_names is not None else str(smallest)
        raise ValueError(
            f"class {name} has {present.min()} bag(s), fewer than folds={n_splits}; "
            "lower the number of folds or merge classes with labels.mapping"
        )
    group_array = None if groups is None else np.asarray(groups)
    if group_array is not None and len(np.unique(group_array)) < n_splits:
        raise ValueError(
            f"only {len(np.unique(group_array))} groups for folds={n_splits}; "
            "lower the number of folds"
        )
    return _folds(labels, group_array, n_splits, seed)


def train_validation_split(
    train_positions: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[str] | np.ndarray | None,
    val_fraction: float,
    seed: int,
) -> Split:
    """Hold out about ``val_fraction`` of a training fold for early stopping.

    The hold-out is stratified by label and keeps groups whole, like the outer folds.

    Returns:
        ``(train, validation)`` positions into the full bag list (subsets of
        ``train_positions``).
    """
    if not 0.0 < val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    labels = np.asarray(labels)[train_positions]
    group_array = None if groups is None else np.asarray(groups)[train_positions]
    n_splits = max(2, round(1.0 / val_fraction))
    if group_array is not None:
        n_splits = min(n_splits, len(np.unique(group_array)))
    n_splits = min(n_splits, int(np.bincount(labels)[np.bincount(labels) > 0].min()))
    if n_splits < 2:
        raise ValueError(
            "a training fold has a class with a single bag or a single group, so no "
            "validation split is possible; use fewer folds or more data"
        )
    inner_train, validation = _folds(labels, group_array, n_splits, seed)[0]
    return train_positions[inner_train], train_positions[validation]
