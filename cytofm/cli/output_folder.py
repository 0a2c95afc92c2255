"""Creation of a command's output folder with one clear error line when that fails."""

from __future__ import annotations

import os
from pathlib import Path


class OutputFolderError(OSError):
    """An output folder that cannot be created or written."""


def make_output_folder(folder: str | Path) -> Path:
    """Create ``folder`` (and its parents) and check that files can be written into it.

    Raises:
        OutputFolderError: naming the folder and the reason, e.g. the part of the path that
            is a file, or a missing write permission.
    """
    folder = Path(folder)
    blocker = next(
        (part for part in (folder, *folder.parents) if part.exists() and not part.is_dir()),
        None,
    )
    if blocker is not None:
        raise OutputFolderError(
            f"cannot create output folder {folder}: {blocker} is a file, not a folder; choose "
            "another output path"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = error.strerror or str(error)
        raise OutputFolderError(
            f"cannot create output folder {folder}: {reason}; choose another output path"
        ) from error
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputFolderError(
            f"output folder {folder} is not writable; choose another output path or fix its "
            "permissions"
        )
    return folder
