"""``load_backbone``: turn any supported checkpoint file into a ready ``CytoViT``.

The architecture is read off the weights: width, depth, patch size, position grid, layer
scale, registers and MLP ratio. Weights cannot show the number of heads, so it comes from the
checkpoint's own metadata, else from the ``arch`` name, else from the 64 dimensions per head
that every standard ViT size uses. Loading is strict: a missing or unexpected backbone key
raises ``BackboneKeyError`` listing them.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torchvision import transforms

from cytofm.models.checkpoint_formats import (
    BackboneWeights,
    CheckpointError,
    extract_backbone,
    read_checkpoint,
    to_timm_keys,
)
from cytofm.models.vit import (
    ARCHITECTURES,
    CytoViT,
    ViTSpec,
    check_img_size,
    resample_pos_embed,
)

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneKeyError(CheckpointError):
    """Backbone keys missing from, or unexpected in, a checkpoint."""


@dataclass
class LoadedBackbone:
    """A backbone ready for inference with the preprocessing it expects."""

    model: CytoViT
    transform: Callable[[Any], torch.Tensor]
    embed_dim: int
    patch_size: int
    img_size: tuple[int, int]
    source_format: str
    spec: ViTSpec


def infer_spec(state_dict: dict[str, torch.Tensor], hints: dict[str, Any] | None = None) -> ViTSpec:
    """Infer the ViT architecture from backbone weights in timm key names.

    Raises:
        BackboneKeyError: The weights lack the keys every ViT has.
    """
    hints = dict(hints or {})
    required = ("patch_embed.proj.weight", "pos_embed", "cls_token")
    missing = [key for key in required if key not in state_dict]
    if missing:
        sample = ", ".join(sorted(state_dict)[:12])
        raise BackboneKeyError(
            f"no ViT backbone found: missing {missing}. Keys present start with: {sample}. "
            f"If the keys carry an unusual prefix, pass key_prefix= to strip it."
        )
    patch_weight = state_dict["patch_embed.proj.weight"]
    embed_dim, _, patch_size, _ = patch_weight.shape
    block_indices = {
        int(match.group(1)) for key in state_dict if (match := re.match(r"blocks\.(\d+)\.", key))
    }
    # max + 1, not the count, so that a missing middle block shows up as missing keys.
    depth = max(block_indices) + 1 if block_indices else 0
    reg_tokens = state_dict["reg_token"].shape[1] if "reg_token" in state_dict else 0
    positions = state_dict["pos_embed"].shape[1]
    # timm and iBOT give the CLS token (and registers, in timm) a position embedding.
    patches = positions - 1 - reg_tokens
    side = math.isqrt(max(patches, 0))
    if side * side != patches:
        patches = positions - 1
        side = math.isqrt(patches)
        if side * side != patches:
            raise BackboneKeyError(
                f"pos_embed has {positions} positions, which is not a square patch grid plus "
                f"prefix tokens; pass img_size= explicitly"
            )
    mlp_hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0] if depth else 4 * embed_dim
    num_heads = hints.get("num_heads")
    arch = hints.get("arch")
    preset = ARCHITECTURES.get(arch.replace("deit_", "vit_")) if isinstance(arch, str) else None
    if preset is not None and preset[0] == embed_dim:
        num_heads = num_heads or preset[2]
    if hints.get("depth") is not None:
        # A checkpoint that records its depth but lacks its last blocks is truncated.
        depth = max(depth, int(hints["depth"]))
    elif preset is not None and preset[0] == embed_dim:
        # Likewise for a checkpoint that only names its preset (iBOT and DINO `args.arch`).
        depth = max(depth, preset[1])
    if num_heads is None:
        num_heads = max(1, embed_dim // 64)
    spec = ViTSpec(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=int(num_heads),
        patch_size=patch_size,
        img_size=side * patch_size,
        mlp_ratio=mlp_hidden / embed_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        qk_norm="blocks.0.attn.q_norm.weight" in state_dict,
        init_values=1e-5 if "blocks.0.ls1.gamma" in state_dict else None,
        reg_tokens=reg_tokens,
    )
    return spec


def check_arch_matches(arch: str, spec: ViTSpec, path: Path) -> None:
    """Raise a ValueError when preset ``arch`` is unknown or disagrees with the weights' shape.

    A depth below the preset's passes, so a checkpoint that lacks its last blocks is reported
    as missing keys by :func:`load_state_dict_strict`.
    """
    preset = ARCHITECTURES.get(arch.replace("deit_", "vit_"))
    if preset is None:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    width, depth, _ = preset
    if spec.embed_dim != width or spec.depth > depth:
        raise ValueError(
            f"arch={arch!r} (width {width}, depth {depth}) does not match the weights in "
            f"{path} (width {spec.embed_dim}, depth {spec.depth}); leave arch unset to take "
            "the shape from the weights, and pass num_heads if the head count differs from "
            "the default"
        )


def build_transform(
    img_size: int | tuple[int, int] | None,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> transforms.Compose:
    """Build the inference preprocessing: optional resize, to tensor, normalise."""
    steps: list[Any] = []
    if img_size is not None:
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        steps.append(transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC))
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


def load_state_dict_strict(
    model: CytoViT, state_dict: dict[str, torch.Tensor], source: str
) -> None:
    """Load backbone weights, allowing only ``mask_token`` to be absent.

    Position embeddings stored for another grid are resampled (bicubic) and logged.

    Raises:
        BackboneKeyError: Missing or unexpected keys, or shapes that do not match.
    """
    state_dict = dict(state_dict)
    if "pos_embed" in state_dict and state_dict["pos_embed"].shape != model.pos_embed.shape:
        old = state_dict["pos_embed"]
        old_patches = old.shape[1] - model.num_prefix_tokens
        old_side = math.isqrt(old_patches)
        if old_side * old_side != old_patches:
            raise BackboneKeyError(
                f"{source}: cannot resample pos_embed of shape {tuple(old.shape)} to "
                f"{tuple(model.pos_embed.shape)}: the stored grid is not square"
            )
        state_dict["pos_embed"] = resample_pos_embed(
            old, (old_side, old_side), model.grid_size, model.num_prefix_tokens
        )
        logger.info(
            "Resampled position embedding of %s from a %dx%d to a %dx%d patch grid",
            source,
            old_side,
            old_side,
            *model.grid_size,
        )
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict) - {"mask_token"})
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise BackboneKeyError(
            f"{source}: backbone keys do not match the model.\n"
            f"  missing ({len(missing)}): {missing[:20]}\n"
            f"  unexpected ({len(unexpected)}): {unexpected[:20]}"
        )
    wrong_shapes = [
        f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(expected[key].shape)}"
        for key, value in state_dict.items()
        if value.shape != expected[key].shape
    ]
    if wrong_shapes:
        raise BackboneKeyError(f"{source}: shape mismatch: " + "; ".join(wrong_shapes[:10]))
    if "mask_token" not in state_dict:
        state_dict["mask_token"] = torch.zeros_like(expected["mask_token"])
    model.load_state_dict(state_dict, strict=True)


def load_backbone(
    source: str | Path,
    *,
    arch: str | None = None,
    num_heads: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    which: str = "teacher",
    key_prefix: str | None = None,
    trust_pickle: bool = False,
    device: str | torch.device = "cpu",
    resize: bool = True,
) -> LoadedBackbone:
    """Load a ViT backbone from a local checkpoint file in eval mode.

    Accepts the public CytoFM ViT-B/16 release and other iBOT/DINO training checkpoints,
    timm or UNI state dicts (``.pth``, ``.bin``, ``.safetensors``) and cytofm pretraining
    checkpoints. Nothing is downloaded.

    Args:
        source: Path of the checkpoint file.
        arch: Preset name (``vit_small``...) that picks the number of heads; it must match
            the width of the weights (and their depth, unless blocks are missing).
        num_heads: Number of attention heads; overrides ``arch`` and the checkpoint.
        img_size: Build the model for this input size; the position embedding is resampled
            if the checkpoint was trained at another size. Default: the checkpoint's size.
        which: ``teacher`` (default, as iBOT and DINO evaluate) or ``student``.
        key_prefix: Prefix to strip from every key, for files with unusual wrappers.
        trust_pickle: Allow unrestricted unpickling for a file you trust.
        device: Where to put the model.
        resize: Whether ``transform`` resizes images to ``img_size``; set False to feed
            tiles of any size that is a multiple of the patch size.

    Returns:
        ``LoadedBackbone`` with the model, its preprocessing transform and sizes.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        CheckpointError: The file is a folder, not a readable checkpoint, or contains no usable
            ViT backbone (``BackboneKeyError`` for missing or unexpected keys).
        ValueError: ``arch`` disagrees with the weights, ``img_size`` is not a multiple of
            the patch size, or ``num_heads`` does not divide the width.
    """
    path = Path(source)
    checkpoint = read_checkpoint(path, trust_pickle=trust_pickle)
    if key_prefix and isinstance(checkpoint, dict):
        checkpoint = {
            key[len(key_prefix) :] if key.startswith(key_prefix) else key: value
            for key, value in checkpoint.items()
        }
    weights: BackboneWeights = extract_backbone(checkpoint, which=which, path=path)
    state_dict = to_timm_keys(weights.state_dict)
    if weights.dropped_keys:
        logger.info(
            "Ignored %d non-backbone keys in %s (projection heads)", len(weights.dropped_keys), path
        )

    hints = dict(weights.arch_hints)
    if arch is not None:
        hints["arch"] = arch
    if num_heads is not None:
        hints["num_heads"] = num_heads
    spec = infer_spec(state_dict, hints)
    if arch is not None:
        check_arch_matches(arch, spec, path)
    stored_size = spec.img_size
    if img_size is not None:
        check_img_size(img_size, spec.patch_size)
        spec.img_size = img_size
    model = CytoViT(spec)
    load_state_dict_strict(model, state_dict, str(path))
    model.eval().to(device)

    size = spec.img_size if isinstance(spec.img_size, tuple) else (spec.img_size, spec.img_size)
    logger.info(
        "Loaded %s backbone from %s: embed_dim=%d depth=%d heads=%d patch=%d trained at %s",
        weights.source_format,
        path,
        spec.embed_dim,
        spec.depth,
        spec.num_heads,
        spec.patch_size,
        stored_size,
    )
    return LoadedBackbone(
        model=model,
        transform=build_transform(size if resize else None),
        embed_dim=spec.embed_dim,
        patch_size=spec.patch_size,
        img_size=size,
        source_format=weights.source_format,
        spec=spec,
    )
