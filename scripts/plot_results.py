"""Draw a bar chart of cytofm-eval-mil results: one group per task, one bar per feature set.

    python scripts/plot_results.py outputs/real/eval --out docs/figures/results.png

Reads ``<eval dir>/<task>/results.json`` for every task folder, plots the mean balanced
accuracy of the ABMIL head with the standard deviation over folds as error bars, and writes a
PNG.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read_rows(eval_dir: Path, head: str, metric: str) -> dict[str, dict[str, tuple[float, float]]]:
    """Return ``{task: {feature set: (mean, std)}}`` for one head and metric."""
    table: dict[str, dict[str, tuple[float, float]]] = {}
    for path in sorted(eval_dir.glob("*/results.json")):
        results = json.loads(path.read_text())
        rows = {
            row["feature_set"]: (row[metric]["mean"], row[metric]["std"])
            for row in results["rows"]
            if row["head"] == head
        }
        if rows:
            table[path.parent.name] = rows
    if not table:
        raise SystemExit(f"no results.json with head {head!r} under {eval_dir}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("eval_dir", type=Path, help="folder holding one eval run per task")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--head", default="abmil", help="MIL head to plot")
    parser.add_argument("--metric", default="balanced_accuracy", help="metric key to plot")
    args = parser.parse_args()

    table = read_rows(args.eval_dir, args.head, args.metric)
    tasks = list(table)
    feature_sets = sorted({name for rows in table.values() for name in rows})
    width = 0.8 / len(feature_sets)
    positions = np.arange(len(tasks))

    figure, axes = plt.subplots(figsize=(1.9 * len(tasks) + 2, 3.6), dpi=150)
    for index, name in enumerate(feature_sets):
        means = [table[task].get(name, (np.nan, 0.0))[0] for task in tasks]
        stds = [table[task].get(name, (np.nan, 0.0))[1] for task in tasks]
        axes.bar(
            positions + (index - (len(feature_sets) - 1) / 2) * width,
            means,
            width,
            yerr=stds,
            capsize=3,
            label=name,
        )
    axes.set_xticks(positions, [task.replace("_", "\n") for task in tasks])
    axes.set_ylabel(f"{args.metric.replace('_', ' ')} ({args.head})")
    axes.set_ylim(0, 1)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    axes.set_title("5-fold cross-validation, mean ± std over folds")
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
