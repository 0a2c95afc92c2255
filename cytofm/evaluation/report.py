"""Output files of a cross-validation run: per-fold predictions and the comparison table."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from cytofm.evaluation.metrics import METRIC_NAMES, summarize
from cytofm.utils.io import atomic_torch_save, atomic_write_text

if TYPE_CHECKING:
    from cytofm.evaluation.bag_table import LabelTable
    from cytofm.evaluation.cross_validation import CrossValidationResult

METRIC_TITLES = {
    "balanced_accuracy": "balanced accuracy",
    "accuracy": "accuracy",
    "macro_f1": "macro F1",
    "weighted_f1": "weighted F1",
    "auroc": "AUROC",
}


def write_fold_outputs(
    folder: Path,
    table: LabelTable,
    test_positions: np.ndarray,
    probabilities: np.ndarray,
    attention: list[np.ndarray],
    coords: list[Tensor],
) -> None:
    """Write ``predictions.csv`` and ``attention.pt`` of one fold's test bags.

    ``attention.pt`` maps each bag id to ``{"attention": float32 [N], "coords": int64 [N, 4]}``
    in the instance order of the feature file.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["bag_id", "group", "label", "predicted"] + [f"prob_{name}" for name in table.class_names]
    )
    for row, position in enumerate(test_positions):
        group = "" if table.groups is None else table.groups[position]
        writer.writerow(
            [
                table.bag_ids[position],
                group,
                table.class_names[table.labels[position]],
                table.class_names[int(probabilities[row].argmax())],
            ]
            + [f"{value:.6f}" for value in probabilities[row]]
        )
    atomic_write_text(buffer.getvalue(), folder / "predictions.csv")
    record = {
        table.bag_ids[position]: {
            "attention": torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)),
            "coords": coords[row].clone(),
        }
        for row, (position, weights) in enumerate(zip(test_positions, attention))
    }
    atomic_torch_save(record, folder / "attention.pt")


def _cell(mean: float, std: float) -> str:
    return "n/a" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}"


def summary_rows(result: CrossValidationResult) -> list[dict[str, Any]]:
    """Summarise each table row: names, run count, and mean, std and count of every metric."""
    rows = []
    for row in result.rows:
        entry: dict[str, Any] = {
            "feature_set": row.feature_set,
            "head": row.head,
            "runs": len(row.folds),
        }
        for name in METRIC_NAMES:
            mean, std, count = summarize([fold.metrics[name] for fold in row.folds])
            entry[name] = {"mean": mean, "std": std, "n": count}
        entry["confusion"] = np.sum([fold.confusion for fold in row.folds], axis=0).tolist()
        rows.append(entry)
    return rows


def render_markdown(result: CrossValidationResult, rows: list[dict[str, Any]]) -> str:
    """Render the comparison table and the summed confusion matrices as Markdown."""
    header = ["feature set", "head", "runs"] + [METRIC_TITLES[name] for name in METRIC_NAMES]
    lines = [
        f"# MIL cross-validation: {result.num_bags} bags, classes {', '.join(result.class_names)}",
        "",
        "Mean ± sample standard deviation over all (seed, fold) runs; AUROC is binary for two",
        "classes and one-vs-rest macro for more, and leaves out folds that lack a class.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in rows:
        cells = [row["feature_set"], row["head"], str(row["runs"])]
        cells += [_cell(row[name]["mean"], row[name]["std"]) for name in METRIC_NAMES]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Confusion matrices (summed over runs; rows true, columns predicted)"]
    for row in rows:
        lines += ["", f"### {row['feature_set']} / {row['head']}", ""]
        lines.append("| true \\ predicted | " + " | ".join(result.class_names) + " |")
        lines.append("|" + "---|" * (len(result.class_names) + 1))
        for name, counts in zip(result.class_names, row["confusion"]):
            lines.append(f"| {name} | " + " | ".join(str(value) for value in counts) + " |")
    return "\n".join(lines) + "\n"


def render_csv(rows: list[dict[str, Any]]) -> str:
    """Render the comparison table as CSV with ``<metric>_mean`` and ``<metric>_std`` columns."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = ["feature_set", "head", "runs"]
    for name in METRIC_NAMES:
        columns += [f"{name}_mean", f"{name}_std"]
    writer.writerow(columns)
    for row in rows:
        values = [row["feature_set"], row["head"], row["runs"]]
        for name in METRIC_NAMES:
            values += [f"{row[name]['mean']:.6f}", f"{row[name]['std']:.6f}"]
        writer.writerow(values)
    return buffer.getvalue()


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def write_comparison(result: CrossValidationResult, out_dir: str | Path) -> list[dict[str, Any]]:
    """Write ``results.md``, ``results.csv`` and ``results.json`` (with every fold) to ``out_dir``.

    NaN metrics become ``n/a`` in Markdown, ``nan`` in CSV and null in JSON.
    """
    out_dir = Path(out_dir)
    rows = summary_rows(result)
    atomic_write_text(render_markdown(result, rows), out_dir / "results.md")
    atomic_write_text(render_csv(rows), out_dir / "results.csv")
    payload = {
        "classes": result.class_names,
        "num_bags": result.num_bags,
        "rows": [
            {**summary, "folds": [asdict(fold) for fold in row.folds]}
            for summary, row in zip(rows, result.rows)
        ],
    }
    atomic_write_text(json.dumps(_json_safe(payload), indent=2) + "\n", out_dir / "results.json")
    return rows
