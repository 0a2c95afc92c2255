"""``attention`` figures: the last block's CLS-to-patch self-attention of a ViT, per head.

For each image the figure shows, per head, the attention map upsampled and blended over the
image, and below it the image with everything outside the smallest set of patches that
contains a chosen share of the attention mass dimmed. ``visualize_attention.py`` of
facebookresearch/dino thresholds the same way, also after renormalising the CLS row over the
patches.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from cytofm.data.decode import ImageDecodeError, load_rgb
from cytofm.visualize.drawing import blend_heatmap, dim_outside_mask, new_figure, save_figure
from cytofm.visualize.images import (
    IMAGE_SUFFIXES,
    FitMode,
    InputPlan,
    plan_model_input,
    prepare_input,
    upsample_to_image,
)

logger = logging.getLogger(__name__)


def cls_patch_attention(
    attention: torch.Tensor | np.ndarray, num_prefix_tokens: int, grid: tuple[int, int]
) -> np.ndarray:
    """Take the CLS query's attention to the patch tokens and renormalise it over patches.

    The CLS row of a softmax attention matrix sums to 1 over all keys, including CLS itself
    and any register tokens. Those prefix keys are dropped and the remaining weights divided
    by their sum, so each head's map is a distribution over the patches (sums to 1) and the
    thresholded share in ``mass_threshold_mask`` is a share of patch attention only.

    Args:
        attention: Softmax attention ``[B, heads, T, T]`` with
            ``T = num_prefix_tokens + rows * cols`` (``CytoViT.forward_with_attention``).
        num_prefix_tokens: CLS plus register tokens at the start of the sequence.
        grid: Patch grid (rows, columns), patches in row-major order.

    Returns:
        float64 ``[B, heads, rows, cols]``; each ``[rows, cols]`` map sums to 1.
    """
    if isinstance(attention, torch.Tensor):
        attention = attention.detach().float().cpu().numpy()
    attention = np.asarray(attention, dtype=np.float64)
    rows, cols = grid
    if attention.ndim != 4 or attention.shape[-1] != num_prefix_tokens + rows * cols:
        raise ValueError(
            f"attention of shape {attention.shape} does not fit {num_prefix_tokens} prefix "
            f"tokens plus a {rows}x{cols} patch grid"
        )
    patch_weights = attention[:, :, 0, num_prefix_tokens:]
    totals = patch_weights.sum(axis=-1, keepdims=True)
    # A head that puts all its mass on prefix tokens has no patch map, so it becomes uniform.
    uniform = np.full_like(patch_weights, 1.0 / patch_weights.shape[-1])
    safe_totals = np.where(totals > 0, totals, 1.0)
    normalised = np.where(totals > 0, patch_weights / safe_totals, uniform)
    return normalised.reshape(*attention.shape[:2], rows, cols)


def mass_threshold_mask(maps: np.ndarray, share: float) -> np.ndarray:
    """Keep the highest-weight cells of each map until they hold ``share`` of its mass.

    For each map over the last two axes, cells are sorted by weight and the smallest prefix
    whose sum reaches ``share`` of the map's total is kept (ties at the cut are broken by
    position). ``share=1`` keeps every cell with non-zero weight, except trailing weights
    that together are below 1e-12 of the total. An all-zero map keeps no cell.

    Args:
        maps: Non-negative weights ``[..., rows, cols]``.
        share: Share of the mass to keep, in (0, 1].

    Returns:
        bool array of the shape of ``maps``.
    """
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share of attention mass must be in (0, 1], got {share}")
    maps = np.asarray(maps, dtype=np.float64)
    flat = maps.reshape(-1, maps.shape[-2] * maps.shape[-1])
    order = np.argsort(-flat, axis=-1, kind="stable")
    sorted_weights = np.take_along_axis(flat, order, axis=-1)
    cumulative = np.cumsum(sorted_weights, axis=-1)
    targets = share * cumulative[:, -1:]
    # Relative slack so that a share hit exactly in exact arithmetic is not missed by rounding.
    reached = cumulative >= targets * (1.0 - 1e-12)
    keep_counts = np.where(targets[:, 0] > 0, reached.argmax(axis=-1) + 1, 0)
    keep_sorted = np.arange(flat.shape[-1])[None, :] < keep_counts[:, None]
    mask = np.zeros_like(flat, dtype=bool)
    np.put_along_axis(mask, order, keep_sorted, axis=-1)
    return mask.reshape(maps.shape)


@dataclass
class AttentionMaps:
    """Attention of one image, on the patch grid and on the source image.

    Attributes:
        plan: How the image was fed to the model.
        grid_maps: ``[heads, rows, cols]`` CLS-to-patch attention, each map summing to 1.
        grid_masks: ``[heads, rows, cols]`` patches kept by ``mass_threshold_mask``.
        image_maps: ``[heads, H, W]`` grid maps upsampled bilinearly to the source image.
        image_masks: ``[heads, H, W]`` grid masks upsampled (nearest) to the source image.
        share: Share of attention mass the masks keep.
    """

    plan: InputPlan
    grid_maps: np.ndarray
    grid_masks: np.ndarray
    image_maps: np.ndarray
    image_masks: np.ndarray
    share: float

    @property
    def num_heads(self) -> int:
        return self.grid_maps.shape[0]


@torch.inference_mode()
def compute_attention_maps(
    model: torch.nn.Module,
    transform,
    image: Image.Image,
    *,
    share: float = 0.6,
    max_size: int | None = 1024,
    fit: FitMode = "resize",
    device: str | torch.device = "cpu",
) -> AttentionMaps:
    """Run a backbone on one image and return its last block's per-head attention maps.

    Args:
        model: A ``CytoViT`` (needs ``forward_with_attention``, ``patch_size`` and
            ``num_prefix_tokens``).
        transform: PIL image to normalised tensor without resizing.
        image: RGB source image of any size.
        share: Share of attention mass the thresholded masks keep.
        max_size: Longer side the image is scaled down to before the model, if larger.
        fit: How the image reaches a multiple of the patch size (``resize`` or ``pad``).
        device: Where the model runs.
    """
    plan = plan_model_input(
        (image.height, image.width), model.patch_size, max_size=max_size, fit=fit
    )
    batch = prepare_input(image, plan, transform).to(device)
    _, attention = model.forward_with_attention(batch)
    grid_maps = cls_patch_attention(attention, model.num_prefix_tokens, plan.grid)[0]
    grid_masks = mass_threshold_mask(grid_maps, share)
    return AttentionMaps(
        plan=plan,
        grid_maps=grid_maps,
        grid_masks=grid_masks,
        image_maps=upsample_to_image(grid_maps, plan, mode="bilinear"),
        image_masks=upsample_to_image(grid_masks.astype(np.float32), plan, mode="nearest") > 0.5,
        share=share,
    )


def draw_attention_grid(
    image: Image.Image, maps: AttentionMaps, *, title: str, max_columns: int = 6
) -> Figure:
    """Draw one image's attention: the image and head mean, then two rows per row of heads.

    The first column shows the image and the mean over heads. Each other column shows one
    head, the blended heatmap above the thresholded view. Each heatmap is scaled to its
    own maximum, so colours compare places within a head, not across heads.
    """
    pixels = np.asarray(image)
    heads = maps.num_heads
    columns = min(heads, max_columns)
    head_rows = math.ceil(heads / columns)
    figure, axes = new_figure(2 * head_rows, columns + 1)

    mean_map = maps.image_maps.mean(axis=0)
    mean_mask = upsample_to_image(
        mass_threshold_mask(maps.grid_maps.mean(axis=0), maps.share).astype(np.float32),
        maps.plan,
        mode="nearest",
    )
    axes[0, 0].imshow(pixels)
    axes[0, 0].set_title("image", fontsize=9)
    axes[1, 0].imshow(blend_heatmap(pixels, mean_map))
    axes[1, 0].contour(mean_mask > 0.5, levels=[0.5], colors="white", linewidths=0.8)
    axes[1, 0].set_title("mean of heads", fontsize=9)

    share_text = f"{maps.share:.0%} of mass"
    for head in range(heads):
        row = 2 * (head // columns)
        column = 1 + head % columns
        axes[row, column].imshow(blend_heatmap(pixels, maps.image_maps[head]))
        axes[row, column].set_title(f"head {head}", fontsize=9)
        axes[row + 1, column].imshow(dim_outside_mask(pixels, maps.image_masks[head]))
        axes[row + 1, column].set_title(f"head {head}: {share_text}", fontsize=9)
    for axis in axes.flat:
        if not axis.images:
            axis.set_visible(False)

    plan = maps.plan
    figure.suptitle(
        f"{title}\nimage {plan.image_size[1]}x{plan.image_size[0]} px, model input "
        f"{plan.input_size[1]}x{plan.input_size[0]}, {plan.grid[1]}x{plan.grid[0]} patches",
        fontsize=10,
    )
    return figure


def list_image_files(paths: Sequence[str | Path]) -> list[Path]:
    """Expand files and folders (their images, not recursive, sorted) into image paths.

    Raises:
        FileNotFoundError: A path does not exist, or a folder contains no image files.
    """
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(
                    f"no image files ({', '.join(IMAGE_SUFFIXES)}) found in folder {path}"
                )
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(f"image not found: {path}")
    return files


def unique_output_path(out_dir: Path, stem: str, suffix: str, used: set[Path]) -> Path:
    """Return ``out_dir/<stem><suffix>``, adding ``-2``, ``-3``... if that path is taken."""
    candidate = out_dir / f"{stem}{suffix}"
    counter = 2
    while candidate in used:
        candidate = out_dir / f"{stem}-{counter}{suffix}"
        counter += 1
    used.add(candidate)
    return candidate


def run_attention(
    checkpoint: str | Path,
    images: Sequence[str | Path],
    out_dir: str | Path,
    *,
    share: float = 0.6,
    max_size: int | None = 1024,
    fit: FitMode = "resize",
    arch: str | None = None,
    num_heads: int | None = None,
    which: str = "teacher",
    trust_pickle: bool = False,
    device: str = "cpu",
    dpi: int = 100,
) -> list[Path]:
    """Write one attention figure per image to ``out_dir``; returns the written paths.

    Every image is read before the backbone is loaded, so an unreadable file fails fast. An
    unreadable image found in a folder is skipped with a warning instead, so one bad file does
    not stop a folder of figures.

    Raises:
        FileNotFoundError: An image or the checkpoint is missing, or no image in the given
            folders is readable.
        ImageDecodeError: An image named directly cannot be decoded.
    """
    from cytofm.models.loading import load_backbone

    out_dir = Path(out_dir)
    named = {Path(path) for path in images if not Path(path).is_dir()}
    sources = []
    for path in list_image_files(images):
        try:
            sources.append((path, load_rgb(path)))
        except ImageDecodeError as error:
            if path in named:
                raise
            logger.warning("skipping unreadable image %s: %s", path, error.reason)
    if not sources:
        raise FileNotFoundError(f"no readable image in {', '.join(map(str, images))}")
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    backbone = load_backbone(
        checkpoint,
        arch=arch,
        num_heads=num_heads,
        which=which,
        trust_pickle=trust_pickle,
        device=device,
        resize=False,
    )

    written: list[Path] = []
    used: set[Path] = set()
    for path, image in sources:
        maps = compute_attention_maps(
            backbone.model,
            backbone.transform,
            image,
            share=share,
            max_size=max_size,
            fit=fit,
            device=device,
        )
        figure = draw_attention_grid(image, maps, title=f"{path.name} - {checkpoint.name}")
        target = unique_output_path(out_dir, path.stem, "_attention.png", used)
        written.append(save_figure(figure, target, dpi=dpi))
    return written
