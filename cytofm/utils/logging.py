"""Logging set-up for the command-line tools: console plus an optional log file."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(
    log_file: str | Path | None = None, rank: int = 0, level: int = logging.INFO
) -> None:
    """Configure the root logger once per process.

    Only rank 0 logs INFO to the console; other ranks log warnings and errors, so a multi-GPU
    run prints each message once. The log file, when given, receives rank 0's full log.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(level if rank == 0 else logging.WARNING)
    prefix = "" if rank == 0 else f"[rank {rank}] "
    console.setFormatter(logging.Formatter(prefix + FORMAT, datefmt="%H:%M:%S"))
    root.addHandler(console)
    if log_file is not None and rank == 0:
        log_file = Path(log_file)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(file_handler)
