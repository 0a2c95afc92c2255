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

    context = init_distributed(config.run.device)
    setup_logging(config.run.output_dir / "train.log", rank=context.rank)
    try:
        trainer = PretrainTrainer(config, context)
        result = trainer.train()
    except NonFiniteLossError as error:
        logger.error("%s", error)
        return 1
    finally:
        shutdown(context)
    logger.info("done: step %d, last checkpoint %s", result.step, result.checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
