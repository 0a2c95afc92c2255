"""Names of files in a run folder that must not replace an existing file."""

from __future__ import annotations

from pathlib import Path


def unused_path(path: Path) -> Path:
    """Return ``path`` if nothing exists there, else the first free ``<stem>-2<suffix>``, ...

    Only one process may write into a run folder (see ``cytofm.pretrain.run_lock``), so the
    returned name is still free when the caller writes it.
    """
    candidate = path
    number = 2
    while candidate.exists() or candidate.is_symlink():
        candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
        number += 1
    return candidate
