"""Classification metrics from scikit-learn and their mean and standard deviation over folds."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)

logger = logging.getLogger(__name__)

METRIC_NAMES = ("balanced_accuracy", "accuracy", "macro_f1", "weighted_f1", "auroc")


def auroc(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    """AUROC: binary for two classes, one-vs-rest macro average for more.

    Returns NaN when the set lacks a class, because the score is undefined there.
    """
    num_classes = probabilities.shape[1]
    present = np.unique(y_true)
    if num_classes == 2:
        if len(present) < 2:
            return math.nan
        return float(roc_auc_score(y_true, probabilities[:, 1]))
    if len(present) < num_classes:
        return math.nan
    return float(
        roc_auc_score(
            y_true, probabilities, multi_class="ovr", average="macro", labels=range(num_classes)
        )
    )


def classification_metrics(y_true: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Compute the metrics of :data:`METRIC_NAMES` from true labels and class probabilities.

    Args:
        y_true: ``[n]`` integer labels in ``0 .. C-1``.
        probabilities: ``[n, C]`` predicted class probabilities.
    """
    y_true = np.asarray(y_true)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    num_classes = probabilities.shape[1]
    y_pred = probabilities.argmax(axis=1)
    labels = list(range(num_classes))
    return {
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        ),
        "weighted_f1": float(
            f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)
        ),
        "auroc": auroc(y_true, probabilities),
    }


def confusion(y_true: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Confusion matrix ``[C, C]``: rows are true classes, columns predicted classes."""
    num_classes = np.asarray(probabilities).shape[1]
    y_pred = np.asarray(probabilities).argmax(axis=1)
    return confusion_matrix(y_true, y_pred, labels=list(range(num_classes)))


def summarize(values: Sequence[float]) -> tuple[float, float, int]:
    """Return the mean, the sample standard deviation (ddof=1) and the count of finite values.

    NaN values (an AUROC on a fold without both classes) are left out. The standard
    deviation is 0 for a single value and NaN when no value is finite.
    """
    finite = np.asarray([value for value in values if not math.isnan(value)], dtype=np.float64)
    if finite.size == 0:
        return math.nan, math.nan, 0
    std = float(finite.std(ddof=1)) if finite.size > 1 else 0.0
    return float(finite.mean()), std, int(finite.size)
