"""Colour operations on ``[3, H, W]`` float RGB tensors in [0, 1] for the augmentation.

- HED colour deconvolution and a stain jitter in haematoxylin-eosin-DAB space.
- Colour jitter (brightness, contrast, saturation, hue) folded into one affine colour map.
- A separable Gaussian blur.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# Ruifrok & Johnston (2001), "Quantification of histochemical staining by color
# deconvolution": optical-density vectors (R, G, B) of haematoxylin, eosin and DAB, one per row.
# The same values as ``skimage.color.rgb_from_hed``.
RGB_FROM_HED = torch.tensor(
    [
        [0.65, 0.70, 0.29],
        [0.07, 0.99, 0.11],
        [0.27, 0.57, 0.78],
    ],
    dtype=torch.float64,
)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)

# Luma weights of torchvision's rgb_to_grayscale (ITU-R 601 with 0.2989 for red).
LUMA = torch.tensor([0.2989, 0.587, 0.114], dtype=torch.float64)

# RGB to YIQ (NTSC). Hue rotation turns the (I, Q) chroma plane and keeps Y (luma).
_YIQ_FROM_RGB = torch.tensor(
    [
        [0.299, 0.587, 0.114],
        [0.595716, -0.274453, -0.321263],
        [0.211456, -0.522591, 0.311135],
    ],
    dtype=torch.float64,
)
_RGB_FROM_YIQ = torch.linalg.inv(_YIQ_FROM_RGB)

# numpy copies for the per-view 3x3 algebra, where torch's per-call overhead dominates.
_RGB_FROM_HED_NP = RGB_FROM_HED.numpy()
_HED_FROM_RGB_NP = HED_FROM_RGB.numpy()
_LUMA_NP = LUMA.numpy()
_YIQ_FROM_RGB_NP = _YIQ_FROM_RGB.numpy()
_RGB_FROM_YIQ_NP = _RGB_FROM_YIQ.numpy()

BRIGHTNESS, CONTRAST, SATURATION, HUE = "brightness", "contrast", "saturation", "hue"


def rgb_to_optical_density(rgb: torch.Tensor) -> torch.Tensor:
    """Convert RGB in [0, 1] to natural-log optical density, ``-ln((255 * rgb + 1) / 256)``.

    The +1 keeps black pixels finite (optical density at most ln 256).
    """
    return -torch.log((rgb * 255.0 + 1.0) / 256.0)


def optical_density_to_rgb(optical_density: torch.Tensor) -> torch.Tensor:
    """Invert ``rgb_to_optical_density`` and clamp to [0, 1]."""
    return ((torch.exp(-optical_density) * 256.0 - 1.0) / 255.0).clamp(0.0, 1.0)


def _apply_channel_matrix(matrix: torch.Tensor | np.ndarray, image: torch.Tensor) -> torch.Tensor:
    """Compute ``out[c] = sum_k matrix[c, k] * image[k]`` for a ``[3, H, W]`` image."""
    channels, height, width = image.shape
    matrix = torch.as_tensor(matrix).to(image.dtype)
    return (matrix @ image.reshape(channels, -1)).view(channels, height, width)


def rgb_to_hed(rgb: torch.Tensor) -> torch.Tensor:
    """Colour-deconvolve ``[3, H, W]`` RGB in [0, 1] into HED stain concentrations.

    Concentrations are in natural-log optical-density units and can be negative. Unlike
    scikit-image they are not clipped, which keeps ``hed_to_rgb`` an exact inverse.
    """
    return _apply_channel_matrix(HED_FROM_RGB.T, rgb_to_optical_density(rgb))


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """Recompose ``[3, H, W]`` HED concentrations into RGB in [0, 1]."""
    return optical_density_to_rgb(_apply_channel_matrix(RGB_FROM_HED.T, hed))


def stain_jitter(rgb: torch.Tensor, scale: Sequence[float], shift: Sequence[float]) -> torch.Tensor:
    """Scale and shift each HED stain concentration of a ``[3, H, W]`` RGB image in [0, 1].

    Computes ``hed_to_rgb(rgb_to_hed(rgb) * scale + shift)``. The three linear steps are folded
    into one 3x3 matrix and an offset on the optical density, so the image goes through one
    matrix product between the logarithm and the exponential.
    """
    # od' = R^T diag(scale) R^-T od + R^T shift, where the rows of R are the stain vectors.
    matrix = _RGB_FROM_HED_NP.T @ np.diag(np.asarray(scale, dtype=np.float64)) @ _HED_FROM_RGB_NP.T
    offset = _RGB_FROM_HED_NP.T @ np.asarray(shift, dtype=np.float64)
    offset = torch.from_numpy(offset).to(rgb.dtype).view(3, 1, 1)
    jittered = _apply_channel_matrix(matrix, rgb_to_optical_density(rgb)) + offset
    return optical_density_to_rgb(jittered)


def hue_rotation_matrix(hue: float) -> np.ndarray:
    """Return the float64 3x3 RGB matrix that turns the hue by ``hue`` turns (0.5 = 180°).

    The rotation acts on the chroma plane of YIQ, so luma is unchanged.
    """
    angle = 2.0 * math.pi * hue
    cos, sin = math.cos(angle), math.sin(angle)
    rotation = np.array([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
    return _RGB_FROM_YIQ_NP @ rotation @ _YIQ_FROM_RGB_NP


def color_jitter_affine(
    operations: Sequence[tuple[str, float]], channel_mean: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a sequence of colour-jitter operations into one affine map ``x -> M x + b``.

    Each operation is ``(name, value)``, applied in the given order:

    - ``brightness``: multiply by the factor (torchvision ``adjust_brightness``).
    - ``contrast``: blend with the mean luma of the image (``adjust_contrast``).
    - ``saturation``: blend with the per-pixel luma (``adjust_saturation``).
    - ``hue``: rotate the hue by ``value`` turns in YIQ space.

    NOTE: this differs from torchvision's ``ColorJitter`` in two ways. Values are clamped to
    [0, 1] once at the end instead of after each operation, and hue turns in YIQ instead of
    being shifted in HSV. Without clamping, the first three operations equal torchvision's.
    The jitter becomes one 3x3 matrix product per pixel: on one CPU core, all four operations
    took about a twelfth of the time of torchvision's on a 224 px crop, most of which went
    into torchvision's HSV round trip.

    Args:
        operations: Operations in order of application.
        channel_mean: ``[3]`` per-channel mean of the input image, used by ``contrast``.

    Returns:
        ``(matrix [3, 3], offset [3])`` in float64.
    """
    matrix = np.eye(3)
    offset = np.zeros(3)
    mean = channel_mean.detach().cpu().double().numpy()
    for name, value in operations:
        step_offset = np.zeros(3)
        if name == BRIGHTNESS:
            step_matrix = value * np.eye(3)
        elif name == CONTRAST:
            # The mean luma of the current image follows from the input's channel means.
            current_luma = float(_LUMA_NP @ (matrix @ mean + offset))
            step_matrix = value * np.eye(3)
            step_offset = np.full(3, (1.0 - value) * current_luma)
        elif name == SATURATION:
            step_matrix = value * np.eye(3) + (1.0 - value) * np.outer(np.ones(3), _LUMA_NP)
        elif name == HUE:
            step_matrix = hue_rotation_matrix(value)
        else:
            raise ValueError(f"unknown colour-jitter operation {name!r}")
        matrix = step_matrix @ matrix
        offset = step_matrix @ offset + step_offset
    return torch.from_numpy(matrix), torch.from_numpy(offset)


