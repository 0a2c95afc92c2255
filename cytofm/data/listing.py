"""Find image files in folders and manifests, and store long path lists compactly.

Listing reads directory entries only and never opens an image, so a collection of a million
files is listed in seconds. ``PathTable`` keeps the paths in two numpy arrays instead of a list
of Python strings: DataLoader workers forked from the main process then share the memory
instead of copying it page by page as reference counts change.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path

import numpy as np

from cytofm.data.decode import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)

MANIFEST_SUFFIXES = frozenset({".txt", ".csv", ".tsv", ".lst"})
"""Suffixes of files read as manifests (one image path per line, or a CSV with a ``path``
column)."""


def is_image_name(name: str, suffixes: Collection[str] = IMAGE_EXTENSIONS) -> bool:
    """Return whether a file name has one of ``suffixes`` (lower case, compared ignoring case)."""
    return os.path.splitext(name)[1].lower() in suffixes


def list_images(
    folder: str | Path, recursive: bool = True, suffixes: Collection[str] = IMAGE_EXTENSIONS
) -> list[str]:
    """List image files (by default) or other files with ``suffixes`` under ``folder``, sorted,
    as paths relative to it.

    Hidden files and folders (names starting with ".") are skipped. Symbolic links to files are
    followed; links to folders are not, so a link loop cannot make the listing endless.

    Raises:
        FileNotFoundError: ``folder`` is not a directory.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    found: list[str] = []
    pending = [""]
    while pending:
        relative = pending.pop()
        with os.scandir(folder / relative if relative else folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                child = f"{relative}/{entry.name}" if relative else entry.name
                if entry.is_dir(follow_symlinks=False):
                    if recursive:
                        pending.append(child)
                elif entry.is_file() and is_image_name(entry.name, suffixes):
                    found.append(child)
    found.sort()
    return found


def read_manifest(path: str | Path) -> list[str]:
    """Read image paths from a manifest file.

    A ``.csv`` or ``.tsv`` file needs a header with a ``path`` column. Any other manifest has
    one path per line; blank lines and lines starting with ``#`` are ignored. Relative paths
    are relative to the manifest's folder and are returned unchanged; absolute paths stay
    absolute.

    Raises:
        FileNotFoundError: The manifest does not exist.
        ValueError: A CSV manifest has no ``path`` column.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
            if reader.fieldnames is None or "path" not in reader.fieldnames:
                raise ValueError(
                    f"manifest {path} has no 'path' column (header: {reader.fieldnames}); "
                    "add a header line with a column named path"
                )
            return [row["path"].strip() for row in reader if (row["path"] or "").strip()]
    entries = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if line and not line.startswith("#"):
                entries.append(line)
    return entries


class PathTable:
    """An immutable list of paths under one root folder, packed into numpy arrays.

    Args:
        root: Folder that relative entries are joined to.
        entries: Relative (or absolute) path strings.
    """

    def __init__(self, root: str | Path, entries: Sequence[str] | Iterable[str]) -> None:
        self.root = Path(root)
        encoded = [entry.encode("utf-8", "surrogateescape") for entry in entries]
        lengths = np.fromiter((len(item) for item in encoded), dtype=np.int64, count=len(encoded))
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self._offsets[1:])
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def relative(self, index: int) -> str:
        """Return entry ``index`` as stored (relative to ``root`` unless it was absolute)."""
        if not 0 <= index < len(self):
            raise IndexError(f"path index {index} out of range for {len(self)} entries")
        start, stop = self._offsets[index], self._offsets[index + 1]
        return self._buffer[start:stop].tobytes().decode("utf-8", "surrogateescape")

    def __getitem__(self, index: int) -> Path:
        return self.root / self.relative(index)
