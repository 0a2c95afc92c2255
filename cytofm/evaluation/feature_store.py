"""On-disk layout of extracted features: one file per bag, an index and a metadata file.

A feature set lives in one folder::

    <root>/<feature set name>/
        features/<safe bag file name>.pt   {"features": float32 [N, D],
                                            "coords": int64 [N, 4] (x0, y0, x1, y1 in
                                            source-image pixels),
                                            "patch_tokens": float32 [N, T, D] (optional),
                                            "patch_grid": int64 [2] (rows, columns of T)}
        index.csv                          bag_id,label,group,split,num_instances,file
        meta.json                          backbone source, format, embed_dim, transform,
                                           extraction config

Files hold plain tensors only, so they load with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cytofm.utils.io import atomic_torch_save, atomic_write_text

FEATURE_FORMAT = "cytofm-features"
FEATURE_FORMAT_VERSION = 1
INDEX_COLUMNS = ("bag_id", "label", "group", "split", "num_instances", "file")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_file_name(bag_id: str) -> str:
    """Map a bag id to a file name that is safe on every file system and unique per id.

    The readable part keeps letters, digits, ``.``, ``_`` and ``-`` (at most 80 characters);
    a hash of the full id follows, so ids that differ only in spaces or slashes still get
    different names, and the name does not depend on which other bags exist.
    """
    readable = _UNSAFE.sub("_", bag_id).strip("._")[:80] or "bag"
    digest = hashlib.sha1(bag_id.encode("utf-8")).hexdigest()[:12]
    return f"{readable}-{digest}.pt"


@dataclass
class IndexRow:
    """One bag of a feature set, as listed in ``index.csv``."""

    bag_id: str
    label: str | None
    group: str | None
    split: str | None
    num_instances: int
    file: str


def save_bag_features(
    path: str | Path,
    features: Tensor,
    coords: Tensor,
    patch_tokens: Tensor | None = None,
    *,
    extra: dict[str, Tensor] | None = None,
) -> None:
    """Write one bag's features atomically (a crash never leaves a half-written file).

    ``extra`` adds further plain tensors, e.g. ``patch_grid`` (rows, columns of the tokens).
    """
    record = {
        "features": features.detach().to("cpu", torch.float32).contiguous(),
        "coords": coords.detach().to("cpu", torch.int64).contiguous(),
    }
    if patch_tokens is not None:
        record["patch_tokens"] = patch_tokens.detach().to("cpu", torch.float32).contiguous()
    for key, value in (extra or {}).items():
        record[key] = value.detach().cpu().contiguous()
    atomic_torch_save(record, path)


def load_bag_features(path: str | Path, *, mmap: bool = False) -> dict[str, Tensor]:
    """Load and check one bag's feature file.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be read (e.g. truncated), lacks ``features`` or
            ``coords``, or their shapes disagree.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature file not found: {path}")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
        # torch reports a truncated file as "PytorchStreamReader failed ..." without the path.
        reason = str(error).split(". ")[0].strip()
        raise ValueError(
            f"{path}: feature file is corrupt or truncated ({reason}); extract the feature "
            "set again with overwrite=true"
        ) from error
    if not isinstance(record, dict) or "features" not in record or "coords" not in record:
        raise ValueError(f"{path}: not a feature file (expected keys 'features' and 'coords')")
    features, coords = record["features"], record["coords"]
    if features.ndim != 2 or coords.shape != (features.shape[0], 4):
        raise ValueError(
            f"{path}: features {tuple(features.shape)} and coords {tuple(coords.shape)} "
            "do not match [N, D] and [N, 4]"
        )
    return record


def write_index(rows: list[IndexRow], path: str | Path) -> None:
    """Write ``index.csv`` atomically, one line per bag in the given order."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(INDEX_COLUMNS)
    for row in rows:
        writer.writerow(
            [
                row.bag_id,
                row.label or "",
                row.group or "",
                row.split or "",
                row.num_instances,
                row.file,
            ]
        )
    atomic_write_text(buffer.getvalue(), path)


def read_index(path: str | Path) -> list[IndexRow]:
    """Read ``index.csv``; empty label, group and split cells become None."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature index not found: {path}; run cytofm-extract first")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in INDEX_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}")
        rows = []
        for line in reader:
            rows.append(
                IndexRow(
                    bag_id=line["bag_id"],
                    label=line["label"] or None,
                    group=line["group"] or None,
                    split=line["split"] or None,
                    num_instances=int(line["num_instances"]),
                    file=line["file"],
                )
            )
    return rows


def write_meta(meta: dict[str, Any], path: str | Path) -> None:
    """Write ``meta.json`` atomically."""
    atomic_write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", path)


def read_meta(path: str | Path) -> dict[str, Any]:
    """Read ``meta.json`` and check that it describes a CytoFM feature set."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature metadata not found: {path}")
    meta = json.loads(path.read_text())
    if meta.get("format") != FEATURE_FORMAT:
        raise ValueError(f"{path}: format is {meta.get('format')!r}, expected {FEATURE_FORMAT!r}")
    return meta


class BagNotFoundError(KeyError):
    """A bag id absent from a feature set's index."""

    def __str__(self) -> str:
        # KeyError's own str() wraps the message in quotes.
        return str(self.args[0]) if self.args else ""


class FeatureSet:
    """A feature set folder opened for reading.

    Attributes:
        root: the folder holding ``index.csv``, ``meta.json`` and ``features/``.
        rows: index rows in extraction order.
        meta: the contents of ``meta.json`` (empty when the file is absent).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"feature set folder not found: {self.root}")
        self.rows = read_index(self.root / "index.csv")
        meta_path = self.root / "meta.json"
        self.meta = read_meta(meta_path) if meta_path.is_file() else {}
        self._by_id = {row.bag_id: row for row in self.rows}
        if len(self._by_id) != len(self.rows):
            raise ValueError(f"{self.root / 'index.csv'}: bag ids are not unique")

    @property
    def bag_ids(self) -> list[str]:
        """Bag ids in index order."""
        return [row.bag_id for row in self.rows]

    def row(self, bag_id: str) -> IndexRow:
        """Return the index row of ``bag_id``; raises BagNotFoundError naming the bag and folder."""
        try:
            return self._by_id[bag_id]
        except KeyError:
            raise BagNotFoundError(f"bag {bag_id!r} not found in feature set {self.root}") from None

    def load(self, bag_id: str, *, mmap: bool = True) -> dict[str, Tensor]:
        """Load the feature file of ``bag_id`` (memory-mapped by default)."""
        return load_bag_features(self.root / "features" / self.row(bag_id).file, mmap=mmap)
