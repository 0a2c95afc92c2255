"""Files of a run folder besides checkpoints: the resolved config and its earlier versions."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from cytofm.config import save_config, to_dict

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"


def unused_path(path: Path, suffix: str | None = None) -> Path:
    """Return ``path`` if nothing exists there, else the first free ``<stem>-2<suffix>``, ...

    Only one process may write into a run folder (see ``cytofm.pretrain.run_lock``), so the
    returned name is still free when the caller writes it.

    Args:
        path: Preferred path.
        suffix: End of the name that the number goes before, for names with several
            suffixes such as ``.pt.unreadable``; defaults to the last suffix of ``path``.
    """
    if suffix is None:
        suffix = path.suffix
    if not path.name.endswith(suffix):
        raise ValueError(f"{path.name} does not end with {suffix}")
    stem = path.name[: len(path.name) - len(suffix)]
    candidate = path
    number = 2
    while candidate.exists() or candidate.is_symlink():
        candidate = path.with_name(f"{stem}-{number}{suffix}")
        number += 1
    return candidate


def save_resolved_config(config: Any, output_dir: Path, step: int) -> Path | None:
    """Write ``config.yaml`` unless it already contains the same config.

    A ``config.yaml`` with other values (a resume with changed settings) or one that is not
    valid YAML is first renamed to ``config.before-step<step>.yaml``, with a number added if
    that name is taken. The changed keys or the YAML error are logged.

    Args:
        config: Resolved config dataclass.
        output_dir: Run folder.
        step: Optimizer steps done so far, used in the name of the earlier config.

    Returns:
        Path of the earlier config if one was kept, else None.
    """
    path = Path(output_dir) / CONFIG_NAME
    current = to_dict(config)
    backup_path = None
    if path.is_file():
        parse_error = None
        changes: list[str] = []
        try:
            previous = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            # For example a file edited by hand. It only documents the run, so it is replaced.
            parse_error = describe_parse_error(error)
        else:
            changes = changed_keys(previous, current)
            if not changes:
                return None
        backup_path = unused_path(path.with_name(f"config.before-step{step}.yaml"))
        path.replace(backup_path)
        if parse_error is not None:
            logger.warning(
                "%s is not valid YAML (%s): kept it as %s and wrote the current config",
                path,
                parse_error,
                backup_path.name,
            )
        else:
            logger.warning(
                "config changed on resume at step %d: %s; the earlier config is kept as %s",
                step,
                ", ".join(changes[:10]) + (" ..." if len(changes) > 10 else ""),
                backup_path.name,
            )
    save_config(config, path)
    return backup_path


def describe_parse_error(error: Exception) -> str:
    """Return a one-line reason from a YAML or text decoding error, with its line if known."""
    problem = getattr(error, "problem", None)
    mark = getattr(error, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """List dotted keys whose values differ between two nested config dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        changed: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            changed += changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        return changed
    if old != new:
        return [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]
    return []