def apply_color_affine(
    image: torch.Tensor, matrix: torch.Tensor, offset: torch.Tensor
) -> torch.Tensor:
    """Apply ``x -> clamp(M x + b, 0, 1)`` per pixel to a ``[3, H, W]`` image."""
    result = _apply_channel_matrix(matrix, image)
    return result.add_(offset.to(image.dtype).view(3, 1, 1)).clamp_(0.0, 1.0)


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur a ``[C, H, W]`` image with a separable Gaussian of standard deviation ``sigma``.

    The kernel reaches ``ceil(3 * sigma)`` pixels each side (fewer on very small images), with
    reflect padding at the borders. Each pass is a weighted sum of shifted views of the padded
    image. On one CPU core this took about a quarter of the time of a depthwise ``conv2d`` on a
    224 px crop and half on a 96 px crop (median of 15 runs at sigma 1.5).
    """
    channels, height, width = image.shape
    radius = min(max(1, math.ceil(3.0 * sigma)), height - 1, width - 1)
    if radius < 1:
        return image
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weights = (kernel / kernel.sum()).tolist()

    padded = F.pad(image.unsqueeze(0), (radius, radius, radius, radius), mode="reflect")[0]
    # Horizontal pass: [C, H + 2r, W].
    rows = padded[:, :, :width] * weights[0]
    for shift in range(1, 2 * radius + 1):
        rows.add_(padded[:, :, shift : shift + width], alpha=weights[shift])
    # Vertical pass: [C, H, W].
    result = rows[:, :height] * weights[0]
    for shift in range(1, 2 * radius + 1):
        result.add_(rows[:, shift : shift + height], alpha=weights[shift])
    return result
