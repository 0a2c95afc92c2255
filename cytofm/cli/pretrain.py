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
import sys
from collections.abc import Sequence

from cytofm.config import ConfigError

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
    from cytofm.data.pretrain_dataset import DataLoadingError
    from cytofm.pretrain.config import load_pretrain_config
    from cytofm.pretrain.distributed import init_distributed, shutdown
    from cytofm.pretrain.trainer import NonFiniteLossError, PretrainTrainer
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
    setup_logging(config.run.output_dir / "train.log", rank=context.rank)
    try:
        try:
            trainer = PretrainTrainer(config, context)
        except (ValueError, FileNotFoundError) as error:
            # Missing image folders, empty sources or a checkpoint that does not fit the config.
            logger.error("cannot start the run: %s", error)
            return 2
        except RuntimeError as error:
            # load_state_dict raises RuntimeError when the model section changed since the
            # checkpoint was written.
            logger.error(
                "cannot resume from %s: the checkpoint does not fit the config (%s). Use a new "
                "run.output_dir or the model settings the run started with",
                config.run.output_dir,
                str(error).splitlines()[0],
            )
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
    finally:
        shutdown(context)
    if result.checkpoint is not None:
        logger.info("done: step %d, last checkpoint %s", result.step, result.checkpoint)
    else:
        logger.info("done: step %d", result.step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
