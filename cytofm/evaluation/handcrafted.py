"""A handcrafted colour and texture descriptor: the no-learning baseline for feature sets.

For RGB images in ``[0, 1]`` it concatenates, per image (86 values):

- colour: mean and standard deviation per channel (6), a 16-bin histogram per channel (48)
  and the mean optical density per channel, ``-log(I)``, which tracks stain uptake (3);
- darkness: the share of pixels with grey level below 0.3, 0.5 and 0.7, a proxy for
  nuclear area and chromatin (3);
- texture: an 8-bin histogram of Sobel gradient magnitude (8) and an 8-bin histogram of
  gradient orientation weighted by magnitude, per pixel (8). A 10-bin histogram of
  rotation-invariant uniform local binary patterns over the 8 neighbours at radius 1 (Ojala
  et al., TPAMI 2002) completes it (10).

Every value of an image depends on that image only, so batching does not change the result.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

DESCRIPTOR_DIM = 86
_COLOUR_BINS = 16
_GRADIENT_BINS = 8
# Grey-level weights of ITU-R BT.601.
_GREY = (0.299, 0.587, 0.114)
_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0
# Neighbour offsets (dy, dx) in circular order, for the local binary pattern.
_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))


def _uniform_pattern_table() -> Tensor:
    """Map each 8-bit pattern to its rotation-invariant uniform label (0..9)."""
    table = torch.empty(256, dtype=torch.long)
    for code in range(256):
        bits = [(code >> i) & 1 for i in range(8)]
        transitions = sum(bits[i] != bits[(i + 1) % 8] for i in range(8))
        table[code] = sum(bits) if transitions <= 2 else 9
    return table


_LBP_TABLE = _uniform_pattern_table()


def _histogram(bins: Tensor, num_bins: int, weights: Tensor | None = None) -> Tensor:
    """Per-row histogram of integer bins ``[B, N]``, divided by ``N``.

    Without weights the bins sum to 1. With weights each bin is the mean weight per pixel,
    so a flat image has an orientation histogram near 0 instead of amplified noise.
    """
    values = torch.ones_like(bins, dtype=torch.float32) if weights is None else weights
    counts = torch.zeros(bins.shape[0], num_bins, dtype=torch.float32, device=bins.device)
    counts.scatter_add_(1, bins, values)
    return counts / bins.shape[1]


def _colour_features(images: Tensor) -> Tensor:
    batch, channels = images.shape[:2]
    pixels = images.reshape(batch, channels, -1)
    mean = pixels.mean(dim=2)
    std = pixels.std(dim=2, correction=0)
    bins = (pixels * _COLOUR_BINS).long().clamp(0, _COLOUR_BINS - 1)
    histograms = [_histogram(bins[:, channel], _COLOUR_BINS) for channel in range(channels)]
    density = -torch.log(pixels.clamp_min(1.0 / 255.0)).mean(dim=2)
    return torch.cat([mean, std, *histograms, density], dim=1)


def _texture_features(grey: Tensor) -> Tensor:
    batch = grey.shape[0]
    flat = grey.reshape(batch, -1)
    darkness = torch.stack([(flat < level).float().mean(dim=1) for level in (0.3, 0.5, 0.7)], 1)

    padded = F.pad(grey, (1, 1, 1, 1), mode="replicate")
    sobel_x = _SOBEL_X.to(grey)[None, None]
    gx = F.conv2d(padded, sobel_x).reshape(batch, -1)
    gy = F.conv2d(padded, sobel_x.transpose(-1, -2)).reshape(batch, -1)
    magnitude = torch.sqrt(gx * gx + gy * gy)
    # Sobel responses scaled by 1/8 stay below 0.71 for inputs in [0, 1]; bin up to 0.5.
    magnitude_bins = (magnitude / 0.5 * _GRADIENT_BINS).long().clamp(0, _GRADIENT_BINS - 1)
    angle = torch.atan2(gy, gx) % math.pi  # unsigned orientation in [0, pi)
    angle_bins = (angle / math.pi * _GRADIENT_BINS).long().clamp(0, _GRADIENT_BINS - 1)

    centre = padded[:, :, 1:-1, 1:-1]
    height, width = grey.shape[-2:]
    code = torch.zeros_like(centre, dtype=torch.long)
    for bit, (dy, dx) in enumerate(_NEIGHBOURS):
        neighbour = padded[:, :, 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
        code |= (neighbour >= centre).long() << bit
    patterns = _LBP_TABLE.to(code.device)[code].reshape(batch, -1)

    return torch.cat(
        [
            darkness,
            _histogram(magnitude_bins, _GRADIENT_BINS),
            _histogram(angle_bins, _GRADIENT_BINS, weights=magnitude),
            _histogram(patterns, 10),
        ],
        dim=1,
    )


def colour_texture_descriptor(images: Tensor) -> Tensor:
    """Describe RGB images ``[B, 3, H, W]`` in ``[0, 1]`` by ``[B, 86]`` colour and texture values.

    Raises:
        ValueError: the input is not a batch of 3-channel images of at least 3x3 pixels.
    """
    if images.ndim != 4 or images.shape[1] != 3 or min(images.shape[-2:]) < 3:
        raise ValueError(f"expected RGB images [B, 3, H, W] of at least 3x3, got {images.shape}")
    images = images.float()
    grey = (images * torch.tensor(_GREY, device=images.device)[None, :, None, None]).sum(1, True)
    features = torch.cat([_colour_features(images), _texture_features(grey)], dim=1)
    return features
