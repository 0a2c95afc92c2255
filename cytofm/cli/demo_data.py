"""``cytofm-demo-data``: write the synthetic cytology demo set."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from cytofm.data.demo import generate_demo_set
from cytofm.utils.logging import setup_logging

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``cytofm-demo-data``."""
    parser = argparse.ArgumentParser(
        prog="cytofm-demo-data",
        description=(
            "Write synthetic cytology fields (images/*.png), bag labels (labels.csv) and "
            "per-cell boxes (cells.csv) for trying CytoFM without data of your own."
        ),
    )
    parser.add_argument("out_dir", type=Path, help="output folder (created if missing)")
    parser.add_argument("--num-images", type=int, default=200, help="number of images (bags)")
    parser.add_argument("--image-size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files")
    parser.add_argument(
        "--positive-fraction",
        type=float,
        default=0.5,
        help="expected share of images holding at least one abnormal cell",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the process exit status."""
    args = build_parser().parse_args(argv)
    setup_logging()
    summary = generate_demo_set(
        args.out_dir,
        num_images=args.num_images,
        image_size=args.image_size,
        seed=args.seed,
        positive_fraction=args.positive_fraction,
    )
    logger.info(
        "demo set ready: %s (labels.csv, cells.csv, images/); %d of %d bags positive",
        summary.out_dir,
        summary.num_positive,
        summary.num_images,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
