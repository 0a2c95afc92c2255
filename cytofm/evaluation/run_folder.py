"""Detection and removal of an earlier ``cytofm-eval-mil`` run in an output folder.

A second run into the same folder would leave the first run's folds and feature-set folders
beside its own, and readers such as ``cytofm-visualize mil`` would mix them. So an output
folder that contains an earlier run is rejected unless the caller asks to overwrite it, and
overwriting deletes only what an evaluation writes.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)

RUN_FILES = ("results.md", "results.csv", "results.json", "config.yaml", "eval.log")
"""Files that ``cytofm-eval-mil`` writes at the top of its output folder."""


class EarlierRunError(ValueError):
    """An output folder that contains an earlier evaluation."""


def _feature_set_names(out: Path) -> set[str]:
    """Return the feature-set names listed in an earlier run's results.json and config.yaml."""
    names: set[str] = set()
    results = out / "results.json"
    if results.is_file():
        try:
            rows = json.loads(results.read_text(encoding="utf-8")).get("rows", [])
            names.update(str(row["feature_set"]) for row in rows if "feature_set" in row)
        except (ValueError, AttributeError, TypeError) as error:
            logger.warning("cannot read feature-set names from %s: %s", results, error)
    config = out / "config.yaml"
    if config.is_file():
        try:
            sets = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("feature_sets")
            names.update(str(entry["name"]) for entry in sets or [] if "name" in entry)
        except (yaml.YAMLError, AttributeError, TypeError) as error:
            logger.warning("cannot read feature-set names from %s: %s", config, error)
    return names


def earlier_run_outputs(out: str | Path) -> list[Path]:
    """List the files and folders of an earlier evaluation in ``out``.

    These are the top-level run files and the feature-set folders named in the earlier
    ``results.json`` or ``config.yaml``. A name that would point outside ``out`` is ignored.
    """
    out = Path(out)
    if not out.is_dir():
        return []
    found = [out / name for name in RUN_FILES if (out / name).is_file()]
    root = out.resolve()
    for name in sorted(_feature_set_names(out)):
        folder = out / name
        resolved = folder.resolve()
        if resolved != root and root in resolved.parents and folder.is_dir():
            found.append(folder)
    return found


def prepare_run_folder(out: str | Path, overwrite: bool) -> list[Path]:
    """Reject an output folder that contains an earlier run, or delete that run's outputs.

    Files and folders that an evaluation does not write (notes, other results) are kept.

    Returns:
        The deleted files and folders (empty when ``out`` contains no earlier run).

    Raises:
        EarlierRunError: ``out`` contains an earlier run and ``overwrite`` is False.
    """
    out = Path(out)
    found = earlier_run_outputs(out)
    if not found:
        return []
    if not overwrite:
        names = ", ".join(path.name + ("/" if path.is_dir() else "") for path in found)
        raise EarlierRunError(
            f"{out} already contains an evaluation ({names}); choose another out= or pass "
            "overwrite=true to delete that run's results, config, log and feature-set folders "
            "first"
        )
    for path in found:
        if path.is_dir():
            shutil.rmtree(path)
            _remove_empty_parents(path.parent, out)
        else:
            path.unlink()
    return found


def _remove_empty_parents(folder: Path, stop: Path) -> None:
    """Remove empty folders from ``folder`` up to, not including, ``stop``."""
    while folder.resolve() != stop.resolve() and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent
