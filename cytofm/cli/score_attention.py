"""Score the ABMIL attention of a ``cytofm-eval-mil`` run against per-cell ground truth.

For each feature set of the run, the test-fold attention of every positive bag is compared
with the cells marked abnormal in a ``cells.csv`` (``bag_id,x0,y0,x1,y1,abnormal``, as the demo
set writes it): how often the top-attention tile contains an abnormal cell, against chance, and
the mean per-bag AUROC of attention for abnormal tiles.

    python -m cytofm.cli.score_attention RUN_DIR CELLS_CSV
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cytofm.evaluation.attention_scoring import load_run_attention, read_cell_boxes, score_attention


def main(argv: Sequence[str] | None = None) -> int:
    """Print a Markdown table of attention scores; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m cytofm.cli.score_attention")
    parser.add_argument("run", type=Path, help="output folder of cytofm-eval-mil")
    parser.add_argument("cells", type=Path, help="cells.csv with per-cell boxes and labels")
    parser.add_argument("--head", default="abmil", help="MIL head whose attention is scored")
    args = parser.parse_args(argv)

    try:
        cells = read_cell_boxes(args.cells)
        feature_sets = sorted(
            path.name for path in args.run.iterdir() if (path / args.head).is_dir()
        )
    except (FileNotFoundError, ValueError) as error:
        sys.stderr.write(f"score_attention: {error}\n")
        return 1
    if not feature_sets:
        sys.stderr.write(f"score_attention: no {args.head} attention under {args.run}\n")
        return 1

    print("| feature set | bags scored | top tile abnormal | chance | attention AUROC |")
    print("|---|---|---|---|---|")
    for name in feature_sets:
        score = score_attention(load_run_attention(args.run, name, args.head), cells)
        print(
            f"| {name} | {score.num_bags} | {score.top1_hit_rate:.2f} | "
            f"{score.top1_chance:.2f} | {score.mean_instance_auroc:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
