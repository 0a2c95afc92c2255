"""Reading checkpoint files safely and finding the ViT backbone inside them.

Supported layouts, detected from the file's content rather than its name:

- ``cytofm-pretrain``: our pretraining checkpoints (``{"format": "cytofm-pretrain", "student",
  "teacher", "model": {architecture}, ...}``), plain data only.
- ``ibot`` / ``dino``: training checkpoints of the iBOT and DINO scripts (the public CytoFM
  release is one): ``{"teacher", "student", "optimizer", "epoch", "args", ...}`` with backbone
  keys under ``backbone.`` or ``module.backbone.`` and projection-head keys under ``head.``.
  ``args`` is a pickled ``argparse.Namespace`` that may contain numpy scalars.
- ``state_dict``: a bare backbone state dict in timm names (timm, UNI, DINO and iBOT
  ``checkpoint_teacher.pth`` files), possibly wrapped in ``{"state_dict": ...}`` or
  ``{"model": ...}``, stored as ``.pth``, ``.bin`` or ``.safetensors``.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

# Prefixes that wrap a backbone in training code: DDP (`module.`), DINO/iBOT's MultiCropWrapper
# (`backbone.`), and common wrappers of released files.
KNOWN_PREFIXES = ("module.", "backbone.", "encoder.", "model.", "trunk.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not contain a usable ViT backbone."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that would import objects outside the allow-list."""


@dataclass
class BackboneWeights:
    """A backbone state dict in timm key names plus the architecture hints stored beside it."""

    state_dict: dict[str, torch.Tensor]
    source_format: str
    arch_hints: dict[str, Any] = field(default_factory=dict)
    dropped_keys: list[str] = field(default_factory=list)


def _numpy_allow_list() -> list[Any]:
    """Return the numpy objects that pickled numpy scalars and dtypes refer to.

    Files written with numpy 1.x name ``numpy.core.multiarray.scalar``; numpy 2.x writes
    ``numpy._core.multiarray.scalar``. Both names are registered for the same function.
    """
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    allowed: list[Any] = [
        np.dtype,
        scalar,
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.ndarray,
    ]
    reconstruct = getattr(getattr(np, "_core", np.core).multiarray, "_reconstruct", None)
    if reconstruct is not None:
        allowed.append((reconstruct, "numpy.core.multiarray._reconstruct"))
        allowed.append((reconstruct, "numpy._core.multiarray._reconstruct"))
    # numpy >= 1.25 pickles each dtype with its class, e.g. numpy.dtypes.Float64DType.
    dtypes_module = getattr(np, "dtypes", None)
    if dtypes_module is not None:
        for name in dir(dtypes_module):
            value = getattr(dtypes_module, name)
            if isinstance(value, type) and name.endswith("DType"):
                allowed.append(value)
    return allowed


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> Any:
    """Load a checkpoint file without running code from it.

    ``.safetensors`` files are read with safetensors. Everything else goes through
    ``torch.load(weights_only=True)`` with ``argparse.Namespace`` and numpy scalars and dtypes
    added to the allow-list (iBOT and DINO pickle their arguments that way).

    Args:
        path: Local file.
        trust_pickle: Unpickle without restrictions. Only for files you trust: a pickle can
            run arbitrary code.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: The pickle refers to objects outside the allow-list.
        CheckpointError: The file is not a readable checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(describe_checkpoint_folder(path))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as error:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from error
    if trust_pickle:
        logger.warning("Unpickling %s without restrictions (trust_pickle=True)", path)
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError) as error:
            raise CheckpointError(
                f"{path}: not a readable PyTorch checkpoint ({_first_line(error)})"
            ) from error
    try:
        with torch.serialization.safe_globals([argparse.Namespace, *_numpy_allow_list()]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        disallowed = _disallowed_global(error)
        if disallowed is None:
            # Not a pickle at all (e.g. "invalid load key"): trusting it would not help.
            raise CheckpointError(
                f"{path}: not a readable PyTorch checkpoint ({_unpickler_reason(error)})"
            ) from error
        raise UnsafeCheckpointError(
            f"{path}: not loaded because its pickle refers to {disallowed}, which is outside "
            "the allow-list (tensors, argparse.Namespace, numpy scalars). If you trust this "
            "file, allow unrestricted unpickling: load_backbone(..., trust_pickle=True), "
            "backbone.trust_pickle=true for cytofm-extract, --trust-pickle for "
            "cytofm-visualize. A pickle can run arbitrary code."
        ) from error
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as error:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: "
            f"{_first_line(error)})"
        ) from error


CHECKPOINT_PATTERNS = ("*.pt", "*.pth", "*.bin", "*.safetensors", "checkpoints/checkpoint-*.pt")
"""File patterns that :func:`describe_checkpoint_folder` lists as likely checkpoints."""


def describe_checkpoint_folder(folder: Path, max_files: int = 10) -> str:
    """Return an error message for a folder given where a checkpoint file is expected.

    The message lists the files inside that match :data:`CHECKPOINT_PATTERNS`, if any.
    """
    found = sorted({match for pattern in CHECKPOINT_PATTERNS for match in folder.glob(pattern)})
    found = [match for match in found if match.is_file()]
    if not found:
        return (
            f"{folder} is a folder, not a checkpoint file, and contains no *.pt, *.pth, *.bin "
            "or *.safetensors file; pass the path of the checkpoint file"
        )
    names = ", ".join(str(match) for match in found[:max_files])
    more = f" and {len(found) - max_files} more" if len(found) > max_files else ""
    return (
        f"{folder} is a folder, not a checkpoint file; pass one of the files inside it: "
        f"{names}{more}"
    )


def _disallowed_global(error: pickle.UnpicklingError) -> str | None:
    """Return the global that torch's restricted unpickler rejected, or None for other errors."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    match = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if match is not None:
        return match.group(1)
    if "global" in text.lower():
        return "an object that is not allowed"
    return None


