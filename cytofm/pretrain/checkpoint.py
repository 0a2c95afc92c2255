"""Pretraining checkpoints: atomic writes, rotation, discovery, fit checks and RNG state.

Every checkpoint is a dict of tensors, numbers, strings, lists and dicts only, so
``torch.load(path, weights_only=True)`` reads it and no class from this package is needed
to open it. Layout (version 1)::

    format: "cytofm-pretrain", version: 1,
    student, teacher: backbone state dicts with timm key names (cls_token, blocks.0..., norm.*),
    student_head, teacher_head: projection head state dicts,
    optimizer, scaler: state dicts, loss: loss state (centres),
    step: optimizer steps done, epoch: current epoch,
    data: sampler position, rng: RNG states, config: resolved config as a dict,
    model: backbone constructor arguments (arch, patch_size, img_size, embed_dim, ...).
"""

from __future__ import annotations

import json
import logging
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cytofm.pretrain.run_folder import unused_path
from cytofm.utils.io import atomic_torch_save

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "cytofm-pretrain"
CHECKPOINT_VERSION = 1
CHECKPOINT_DIRNAME = "checkpoints"
REQUIRED_KEYS = (
    "format",
    "version",
    "student",
    "teacher",
    "student_head",
    "teacher_head",
    "optimizer",
    "scaler",
    "loss",
    "step",
    "epoch",
    "data",
    "rng",
    "config",
    "model",
)
_NAME_PATTERN = re.compile(r"^checkpoint-(\d+)\.pt$")
# Added to the name of a checkpoint that failed to load, so that it no longer matches.
UNREADABLE_SUFFIX = ".unreadable"
# Suffix that stays last when a set-aside name is taken and a number is added before it.
SET_ASIDE_SUFFIX = ".pt" + UNREADABLE_SUFFIX


