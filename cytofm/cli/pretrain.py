"""``cytofm-pretrain``: iBOT pretraining of a ViT from a YAML config.

Single process::

    cytofm-pretrain --config configs/pretrain/demo_cpu.yaml run.output_dir=runs/demo

Several GPUs or nodes (each process reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``)::

    torchrun --nproc_per_node 8 -m cytofm.cli.pretrain --config configs/pretrain/cytofm_vitb16.yaml

A run folder that already contains checkpoints is resumed from the newest one.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cytofm.config import ConfigError

if TYPE_CHECKING:
    from cytofm.pretrain.config import PretrainConfig
    from cytofm.pretrain.distributed import DistributedContext

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``cytofm-pretrain``."""
    parser = argparse.ArgumentParser(
        prog="cytofm-pretrain",
        description=(
            "Pretrain a Vision Transformer with iBOT. Run it under torchrun for several "
            "processes; a run folder with checkpoints is resumed automatically."
        ),
    )
    parser.add_argument("--config", required=True, help="YAML config file (see configs/pretrain)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override config values, e.g. run.output_dir=runs/x optim.lr=1e-3",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cytofm-pretrain`` and return its exit status."""
    args = build_parser().parse_args(argv)

    # Imported here so that --help returns without loading torch.
    from cytofm.pretrain.config import load_pretrain_config
    from cytofm.pretrain.distributed import init_distributed, shutdown
    from cytofm.utils.logging import setup_logging

    try:
        config = load_pretrain_config(args.config, args.overrides)
    except ConfigError as error:
        setup_logging()
        logger.error("invalid config: %s", error)
        return 2

    try:
        context = init_distributed(config.run.device)
    except ValueError as error:  # e.g. run.device=cuda on a machine without CUDA
        setup_logging()
        logger.error("cannot start the run: %s", error)
        return 2
    previous_handlers = _exit_on_stop_signals()
    try:
        return _run(config, context)
    finally:
        shutdown(context)
        for signal_number, handler in previous_handlers.items():
            signal.signal(signal_number, handler)


def _run(config: PretrainConfig, context: DistributedContext) -> int:
    """Lock the run folder and train; the lock is released on return, error or SystemExit."""
    from cytofm.pretrain.distributed import any_rank
    from cytofm.pretrain.run_lock import RunLockedError, acquire_run_lock
    from cytofm.utils.logging import setup_logging

    # Console only until the lock is held, so a rejected start writes nothing into the folder.
    setup_logging(rank=context.rank)
    output_dir = config.run.output_dir
    lock = None
    failed = False
    if context.is_main:
        try:
            lock = acquire_run_lock(output_dir)
        except RunLockedError as error:
            logger.error("%s", error)
            failed = True
        except OSError as error:
            logger.error(
                "cannot create the run folder run.output_dir=%s: %s. Choose a folder that can "
                "be created and written",
                output_dir,
                _describe_path_error(output_dir, error),
            )
            failed = True
    try:
        if any_rank(failed, context):
            return 2
        setup_logging(output_dir / "train.log", rank=context.rank)
        return _train(config, context)
    finally:
        if lock is not None:
            lock.release()


def _train(config: PretrainConfig, context: DistributedContext) -> int:
    """Build the trainer and train, turning the expected failures into one log line each."""
    from cytofm.data.pretrain_dataset import DataLoadingError
    from cytofm.pretrain.trainer import NonFiniteLossError, PretrainTrainer

    try:
        try:
            trainer = PretrainTrainer(config, context)
        except (ValueError, FileNotFoundError) as error:
            # Missing image folders, empty sources, no checkpoint that loads, or a checkpoint
            # of another model (CheckpointMismatchError).
            logger.error("cannot start the run: %s", error)
            return 2
        result = trainer.train()
    except NonFiniteLossError as error:
        logger.error("%s", error)
        return 1
    except DataLoadingError as error:
        logger.error("data loading failed: %s", str(error).strip().splitlines()[-1])
        return 1
    except KeyboardInterrupt:
        # A second Ctrl-C during training, or the first one before training started.
        logger.error(
            "interrupted without saving. Run the same command again to resume from the newest "
            "checkpoint in %s",
            config.run.output_dir / "checkpoints",
        )
        return 130
    except OSError as error:
        # For example a full disk or a lost network file system while writing a checkpoint.
        logger.error(
            "reading or writing %s failed: %s", error.filename or "a file", error.strerror or error
        )
        return 1
    if result.stop_signal is not None:
        # 130 is the usual status of a program stopped by Ctrl-C, so `cytofm-pretrain ... &&
        # next` does not go on with an unfinished run. SIGTERM and SIGUSR1 stops return 0,
        # because a scheduler sends them to pause a run, and torchrun treats a non-zero status
        # as a failed worker (and restarts the workers when --max-restarts allows it).
        status = 130 if result.stop_signal == signal.SIGINT else 0
        logger.info(
            "stopped by %s at step %d before the end of the run: exit status %d",
            signal.Signals(result.stop_signal).name,
            result.step,
            status,
        )
        return status
    if result.checkpoint is not None:
        logger.info("done: step %d, last checkpoint %s", result.step, result.checkpoint)
    else:
        logger.info("done: step %d", result.step)
    return 0


def _exit_on_stop_signals() -> dict[int, Any]:
    """Turn SIGTERM and SIGUSR1 into SystemExit until training installs its own handlers.

    Without this, a signal during set-up (slide indexing can take minutes) ends the process
    at once, and the lock file stays behind. Returns the replaced handlers.
    """

    def exit_now(signal_number: int, frame: Any) -> None:
        logger.error(
            "received %s before training started: stopping", signal.Signals(signal_number).name
        )
        raise SystemExit(128 + signal_number)

    previous = {}
    for signal_number in (signal.SIGTERM, signal.SIGUSR1):
        try:
            previous[signal_number] = signal.signal(signal_number, exit_now)
        except ValueError:  # not the main thread
            break
    return previous


def _describe_path_error(path: Path, error: OSError) -> str:
    """Return the reason of ``error``, naming the part of ``path`` that is a file, if any."""
    reason = error.strerror or str(error)
    for parent in [Path(path), *Path(path).parents]:
        if parent.exists() and not parent.is_dir():
            return f"{reason} ({parent} is a file, not a folder)"
    if error.filename is not None:
        return f"{reason}: {error.filename}"
    return reason


if __name__ == "__main__":
    sys.exit(main())
