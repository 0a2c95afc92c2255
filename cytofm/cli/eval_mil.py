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
from cytofm.evaluation.cross_validation import (
    DeviceUnavailableError,
    load_task,
    resolve_device,
    run_cross_validation,
)
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


class _RecordBuffer(logging.Handler):
    """Log records kept until the log file exists."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _write_to_log_file(records: list[logging.LogRecord]) -> None:
    """Write records that the console has already shown to the root logger's log file."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            for record in records:
                handler.handle(record)


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
    # The earlier run's eval.log may only be replaced once the new config has been checked,
    # so log to the console until then and copy those records into the new log afterwards.
    setup_logging()
    early_records = _RecordBuffer()
    logging.getLogger().addHandler(early_records)
    try:
        earlier = check_eval_run_folder(config)
        resolve_device(config.device)
        table = load_task(config)
        make_output_folder(out_dir)
        delete_run_outputs(out_dir, earlier)
        setup_logging(out_dir / "eval.log")
        _write_to_log_file(early_records.records)
        save_config(config, out_dir / "config.yaml")
    except (ValueError, KeyError, OSError, DeviceUnavailableError) as error:
        sys.stderr.write(f"cytofm-eval-mil: {error}\n")
        return 1
    finally:
        logging.getLogger().removeHandler(early_records)
    if earlier:
        logger.info("overwrite: deleted the earlier evaluation's %s", ", ".join(map(str, earlier)))
    logger.info("evaluation of %d feature set(s) into %s", len(config.feature_sets), out_dir)
    try:
        result = run_cross_validation(config, out_dir, table=table)
    except (ValueError, KeyError, OSError, DeviceUnavailableError) as error:
        logger.error("evaluation failed: %s", error)
        return 1
    rows = write_comparison(result, out_dir)
    logger.info("results:\n%s", render_markdown(result, rows))
    logger.info("wrote %s", out_dir / "results.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
