"""Identity of the weights behind a feature set, recorded in its ``meta.json``.

A resumed extraction compares it, so that features of a checkpoint that changed under the
same path are not mixed with those of the old one. A checkpoint file is identified by its
size, modification time and a SHA-256 of its first and last MiB, or of the whole file when it
is at most 2 MiB. The check therefore reads at most 2 MiB of a multi-GB file.

A checkpoint written by ``torch.save`` is a zip file that ends with its central directory,
which lists a CRC-32 of every stored record (torch 2.6 and later compute them unless
``torch.serialization.set_crc32_options(False)``), so the tail hash changes with any tensor.

NOTE: for other layouts (safetensors, legacy pickles) a change that keeps the file size and
touches only the middle of a file larger than 2 MiB goes undetected. The modification time is
recorded but not compared, so that copying a checkpoint keeps its features valid.
"""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path
from typing import Any

CHUNK_BYTES = 1 << 20


def file_identity(path: str | Path) -> dict[str, Any]:
    """Describe a checkpoint file by path, size, modification time and a partial SHA-256."""
    path = Path(path)
    stat = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        if stat.st_size <= 2 * CHUNK_BYTES:
            digest.update(handle.read())
        else:
            digest.update(handle.read(CHUNK_BYTES))
            handle.seek(-CHUNK_BYTES, 2)
            digest.update(handle.read(CHUNK_BYTES))
    return {
        "kind": "file",
        "path": str(path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256_first_last_mib": digest.hexdigest(),
    }


def weights_differ(previous: dict[str, Any], current: dict[str, Any]) -> bool:
    """Return whether two identities describe different weights.

    Files are compared by size and partial hash only; generated weights (random ViTs, the
    handcrafted descriptor) by every recorded field.
    """
    if previous.get("kind") != current.get("kind"):
        return True
    if current.get("kind") == "file":
        keys = ("size", "sha256_first_last_mib")
        return any(previous.get(key) != current.get(key) for key in keys)
    return previous != current


def describe_identity(identity: dict[str, Any]) -> str:
    """Describe an identity in a few words for error messages."""
    if identity.get("kind") != "file":
        fields = ", ".join(f"{key}={value}" for key, value in identity.items() if key != "spec")
        return fields
    modified = datetime.datetime.fromtimestamp(identity["mtime_ns"] / 1e9).isoformat(
        sep=" ", timespec="seconds"
    )
    return f"{identity['path']} of {identity['size']} bytes, modified {modified}"
