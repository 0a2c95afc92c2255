"""``cytofm-demo-data``: write the synthetic cytology demo set."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from cytofm.data.demo import generate_demo_set
from cytofm.utils.logging import setup_logging

logger = logging.getLogger(__name__)


def _at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its message for unparsable text
    return parse


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``cytofm-demo-data``."""
    parser = argparse.ArgumentParser(
        prog="cytofm-demo-data",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=(
            "Write synthetic cytology fields (images/*.png), bag labels (labels.csv) and "
            "per-cell boxes (cells.csv) for trying CytoFM without data of your own."
        ),
    )
    parser.add_argument("out_dir", type=Path, help="output folder (created if missing)")
    parser.add_argument(
        "--num-images", type=_at_least(1), default=200, help="number of images (bags)"
    )
    parser.add_argument(
        "--image-size", type=_at_least(64), default=256, help="image side in pixels"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files")
    parser.add_argument(
        "--positive-fraction",
        type=_fraction,
        default=0.5,
        help="expected share of images holding at least one abnormal cell",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    try:
        summary = generate_demo_set(
            args.out_dir,
            num_images=args.num_images,
            image_size=args.image_size,
            seed=args.seed,
            positive_fraction=args.positive_fraction,
        )
    except OSError as error:
        logger.error("cytofm-demo-data failed: cannot write to %s: %s", args.out_dir, error)
        return 1
    logger.info(
        "demo set ready: %s (labels.csv, cells.csv, images/); %d of %d bags positive",
        summary.out_dir,
        summary.num_positive,
        summary.num_images,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