def _unpickler_reason(error: pickle.UnpicklingError) -> str:
    """Return torch's reason for a failed restricted unpickle, without its advice.

    torch >= 2.6 wraps the reason in advice to retry with ``weights_only=False``; that retry
    would run code from a file that is not even a checkpoint, so only the reason is kept.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", text, re.DOTALL)
    if match is not None:
        return " ".join(match.group(1).split())
    return _first_line(error)


def _first_line(error: BaseException) -> str:
    """Return the first line of an exception message without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _is_tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(value, torch.Tensor) for value in obj.values())
    )


def _strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip known wrapper prefixes that every key carries, repeatedly (``module.backbone.``)."""
    result = dict(state_dict)
    changed = True
    while changed:
        changed = False
        for prefix in KNOWN_PREFIXES:
            if result and all(key.startswith(prefix) for key in result):
                result = {key[len(prefix) :]: value for key, value in result.items()}
                changed = True
    return result


def _split_backbone(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """Keep the backbone of a MultiCropWrapper-style dict (``backbone.*``), drop ``head.*``."""
    stripped = dict(state_dict)
    if stripped and all(key.startswith("module.") for key in stripped):
        stripped = {key[len("module.") :]: value for key, value in stripped.items()}
    if any(key.startswith("backbone.") for key in stripped):
        prefix = "backbone."
        backbone = {k[len(prefix) :]: v for k, v in stripped.items() if k.startswith(prefix)}
        dropped = [key for key in stripped if not key.startswith("backbone.")]
        return backbone, dropped
    return _strip_prefixes(stripped), []


def _args_to_hints(args: Any) -> dict[str, Any]:
    """Pull architecture hints out of an iBOT/DINO ``args`` namespace or dict."""
    if args is None:
        return {}
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    hints: dict[str, Any] = {}
    arch = values.get("arch")
    if isinstance(arch, str):
        hints["arch"] = arch
    if values.get("patch_size") is not None:
        hints["patch_size"] = int(values["patch_size"])
    return hints


def extract_backbone(
    checkpoint: Any, which: str = "teacher", path: str | Path = ""
) -> BackboneWeights:
    """Find the backbone state dict inside a loaded checkpoint and name its layout.

    Args:
        checkpoint: What ``read_checkpoint`` returned.
        which: ``teacher`` or ``student`` for training checkpoints that hold both.
        path: File name for error messages.

    Raises:
        CheckpointError: Unknown layout, or ``which`` is not in the checkpoint.
    """
    if which not in ("teacher", "student"):
        raise CheckpointError(f"invalid which={which!r}: expected 'teacher' or 'student'")
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(
            f"{path}: unknown checkpoint layout: expected a dict, found {type(checkpoint).__name__}"
        )

    if checkpoint.get("format") == "cytofm-pretrain":
        if which not in checkpoint:
            raise CheckpointError(f"{path}: cytofm checkpoint has no {which!r} weights")
        hints = dict(checkpoint.get("model") or {})
        return BackboneWeights(dict(checkpoint[which]), "cytofm-pretrain", hints)

    if "teacher" in checkpoint and "student" in checkpoint:
        if not isinstance(checkpoint[which], Mapping):
            raise CheckpointError(f"{path}: {which!r} entry is not a state dict")
        backbone, dropped = _split_backbone(checkpoint[which])
        hints = _args_to_hints(checkpoint.get("args"))
        has_patch_head = any("last_layer2" in key or "patch" in key for key in dropped)
        layout = "ibot" if "masked_embed" in backbone or has_patch_head else "dino"
        if "ibot_loss" in checkpoint:
            layout = "ibot"
        return BackboneWeights(backbone, layout, hints, dropped)

    for wrapper in ("state_dict", "model", "teacher", "module"):
        if wrapper in checkpoint and isinstance(checkpoint[wrapper], Mapping):
            inner = extract_backbone(checkpoint[wrapper], which, path)
            return inner

    if _is_tensor_dict(checkpoint):
        backbone, dropped = _split_backbone(checkpoint)
        return BackboneWeights(backbone, "state_dict", {}, dropped)

    found = ", ".join(sorted(str(key) for key in checkpoint)[:20])
    raise CheckpointError(
        f"{path}: unknown checkpoint layout. Top-level keys found: {found}. Expected a cytofm "
        f"pretraining checkpoint, an iBOT/DINO training checkpoint (teacher/student), or a "
        f"ViT state dict in timm key names."
    )


def to_timm_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename iBOT/DINO backbone keys to timm's and drop non-backbone entries.

    iBOT stores layer scale as ``blocks.N.gamma_1``/``gamma_2`` and the mask token as
    ``masked_embed [1, D]``. Classifier heads (``head.*``) are removed because a backbone has
    none.

    NOTE: DINOv2 names registers ``register_tokens`` and keeps them out of the position
    embedding, unlike timm; the rename below is not enough to load DINOv2 with registers.
    """
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("head.") or key == "head":
            continue
        new_key = key
        if key in ("masked_embed", "mask_token"):
            new_key = "mask_token"
            value = value.reshape(1, 1, -1)
        elif key == "register_tokens":
            new_key = "reg_token"
        elif ".gamma_1" in key:
            new_key = key.replace(".gamma_1", ".ls1.gamma")
        elif ".gamma_2" in key:
            new_key = key.replace(".gamma_2", ".ls2.gamma")
        converted[new_key] = value
    return converted
