"""``cytofm-extract``: embed the tiles of every bag with a backbone and store the features."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import torch

from cytofm.cli.output_folder import make_output_folder
from cytofm.config import ConfigError, load_config, save_config
from cytofm.evaluation.extract import (
    ExtractConfig,
    check_feature_settings,
    extract_features,
    extraction_meta,
)
from cytofm.evaluation.extractors import default_feature_set_name
from cytofm.utils.logging import setup_logging

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``cytofm-extract``."""
    parser = argparse.ArgumentParser(
        prog="cytofm-extract",
        description=(
            "Embed the tiles of every bag with a backbone checkpoint, a random ViT "
            "(backbone.source=random, or backbone.random_init=true) or the handcrafted colour "
            "and texture descriptor (backbone.source=handcrafted). Writes "
            "<out>/<name>/features/*.pt, index.csv and meta.json; bags already extracted are "
            "skipped."
        ),
    )
    parser.add_argument("--config", help="YAML file with the extraction config")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help=(
            "config overrides, e.g. bags.root=demo bags.labels_csv=demo/labels.csv "
            "backbone.source=ckpt.pth batch_size=128"
        ),
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the extraction; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        config = load_config(ExtractConfig, args.config, args.overrides)
    except ConfigError as error:
        sys.stderr.write(f"cytofm-extract: {error}\n")
        return 2
    if config.batch_size < 1 or config.num_workers < 0:
        sys.stderr.write("cytofm-extract: batch_size must be >= 1 and num_workers >= 0\n")
        return 2
    if config.num_threads is not None:
        if config.num_threads < 1:
            sys.stderr.write("cytofm-extract: num_threads must be positive or null\n")
            return 2
        torch.set_num_threads(config.num_threads)

    folder = config.out / (config.name or default_feature_set_name(config.backbone))
    try:
        if not config.overwrite:
            # Checked before config.yaml is replaced, so that a rejected resume keeps the
            # config that matches the features.
            check_feature_settings(folder, extraction_meta(config))
        make_output_folder(folder)
        setup_logging(folder / "extract.log")
        save_config(config, folder / "config.yaml")
    except (OSError, ValueError) as error:
        sys.stderr.write(f"cytofm-extract: {error}\n")
        return 1
    try:
        extract_features(config)
    except (ValueError, OSError, FloatingPointError, RuntimeError) as error:
        logger.error("extraction failed: %s", error)
        return 1
    logger.info("features ready in %s", folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
