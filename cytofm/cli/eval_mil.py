"""``cytofm-eval-mil``: cross-validate ABMIL (and mean pooling) on extracted feature sets."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import torch

from cytofm.cli.output_folder import make_output_folder
from cytofm.config import ConfigError, load_config, save_config
from cytofm.evaluation.config import EvalConfig
from cytofm.evaluation.cross_validation import DeviceUnavailableError, run_cross_validation
from cytofm.evaluation.report import render_markdown, write_comparison
from cytofm.evaluation.run_folder import check_eval_run_folder, delete_run_outputs
from cytofm.utils.logging import setup_logging

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``cytofm-eval-mil``."""
    parser = argparse.ArgumentParser(
        prog="cytofm-eval-mil",
        description=(
            "k-fold cross-validation of attention MIL heads on features written by "
            "cytofm-extract. Writes results.md/.csv/.json, per-fold predictions and "
            "attention, the resolved config and a log to the 'out' folder; an 'out' that "
            "contains an earlier evaluation needs overwrite=true. 'out' may not be a feature "
            "folder, and its folders out/<feature set name> may not contain feature sets."
        ),
    )
    parser.add_argument("--config", help="YAML file with the evaluation config")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. folds=3 train.lr=0.0001 model.heads=[abmil,mean]",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the evaluation; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        config = load_config(EvalConfig, args.config, args.overrides)
    except ConfigError as error:
        sys.stderr.write(f"cytofm-eval-mil: {error}\n")
        return 2

    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    out_dir = config.out
    try:
        deleted = check_eval_run_folder(config)
        make_output_folder(out_dir)
        delete_run_outputs(out_dir, deleted)
        setup_logging(out_dir / "eval.log")
        save_config(config, out_dir / "config.yaml")
    except (OSError, ValueError) as error:
        sys.stderr.write(f"cytofm-eval-mil: {error}\n")
        return 1
    if deleted:
        logger.info("overwrite: deleted the earlier evaluation's %s", ", ".join(map(str, deleted)))
    logger.info("evaluation of %d feature set(s) into %s", len(config.feature_sets), out_dir)
    try:
        result = run_cross_validation(config, out_dir)
    except (ValueError, KeyError, OSError, DeviceUnavailableError) as error:
        logger.error("evaluation failed: %s", error)
        return 1
    rows = write_comparison(result, out_dir)
    logger.info("results:\n%s", render_markdown(result, rows))
    logger.info("wrote %s", out_dir / "results.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