def checkpoint_path(output_dir: Path, step: int) -> Path:
    """Return the path of the checkpoint written after ``step`` optimizer steps."""
    return Path(output_dir) / CHECKPOINT_DIRNAME / f"checkpoint-{step:09d}.pt"


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Return ``(step, path)`` for every finished checkpoint in ``output_dir``, oldest first.

    Temporary files of an interrupted write have other names and are ignored.
    """
    folder = Path(output_dir) / CHECKPOINT_DIRNAME
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME_PATTERN.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(state: dict[str, Any], output_dir: Path, keep_last: int) -> Path:
    """Write ``state`` atomically and delete older checkpoints beyond the newest ``keep_last``.

    Only checkpoints of earlier steps than ``state["step"]`` are deleted, so the file just
    written is always kept. Files with later steps in their names than this run has reached
    are left in place with a warning.

    Args:
        state: checkpoint dict in the layout above; ``state["step"]`` names the file.
        output_dir: run folder; checkpoints go into its ``checkpoints`` subfolder.
        keep_last: number of checkpoints to keep (at least 1), the new one included.

    Returns:
        Path of the new checkpoint.
    """
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise ValueError(f"checkpoint state is missing keys: {', '.join(missing)}")
    step = int(state["step"])
    path = checkpoint_path(output_dir, step)
    atomic_torch_save(state, path)
    logger.info("saved checkpoint %s", path)

    checkpoints = list_checkpoints(output_dir)
    older = [old_path for old_step, old_path in checkpoints if old_step < step]
    later = [later_path.name for later_step, later_path in checkpoints if later_step > step]
    if later:
        logger.warning(
            "%s has checkpoints of later steps than this run's step %d, which rotation leaves "
            "in place: %s",
            path.parent,
            step,
            ", ".join(later),
        )
    num_to_delete = max(len(older) - (max(keep_last, 1) - 1), 0)
    for old_path in older[:num_to_delete]:
        old_path.unlink(missing_ok=True)
        logger.info("removed old checkpoint %s", old_path)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a pretraining checkpoint with ``weights_only=True`` and check its format.

    Raises:
        ValueError: the file is not a CytoFM pretraining checkpoint or has an unknown version.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{path} has checkpoint version {state.get('version')!r}; this CytoFM reads "
            f"version {CHECKPOINT_VERSION}"
        )
    return state


class UnreadableCheckpointsError(ValueError):
    """Every checkpoint of a run folder failed to load, so the run cannot resume."""


def load_latest_checkpoint(
    output_dir: Path, *, set_aside_unreadable: bool = False
) -> tuple[Path, dict[str, Any]] | None:
    """Load the newest checkpoint of a run folder that reads back.

    A checkpoint that fails to load (for example a file truncated by a full disk) is skipped
    with a warning and the next older one is tried.

    Args:
        output_dir: Run folder.
        set_aside_unreadable: Once an older checkpoint has loaded, rename each newer one that
            failed to ``<name>.unreadable``, so that it no longer counts as a checkpoint for
            rotation or later resumes. Only the process that writes checkpoints should do this.

    Returns:
        ``(path, state)`` of the checkpoint loaded, or None if the folder has no checkpoint.

    Raises:
        UnreadableCheckpointsError: the folder has checkpoints but none of them loads. Nothing
            is renamed then, because starting from step 0 would discard the run, and a read
            error of the storage can make every file fail at once.
    """
    failures: list[tuple[Path, str]] = []
    for _, path in reversed(list_checkpoints(output_dir)):
        try:
            state = load_checkpoint(path)
        # torch.load of a damaged file raises many types (EOFError, RuntimeError, OSError,
        # UnpicklingError, IndexError, ...), and every one of them means the file is unusable.
        except Exception as error:
            reason = describe_load_error(path, error)
            logger.warning("skipping unreadable checkpoint %s: %s", path, reason)
            failures.append((path, reason))
            continue
        if set_aside_unreadable:
            for failed_path, _ in failures:
                set_aside_checkpoint(failed_path)
        logger.info("resuming from %s (step %d)", path, state["step"])
        return path, state
    if failures:
        raise UnreadableCheckpointsError(describe_unreadable_checkpoints(output_dir, failures))
    return None


def set_aside_checkpoint(path: Path) -> Path | None:
    """Rename an unreadable checkpoint so that its name ends in ``.unreadable``.

    A taken name gets a number before the suffix (``checkpoint-000000196-2.pt.unreadable``).

    Returns:
        The new path, or None if the rename failed (logged as a warning).
    """
    set_aside = unused_path(path.with_name(path.name + UNREADABLE_SUFFIX), suffix=SET_ASIDE_SUFFIX)
    try:
        path.rename(set_aside)
    except OSError as error:
        logger.warning("renaming unreadable checkpoint %s to %s failed: %s", path, set_aside, error)
        return None
    logger.warning(
        "renamed unreadable checkpoint %s to %s, so it no longer counts as a checkpoint",
        path,
        set_aside.name,
    )
    return set_aside


def describe_unreadable_checkpoints(output_dir: Path, failures: list[tuple[Path, str]]) -> str:
    """Return the error message for a run folder whose checkpoints all fail to load."""
    folder = Path(output_dir) / CHECKPOINT_DIRNAME
    listed = "; ".join(f"{path.name}: {reason}" for path, reason in failures)
    return (
        f"none of the {len(failures)} checkpoint(s) in {folder} loads, so the run cannot "
        f"resume ({listed}). Nothing was renamed or deleted. If the storage had a read error, "
        "fix it and run the same command again. To start the run over from step 0, move these "
        f"files out of {folder}, or use a new run.output_dir"
    )


def describe_load_error(path: Path, error: BaseException) -> str:
    """Return a one-line reason why ``path`` failed to load."""
    try:
        size = path.stat().st_size
    except OSError as stat_error:
        return f"read failed ({stat_error.strerror or stat_error})"
    if size == 0:
        return "empty file (0 bytes)"
    detail = _first_sentence(error)
    # torch.save writes a zip archive whose directory is at the end of the file, so a file cut
    # short by a full disk or an interrupted copy has no end-of-directory record.
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError:
        is_zip = True
    if not is_zip:
        return f"truncated or corrupt file ({size} bytes, no zip directory at its end; {detail})"
    if isinstance(error, OSError):
        return f"read failed ({detail})"
    return detail


def _first_sentence(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    # torch's message for a truncated file adds several sentences of advice after the first.
    return lines[0].split(". ")[0]


class CheckpointMismatchError(ValueError):
    """The checkpoint to resume from was written by a model of another shape."""


# Backbone arguments whose change alters the weights' shapes or meaning, with their config key.
_BACKBONE_KEYS = {
    "embed_dim": "model.embed_dim",
    "depth": "model.depth",
    "num_heads": "model.num_heads",
    "patch_size": "model.patch_size",
    "img_size": "model.img_size",
    "reg_tokens": "model.reg_tokens",
    "mlp_ratio": None,
    "qkv_bias": None,
    "qk_norm": None,
}
# Head settings that alter the shapes of the head weights or of the loss centres.
_HEAD_KEYS = ("out_dim", "patch_out_dim", "shared", "hidden_dim", "bottleneck_dim", "num_layers")


def check_checkpoint_fits(
    path: Path, state: dict[str, Any], backbone: dict[str, Any], head: dict[str, Any]
) -> None:
    """Check that a checkpoint was written by the model that the config builds.

    Args:
        path: Checkpoint file, named in the error.
        state: Loaded checkpoint.
        backbone: ``backbone_arguments`` of the model built from the config.
        head: Head section of the config as a dict.

    Raises:
        CheckpointMismatchError: a backbone argument (from the checkpoint's ``model`` entry)
            or a head setting (from its ``config`` entry) differs.
    """
    saved_model = state.get("model") or {}
    differences = []
    for key, config_key in _BACKBONE_KEYS.items():
        if key not in saved_model:
            continue
        saved, current = _plain(saved_model[key]), _plain(backbone[key])
        if saved != current:
            differences.append((config_key or f"{key} (set by the architecture)", saved, current))
    saved_init = saved_model.get("init_values")
    if "init_values" in saved_model and (saved_init is None) != (backbone["init_values"] is None):
        # Layer scale adds parameters; any value other than null has the same shapes.
        differences.append(("model.init_values", saved_init, backbone["init_values"]))
    saved_head = (state.get("config") or {}).get("head") or {}
    for key in _HEAD_KEYS:
        if key in saved_head and saved_head[key] != head[key]:
            differences.append((f"head.{key}", saved_head[key], head[key]))
    if not differences:
        return
    if saved_model.get("arch", backbone["arch"]) != backbone["arch"]:
        differences.insert(0, ("model.arch", saved_model["arch"], backbone["arch"]))
    saved_text = ", ".join(f"{key}={json.dumps(saved)}" for key, saved, _ in differences)
    current_text = ", ".join(f"{key}={json.dumps(current)}" for key, _, current in differences)
    overrides = " ".join(
        f"{key}={json.dumps(saved)}"
        for key, saved, _ in differences
        if not key.endswith("architecture)")
    )
    raise CheckpointMismatchError(
        f"the checkpoint {path} was written by a model with {saved_text}, while the config "
        f"asks for {current_text}. Use another run.output_dir for the new model, or resume "
        f"with the old settings ({overrides or 'the model.arch the run started with'})"
    )


def _plain(value: Any) -> Any:
    """Turn tuples into lists, so values compare equal whichever way they were stored."""
    return list(value) if isinstance(value, tuple) else value


def capture_rng_state() -> dict[str, Any]:
    """Return the python, numpy, torch and CUDA RNG states as plain data."""
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(mt_state), "gauss": gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore RNG states written by ``capture_rng_state``."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["name"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
