"""Detection and removal of an earlier ``cytofm-eval-mil`` run in an output folder.

A second run into the same folder would leave the first run's folds and feature-set folders
beside its own, and readers such as ``cytofm-visualize mil`` would mix them. So an output
folder that contains an earlier run is rejected unless the caller asks to overwrite it, and
overwriting deletes only what an evaluation writes. An output folder that is a feature
folder, or whose feature-set folders ``out/<name>`` are or contain an input, is rejected even
with overwrite, because the run would write into or delete its own inputs.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from cytofm.evaluation.config import EvalConfig
from cytofm.evaluation.feature_store import FEATURE_FORMAT, INDEX_COLUMNS

logger = logging.getLogger(__name__)

RUN_FILES = ("results.md", "results.csv", "results.json", "config.yaml", "eval.log")
"""Files that ``cytofm-eval-mil`` writes at the top of its output folder."""


class EarlierRunError(ValueError):
    """An output folder that contains an earlier evaluation."""


class OutputConflictError(ValueError):
    """An output folder whose outputs would overwrite or delete features or labels."""


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


def is_feature_folder(folder: str | Path) -> bool:
    """Return whether ``folder`` contains the ``meta.json`` or ``index.csv`` of cytofm-extract."""
    folder = Path(folder)
    meta = folder / "meta.json"
    if meta.is_file():
        try:
            if json.loads(meta.read_text(encoding="utf-8")).get("format") == FEATURE_FORMAT:
                return True
        except (OSError, ValueError, AttributeError):
            pass
    index = folder / "index.csv"
    if index.is_file():
        try:
            with index.open(newline="", encoding="utf-8-sig") as handle:
                header = next(csv.reader(handle), [])
        except (OSError, UnicodeDecodeError, csv.Error):
            return False
        return tuple(header) == INDEX_COLUMNS
    return False


def _feature_folder_within(folder: Path) -> Path | None:
    """Return a feature folder at or below ``folder``, or None."""
    if not folder.is_dir():
        return None
    if is_feature_folder(folder):
        return folder
    for marker in ("meta.json", "index.csv"):
        for path in sorted(folder.rglob(marker)):
            if is_feature_folder(path.parent):
                return path.parent
    return None


def _describe_feature_folder(folder: Path) -> str:
    files = [name for name in ("meta.json", "index.csv") if (folder / name).is_file()]
    return " and ".join(files)


def check_run_folder(
    out: str | Path,
    overwrite: bool,
    *,
    names: Sequence[str] = (),
    inputs: Mapping[str, str | Path] | None = None,
) -> list[Path]:
    """Check that an evaluation may write into ``out``, deleting and writing nothing.

    The run writes the files of ``RUN_FILES`` into ``out`` and a folder ``out/<name>`` per
    feature set, and ``overwrite`` deletes the earlier run's files and feature-set folders.
    None of these paths may be or contain an input, nor contain a feature folder of
    cytofm-extract, and ``out`` may not be a feature folder itself.

    Args:
        out: the output folder.
        overwrite: whether an earlier evaluation in ``out`` may be deleted.
        names: feature-set names of the new run.
        inputs: paths that the run reads (feature set folders, the labels table), keyed by
            a description for messages such as ``feature set 'cls'``.

    Returns:
        The earlier run's files and folders that ``overwrite`` deletes (empty when ``out``
        contains no earlier run).

    Raises:
        OutputConflictError: ``out`` is a feature folder, or a path that the run writes or
            deletes is, or contains, an input or a feature folder.
        EarlierRunError: ``out`` contains an earlier run and ``overwrite`` is False.
    """
    out = Path(out)
    if is_feature_folder(out):
        raise OutputConflictError(
            f"out={out} is a feature folder of cytofm-extract (it contains "
            f"{_describe_feature_folder(out)}); the evaluation would overwrite its "
            "config.yaml and write beside its features. Choose another out= outside the "
            "feature folders (overwrite=true does not change this)"
        )
    found = earlier_run_outputs(out)
    targets = [out / name for name in RUN_FILES]
    targets += [out / name for name in names]
    targets += [path for path in found if path not in targets]
    resolved_inputs = [
        (description, Path(path), Path(path).resolve())
        for description, path in (inputs or {}).items()
    ]
    for target in targets:
        resolved = target.resolve()
        for description, path, resolved_input in resolved_inputs:
            if resolved == resolved_input or resolved in resolved_input.parents:
                raise OutputConflictError(
                    f"out={out}: the evaluation writes or deletes {target}, which is or "
                    f"contains the {description} ({path}). Choose another out= whose feature-set "
                    "folders out/<name> hold no feature set or labels table"
                )
        feature_folder = _feature_folder_within(target)
        if feature_folder is not None:
            raise OutputConflictError(
                f"out={out}: the evaluation writes or deletes {target}, which contains the "
                f"feature folder {feature_folder} ({_describe_feature_folder(feature_folder)} "
                "of cytofm-extract). Choose another out= whose feature-set folders "
                "out/<name> hold no features"
            )
    if found and not overwrite:
        listed = ", ".join(path.name + ("/" if path.is_dir() else "") for path in found)
        raise EarlierRunError(
            f"{out} already contains an evaluation ({listed}); choose another out= or pass "
            "overwrite=true to delete that run's results, config, log and feature-set folders "
            "first"
        )
    return found


def check_eval_run_folder(config: EvalConfig) -> list[Path]:
    """Run :func:`check_run_folder` on ``config.out`` with the config's names and inputs."""
    inputs: dict[str, str | Path] = {
        f"feature set {feature_set.name!r}": feature_set.path for feature_set in config.feature_sets
    }
    if config.labels.csv is not None:
        inputs["labels table (labels.csv)"] = config.labels.csv
    names = [feature_set.name for feature_set in config.feature_sets]
    return check_run_folder(config.out, config.overwrite, names=names, inputs=inputs)


def delete_run_outputs(out: str | Path, paths: Sequence[Path]) -> None:
    """Delete the files and folders that :func:`check_run_folder` returned."""
    out = Path(out)
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
            _remove_empty_parents(path.parent, out)
        elif path.exists():
            path.unlink()


def prepare_run_folder(
    out: str | Path,
    overwrite: bool,
    *,
    names: Sequence[str] = (),
    inputs: Mapping[str, str | Path] | None = None,
) -> list[Path]:
    """Reject an output folder that contains an earlier run, or delete that run's outputs.

    Runs :func:`check_run_folder` first, so nothing is deleted when ``out`` conflicts with an
    input. Files and folders that an evaluation does not write (notes, other results) are
    kept.

    Returns:
        The deleted files and folders (empty when ``out`` contains no earlier run).

    Raises:
        OutputConflictError: see :func:`check_run_folder`.
        EarlierRunError: ``out`` contains an earlier run and ``overwrite`` is False.
    """
    found = check_run_folder(out, overwrite, names=names, inputs=inputs)
    delete_run_outputs(out, found)
    return found


def _remove_empty_parents(folder: Path, stop: Path) -> None:
    """Remove empty folders from ``folder`` up to, not including, ``stop``."""
    while folder.resolve() != stop.resolve() and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent
