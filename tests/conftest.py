"""Shared test fixtures: single-threaded torch and the optional real-data folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]


def real_data_dir() -> Path | None:
    """Return the real cytology data folder (CYTOFM_DATA, else ../shared/data), or None."""
    candidate = os.environ.get("CYTOFM_DATA")
    path = Path(candidate) if candidate else REPO_ROOT.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture
def shared_data() -> Path:
    """The real-data folder; skips the test when it is missing."""
    path = real_data_dir()
    if path is None:
        pytest.skip("real cytology data not found: set CYTOFM_DATA or place it at ../shared/data")
    return path


@pytest.fixture(autouse=True)
def restore_root_logging():
    """Put back the root logger's handlers after a test that ran a command's ``main``.

    The commands install a console and a log-file handler on the root logger; later tests
    need pytest's own handlers, and the log files must be closed.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
