"""Feature extractors for ``cytofm-extract``: a ViT backbone, a random ViT, or a descriptor.

An extractor maps a batch of transformed tiles to one embedding per tile and, for ViTs,
optionally the patch tokens. Each row of the output depends on its own tile only, so on CPU
the batch size does not change a feature (the tests compare files bit for bit).

NOTE: on CUDA, cuBLAS may choose other kernels for other batch sizes, so features can differ
in the last bits between batch sizes; this path has not been run on a GPU.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torchvision import transforms

from cytofm.evaluation.handcrafted import DESCRIPTOR_DIM, colour_texture_descriptor
from cytofm.evaluation.weights_identity import file_identity
from cytofm.models.checkpoint_formats import CheckpointError, describe_checkpoint_folder
from cytofm.models.loading import build_transform, load_backbone
from cytofm.models.vit import ARCHITECTURES, CytoViT, ImageSizeError, ViTSpec, check_img_size

logger = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass
class BackboneConfig:
    """Model that turns tiles into features, and how to load it.

    Attributes:
        source: a checkpoint file for ``load_backbone``; ``random`` for a randomly initialised
            ViT of preset ``arch``; ``handcrafted`` for the colour and texture descriptor.
        arch: ViT preset (``vit_tiny|vit_small|vit_base|vit_large``); for a checkpoint it
            picks the number of heads and must match the width of the weights.
        num_heads: attention heads of a checkpoint, when it does not record them.
        img_size: input side in pixels; tiles are resized to it (see ``resize``). None keeps
            the checkpoint's size (224 for ``random``).
        patch_size: patch side of the ``random`` ViT.
        which: ``teacher`` or ``student`` weights of a pretraining checkpoint.
        key_prefix: prefix to strip from checkpoint keys.
        trust_pickle: allow unrestricted unpickling of a checkpoint you trust.
        resize: resize tiles to ``img_size``; False feeds tiles at their own size (a
            multiple of the patch size, or any size for ``handcrafted``).
        random_init: keep the checkpoint's architecture but re-initialise every weight, the
            random baseline of the same shape.
        seed: seed of the random initialisation.
        pooling: tile embedding of a ViT: ``cls`` (the CLS token, as UNI and CytoFM use),
            ``mean`` (mean of the patch tokens) or ``cls+mean`` (both concatenated, twice the
            width, as in DINOv2's linear evaluation).
    """

    source: str = "random"
    arch: str | None = None
    num_heads: int | None = None
    img_size: int | None = None
    patch_size: int = 16
    which: str = "teacher"
    key_prefix: str | None = None
    trust_pickle: bool = False
    resize: bool = True
    random_init: bool = False
    seed: int = 0
    pooling: Literal["cls", "mean", "cls+mean"] = "cls"


def default_feature_set_name(config: BackboneConfig) -> str:
    """Name a feature set after its backbone: ``handcrafted``, ``random-vit_small``, a file stem."""
    if config.source == "handcrafted":
        return "handcrafted"
    if config.source == "random":
        return f"random-{config.arch or 'vit_small'}"
    stem = Path(config.source).stem
    return f"{stem}-random" if config.random_init else stem


def resolve_precision(precision: Precision, device: torch.device) -> torch.dtype | None:
    """Return the autocast dtype: None (fp32) on CPU, bf16 on CUDA for ``auto`` where supported."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


class ViTExtractor:
    """Tile embeddings (and optionally patch tokens) of a ``CytoViT`` in eval mode.

    ``pooling`` picks the embedding: the CLS token, the mean of the patch tokens (register
    tokens excluded), or both concatenated.
    """

    def __init__(
        self,
        model: CytoViT,
        transform: Callable[[Any], Tensor],
        *,
        device: torch.device,
        precision: Precision = "auto",
        patch_tokens: bool = False,
        description: dict[str, Any] | None = None,
        weights: dict[str, Any] | None = None,
        pooling: Literal["cls", "mean", "cls+mean"] = "cls",
    ) -> None:
        if pooling not in ("cls", "mean", "cls+mean"):
            raise ValueError(
                f"backbone.pooling must be 'cls', 'mean' or 'cls+mean', got {pooling!r}"
            )
        self.model = model.eval().to(device)
        self.pooling = pooling
        self.weights = weights
        self.transform = transform
        self.device = device
        self.autocast_dtype = resolve_precision(precision, device)
        self.patch_tokens = patch_tokens
        self.embed_dim = model.embed_dim * (2 if pooling == "cls+mean" else 1)
        self.description = dict(description or {})
        self.description.update(
            embed_dim=self.embed_dim,
            pooling=pooling,
            patch_size=model.patch_size,
            autocast=str(self.autocast_dtype).replace("torch.", "")
            if self.autocast_dtype
            else None,
        )

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Embed ``[B, 3, H, W]`` tiles into ``[B, D]`` and, if enabled, ``[B, h*w, D]``."""
        images = images.to(self.device, non_blocking=True)
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            tokens = self.model.forward_tokens(images)
        cls = tokens[:, 0].float()
        # The float copy of every patch token is made only when something reads it.
        needs_patches = self.patch_tokens or self.pooling != "cls"
        patch_tokens = tokens[:, self.model.num_prefix_tokens :].float() if needs_patches else None
        if self.pooling == "cls":
            embeddings = cls
        elif self.pooling == "mean":
            embeddings = patch_tokens.mean(dim=1)
        else:
            embeddings = torch.cat([cls, patch_tokens.mean(dim=1)], dim=1)
        return embeddings, patch_tokens if self.patch_tokens else None

    def patch_grid(self, images: Tensor) -> tuple[int, int]:
        """Patch grid (rows, columns) of a batch of tiles."""
        height, width = images.shape[-2:]
        return height // self.model.patch_size, width // self.model.patch_size


class HandcraftedExtractor:
    """The colour and texture descriptor of :mod:`cytofm.evaluation.handcrafted`."""

    patch_tokens = False
    embed_dim = DESCRIPTOR_DIM

    def __init__(self, *, img_size: int | None, device: torch.device) -> None:
        steps: list[Any] = []
        if img_size is not None:
            steps.append(transforms.Resize((img_size, img_size), antialias=True))
        steps.append(transforms.ToTensor())
        self.transform = transforms.Compose(steps)
        self.device = device
        self.description = {
            "kind": "handcrafted colour and texture descriptor",
            "embed_dim": DESCRIPTOR_DIM,
            "img_size": img_size,
        }
        self.weights = {"kind": "handcrafted", "embed_dim": DESCRIPTOR_DIM}

    def __call__(self, images: Tensor) -> tuple[Tensor, None]:
        """Describe ``[B, 3, H, W]`` tiles in ``[0, 1]`` by ``[B, 86]`` values."""
        return colour_texture_descriptor(images.to(self.device)), None

    def patch_grid(self, images: Tensor) -> tuple[int, int]:
        raise ValueError("the handcrafted descriptor has no patch tokens")


Extractor = ViTExtractor | HandcraftedExtractor


def _random_vit(config: BackboneConfig, spec: ViTSpec) -> CytoViT:
    # timm initialises weights in the constructor, so the seed fixes every parameter.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return CytoViT(spec)


def build_extractor(
    config: BackboneConfig,
    *,
    device: torch.device,
    precision: Precision = "auto",
    patch_tokens: bool = False,
) -> Extractor:
    """Build the extractor that ``config`` describes.

    The extractor's ``weights`` attribute identifies the weights for ``meta.json``: the
    checkpoint file's size and partial hash, or the seed and shape of a random ViT.

    Raises:
        ValueError: an unknown ``arch`` or one that disagrees with the checkpoint, patch
            tokens requested from the descriptor, a ``backbone.img_size`` that is not a
            multiple of the patch size, or a head count that does not divide the width.
        CheckpointError: ``source`` is a folder or not a readable checkpoint.
        FileNotFoundError: the checkpoint file does not exist.
    """
    if config.source == "handcrafted":
        if patch_tokens:
            raise ValueError("patch_tokens=true needs a ViT; the handcrafted descriptor has none")
        return HandcraftedExtractor(img_size=config.img_size, device=device)

    description: dict[str, Any] = {"source": config.source, "random_init": config.random_init}
    if config.source == "random":
        arch = config.arch or "vit_small"
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHITECTURES)}")
        width, depth, heads = ARCHITECTURES[arch]
        img_size = config.img_size or 224
        check_img_size(img_size, config.patch_size, key="backbone.img_size")
        spec = ViTSpec(width, depth, heads, patch_size=config.patch_size, img_size=img_size)
        model = _random_vit(config, spec)
        transform = build_transform(img_size if config.resize else None)
        description.update(kind="random ViT", arch=arch, seed=config.seed)
        weights = {"kind": "random", "seed": config.seed, "spec": spec.to_dict()}
    else:
        loaded = _load_checkpoint(config)
        spec, model, transform = loaded.spec, loaded.model, loaded.transform
        description.update(kind="checkpoint", source_format=loaded.source_format)
        weights = file_identity(config.source)
        if config.random_init:
            model = _random_vit(config, spec)
            description.update(kind="random ViT of the checkpoint's shape", seed=config.seed)
            weights = {"kind": "random_init", "seed": config.seed, "spec": spec.to_dict()}
    description.update(spec=spec.to_dict(), transform=repr(transform))
    return ViTExtractor(
        model,
        transform,
        device=device,
        precision=precision,
        patch_tokens=patch_tokens,
        description=description,
        weights=weights,
        pooling=config.pooling,
    )


def _load_checkpoint(config: BackboneConfig) -> Any:
    """Run ``load_backbone`` on ``config.source``, naming the ``backbone.*`` keys in errors."""
    source = Path(config.source)
    if source.is_dir():
        raise CheckpointError("backbone.source: " + describe_checkpoint_folder(source))
    if not source.is_file():
        raise FileNotFoundError(f"backbone checkpoint not found: {config.source}")
    try:
        return load_backbone(
            config.source,
            arch=config.arch,
            num_heads=config.num_heads,
            img_size=config.img_size,
            which=config.which,
            key_prefix=config.key_prefix,
            trust_pickle=config.trust_pickle,
            resize=config.resize,
        )
    except ImageSizeError as error:
        check_img_size(error.img_size, error.patch_size, key="backbone.img_size")
        raise
