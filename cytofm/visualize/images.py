"""Planning how an image of any size is fed to a ViT, and mapping results back onto it.

A ViT takes inputs whose sides are multiples of its patch size. ``plan_model_input`` decides
how an image of arbitrary size gets there: optional downscaling to ``max_size``, then a resize
or a pad to a patch multiple. It records the geometry, so that ``upsample_to_image`` can draw
a patch-grid map back over the original image.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

FitMode = Literal["resize", "pad"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


@dataclass(frozen=True)
class InputPlan:
    """Geometry of one image on the model input; all sizes are (height, width) in pixels.

    Attributes:
        image_size: Size of the source image.
        content_size: Size the image is resized to inside the model input.
        input_size: Size of the model input, a multiple of ``patch_size`` on both sides. It
            equals ``content_size`` for ``fit="resize"``; for ``fit="pad"`` the extra rows
            and columns at the bottom and right are padding.
        patch_size: Patch side in pixels.
    """

    image_size: tuple[int, int]
    content_size: tuple[int, int]
    input_size: tuple[int, int]
    patch_size: int

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, columns) of the model input."""
        return self.input_size[0] // self.patch_size, self.input_size[1] // self.patch_size


def plan_model_input(
    image_size: tuple[int, int],
    patch_size: int,
    *,
    max_size: int | None = None,
    fit: FitMode = "resize",
) -> InputPlan:
    """Plan the model input for an image of ``image_size`` (height, width).

    Args:
        image_size: Source image (height, width) in pixels.
        patch_size: Patch side of the backbone.
        max_size: If set, images whose longer side exceeds it are first scaled down, keeping
            the aspect ratio, so that the longer side is ``max_size``.
        fit: ``resize`` scales the (possibly downscaled) image to the nearest multiple of the
            patch size on each side, so the aspect ratio changes by less than one patch.
            ``pad`` keeps the pixels and pads the bottom and right up to the next multiple.

    Raises:
        ValueError: An empty image, a non-positive patch size or ``max_size`` below one patch.
    """
    height, width = image_size
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if patch_size < 1:
        raise ValueError(f"patch size must be positive, got {patch_size}")
    if max_size is not None and max_size < patch_size:
        raise ValueError(f"max_size {max_size} is smaller than the patch size {patch_size}")
    if fit not in ("resize", "pad"):
        raise ValueError(f"fit must be 'resize' or 'pad', got {fit!r}")

    scale = 1.0
    if max_size is not None and max(height, width) > max_size:
        scale = max_size / max(height, width)
    scaled = (max(1, round(height * scale)), max(1, round(width * scale)))

    if fit == "resize":
        input_size = tuple(
            max(patch_size, round(side / patch_size) * patch_size) for side in scaled
        )
        return InputPlan(image_size, input_size, input_size, patch_size)
    input_size = tuple(math.ceil(side / patch_size) * patch_size for side in scaled)
    return InputPlan(image_size, scaled, input_size, patch_size)


def prepare_input(
    image: Image.Image,
    plan: InputPlan,
    transform: Callable[[Image.Image], torch.Tensor],
) -> torch.Tensor:
    """Resize, normalise and pad an image to the model input described by ``plan``.

    Args:
        image: RGB source image of size ``plan.image_size``.
        plan: Result of ``plan_model_input``.
        transform: The backbone's preprocessing without resizing (PIL image to normalised
            ``[3, H, W]`` tensor), e.g. ``load_backbone(..., resize=False).transform``.

    Returns:
        A batch of one, ``[1, 3, *plan.input_size]``. Padding is 0 after normalisation, i.e.
        the normalisation mean colour.
    """
    content_height, content_width = plan.content_size
    if (image.height, image.width) != (content_height, content_width):
        image = image.resize((content_width, content_height), Image.Resampling.BICUBIC)
    tensor = transform(image)
    pad_bottom = plan.input_size[0] - content_height
    pad_right = plan.input_size[1] - content_width
    if pad_bottom or pad_right:
        tensor = F.pad(tensor, (0, pad_right, 0, pad_bottom), value=0.0)
    return tensor.unsqueeze(0)


def upsample_to_image(
    maps: np.ndarray,
    plan: InputPlan,
    *,
    mode: Literal["nearest", "bilinear"] = "bilinear",
) -> np.ndarray:
    """Map patch-grid maps ``[..., rows, cols]`` onto the source image, ``[..., H, W]``.

    The grid is first scaled to the model input (each patch covers ``patch_size`` pixels),
    the padding is cropped away, and the rest is resized to ``plan.image_size``. Use
    ``nearest`` for masks and ``bilinear`` for smooth heatmaps.
    """
    maps = np.asarray(maps)
    if maps.shape[-2:] != plan.grid:
        raise ValueError(f"maps have grid {maps.shape[-2:]}, the plan expects {plan.grid}")
    leading = maps.shape[:-2]
    tensor = torch.from_numpy(maps.astype(np.float32)).reshape(1, -1, *plan.grid)
    align = None if mode == "nearest" else False

    tensor = F.interpolate(tensor, size=plan.input_size, mode=mode, align_corners=align)
    tensor = tensor[..., : plan.content_size[0], : plan.content_size[1]]
    if plan.content_size != plan.image_size:
        tensor = F.interpolate(tensor, size=plan.image_size, mode=mode, align_corners=align)
    return tensor.reshape(*leading, *plan.image_size).numpy()
