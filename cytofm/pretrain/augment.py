"""Multi-crop augmentation for DINO/iBOT pretraining on cytology images.

Each view goes through: random resized crop (cropping and resizing in one PIL call), a random
horizontal flip and a random multiple of 90 degrees of rotation (cells have no preferred
orientation), conversion to a float tensor once, then in torch on the small crop: stain jitter
in haematoxylin-eosin-DAB space, colour jitter, grayscale, Gaussian blur, solarization and
mean/std normalisation. The probabilities per view follow DINO and iBOT: blur always on the
first global crop, with p=0.1 on the others and p=0.5 on local crops, and solarization with
p=0.2 on the global crops after the first.

All randomness comes from Python's global ``random`` module. The data layer seeds ``random``,
numpy and torch per sample, so the views are a pure function of that seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image

from cytofm.config import ConfigError

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

_INTERPOLATION = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_ROTATIONS = (
    None,
    Image.Transpose.ROTATE_90,
    Image.Transpose.ROTATE_180,
    Image.Transpose.ROTATE_270,
)


@dataclass
class MultiCropConfig:
    """Settings of the multi-crop augmentation. Defaults follow the iBOT ViT-B recipe.

    Attributes:
        global_crops_number: Global crops per image; the teacher sees these.
        global_crop_size: Side of a global crop in pixels.
        global_crops_scale: Range of the crop area as a fraction of the image area.
        local_crops_number: Local crops per image (student only).
        local_crop_size: Side of a local crop in pixels.
        local_crops_scale: Area range of local crops.
        crop_aspect_ratio: Range of the crop's width/height before resizing, log-uniform.
        interpolation: Resampling filter of the resize.
        flip_p: Probability of a horizontal flip.
        rotate90: Rotate each view by a uniformly drawn multiple of 90 degrees.
        stain_p: Probability of the stain jitter in HED space.
        stain_scale: Range of the per-stain factor on the stain concentrations.
        stain_shift: Range of the per-stain offset, in natural-log optical-density units.
        color_jitter_p: Probability of the colour jitter.
        brightness: Brightness factor drawn from ``[1 - brightness, 1 + brightness]``.
        contrast: Contrast factor drawn from ``[1 - contrast, 1 + contrast]``.
        saturation: Saturation factor drawn from ``[1 - saturation, 1 + saturation]``.
        hue: Hue shift drawn from ``[-hue, hue]`` (fraction of the hue circle, at most 0.5).
        grayscale_p: Probability of converting to grayscale.
        blur_p_first_global: Gaussian-blur probability of the first global crop.
        blur_p_other_globals: Gaussian-blur probability of the other global crops.
        blur_p_local: Gaussian-blur probability of local crops.
        blur_sigma: Range of the blur's standard deviation in pixels of the resized view.
        solarize_p_first_global: Solarization probability of the first global crop.
        solarize_p_other_globals: Solarization probability of the other global crops.
        solarize_p_local: Solarization probability of local crops.
        solarize_threshold: Intensities at or above it (in [0, 1]) are inverted.
        mean: Per-channel mean subtracted after the augmentation (ImageNet by default).
        std: Per-channel standard deviation divided out after the augmentation.
    """

    global_crops_number: int = 2
    global_crop_size: int = 224
    global_crops_scale: tuple[float, float] = (0.32, 1.0)
    local_crops_number: int = 10
    local_crop_size: int = 96
    local_crops_scale: tuple[float, float] = (0.05, 0.32)
    crop_aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    flip_p: float = 0.5
    rotate90: bool = True
    stain_p: float = 0.5
    stain_scale: tuple[float, float] = (0.95, 1.05)
    stain_shift: tuple[float, float] = (-0.05, 0.05)
    color_jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p_first_global: float = 1.0
    blur_p_other_globals: float = 0.1
    blur_p_local: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p_first_global: float = 0.0
    solarize_p_other_globals: float = 0.2
    solarize_p_local: float = 0.0
    solarize_threshold: float = 0.5
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if self.global_crops_number < 1 or self.local_crops_number < 0:
            raise ConfigError(
                f"need global_crops_number >= 1 and local_crops_number >= 0, got "
                f"{self.global_crops_number} and {self.local_crops_number}"
            )
        if self.global_crop_size < 1 or self.local_crop_size < 1:
            raise ConfigError("crop sizes must be positive")
        for name in (
            "global_crops_scale",
            "local_crops_scale",
            "crop_aspect_ratio",
            "stain_scale",
            "stain_shift",
            "blur_sigma",
        ):
            low, high = getattr(self, name)
            if low > high:
                raise ConfigError(f"{name} must be (low, high) with low <= high, got {(low, high)}")
        for name in ("global_crops_scale", "local_crops_scale"):
            low, high = getattr(self, name)
            if not 0.0 < low <= high <= 1.0:
                raise ConfigError(f"{name} must lie in (0, 1], got {(low, high)}")
        probabilities = [name for name in vars(self) if name.endswith("_p") or "_p_" in name]
        for name in probabilities:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(
                    f"{name} must be a probability in [0, 1], got {getattr(self, name)}"
                )
        if not 0.0 <= self.hue <= 0.5:
            raise ConfigError(f"hue must be in [0, 0.5], got {self.hue}")
        if min(self.std) <= 0:
            raise ConfigError(f"std must be positive, got {self.std}")


@dataclass(frozen=True)
class _ViewSettings:
    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float


class MultiCropAugmentation:
    """Turn one PIL image into global and local crops for iBOT.

    Args:
        config: Augmentation settings.

    Calling the object on an image returns ``global_crops_number`` tensors
    ``[3, global_crop_size, global_crop_size]`` followed by ``local_crops_number`` tensors
    ``[3, local_crop_size, local_crop_size]``, all float32 and normalised.
    """

    def __init__(self, config: MultiCropConfig) -> None:
        self.config = config
        self._mean = torch.tensor(config.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(config.std, dtype=torch.float32).view(3, 1, 1)
        first_global = _ViewSettings(
            config.global_crop_size,
            config.global_crops_scale,
            config.blur_p_first_global,
            config.solarize_p_first_global,
        )
        other_global = _ViewSettings(
            config.global_crop_size,
            config.global_crops_scale,
            config.blur_p_other_globals,
            config.solarize_p_other_globals,
        )
        local = _ViewSettings(
            config.local_crop_size,
            config.local_crops_scale,
            config.blur_p_local,
            config.solarize_p_local,
        )
        self._views = (
            [first_global]
            + [other_global] * (config.global_crops_number - 1)
            + [local] * config.local_crops_number
        )

    @property
    def num_views(self) -> int:
        """Number of tensors returned per image."""
        return len(self._views)

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        """Return the global crops, then the local crops, of ``img``."""
        if img.mode != "RGB":
            img = img.convert("RGB")
        return [self._augment_view(img, view) for view in self._views]

    def _augment_view(self, img: Image.Image, view: _ViewSettings) -> torch.Tensor:
        config = self.config
        crop = self._resized_crop(img, view)
        if random.random() < config.flip_p:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if config.rotate90:
            rotation = _ROTATIONS[random.randrange(4)]
            if rotation is not None:
                crop = crop.transpose(rotation)

        # [3, S, S] float32 in [0, 1]; the only conversion from PIL.
        x = torch.from_numpy(np.array(crop, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)

        if random.random() < config.stain_p:
            scale = [random.uniform(*config.stain_scale) for _ in range(3)]
            shift = [random.uniform(*config.stain_shift) for _ in range(3)]
            x = stain_jitter(x, scale, shift)
        if random.random() < config.color_jitter_p:
            x = self._color_jitter(x)
        if random.random() < config.grayscale_p:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if random.random() < view.blur_p:
            x = gaussian_blur(x, random.uniform(*config.blur_sigma))
        if random.random() < view.solarize_p:
            x = torch.where(x >= config.solarize_threshold, 1.0 - x, x)

        return (x - self._mean) / self._std

    def _resized_crop(self, img: Image.Image, view: _ViewSettings) -> Image.Image:
        left, top, width, height = random_resized_crop_box(
            img.width, img.height, view.scale, self.config.crop_aspect_ratio
        )
        # Cropping through ``box`` resamples only the cropped region, with antialiasing.
        return img.resize(
            (view.size, view.size),
            _INTERPOLATION[self.config.interpolation],
            box=(left, top, left + width, top + height),
        )

    def _color_jitter(self, x: torch.Tensor) -> torch.Tensor:
        config = self.config
        operations = [0, 1, 2, 3]
        random.shuffle(operations)
        for operation in operations:
            if operation == 0 and config.brightness > 0:
                factor = random.uniform(max(0.0, 1 - config.brightness), 1 + config.brightness)
                x = TF.adjust_brightness(x, factor)
            elif operation == 1 and config.contrast > 0:
                factor = random.uniform(max(0.0, 1 - config.contrast), 1 + config.contrast)
                x = TF.adjust_contrast(x, factor)
            elif operation == 2 and config.saturation > 0:
                factor = random.uniform(max(0.0, 1 - config.saturation), 1 + config.saturation)
                x = TF.adjust_saturation(x, factor)
            elif operation == 3 and config.hue > 0:
                x = TF.adjust_hue(x, random.uniform(-config.hue, config.hue))
        return x


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """Draw a crop box ``(left, top, crop_width, crop_height)`` with Python's ``random``.

    Same sampling as torchvision's ``RandomResizedCrop.get_params``: up to 10 tries of an area
    fraction uniform in ``scale`` and a log-uniform aspect ratio in ``ratio``, then a central
    crop clamped to ``ratio`` as the fallback.
    """
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * random.uniform(*scale)
        aspect = math.exp(random.uniform(log_low, log_high))
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = random.randint(0, height - crop_height)
            left = random.randint(0, width - crop_width)
            return left, top, crop_width, crop_height

    image_ratio = width / height
    if image_ratio < ratio[0]:
        crop_width, crop_height = width, int(round(width / ratio[0]))
    elif image_ratio > ratio[1]:
        crop_width, crop_height = int(round(height * ratio[1])), height
    else:
        crop_width, crop_height = width, height
    return (width - crop_width) // 2, (height - crop_height) // 2, crop_width, crop_height


def rgb_to_optical_density(rgb: torch.Tensor) -> torch.Tensor:
    """Convert RGB in [0, 1] to natural-log optical density, ``-ln((255 * rgb + 1) / 256)``.

    The +1 keeps black pixels finite (optical density at most ln 256).
    """
    return -torch.log((rgb * 255.0 + 1.0) / 256.0)


def optical_density_to_rgb(optical_density: torch.Tensor) -> torch.Tensor:
    """Invert ``rgb_to_optical_density`` and clamp to [0, 1]."""
    return ((torch.exp(-optical_density) * 256.0 - 1.0) / 255.0).clamp(0.0, 1.0)


def rgb_to_hed(rgb: torch.Tensor) -> torch.Tensor:
    """Colour-deconvolve ``[3, H, W]`` RGB in [0, 1] into HED stain concentrations.

    Concentrations are in natural-log optical-density units and can be negative, because
    unlike scikit-image they are not clipped, which keeps ``hed_to_rgb`` an exact inverse.
    """
    optical_density = rgb_to_optical_density(rgb)
    matrix = HED_FROM_RGB.to(rgb.dtype).T
    return torch.einsum("kc,chw->khw", matrix, optical_density)


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """Recompose ``[3, H, W]`` HED concentrations into RGB in [0, 1]."""
    matrix = RGB_FROM_HED.to(hed.dtype).T
    return optical_density_to_rgb(torch.einsum("ck,khw->chw", matrix, hed))


def stain_jitter(
    rgb: torch.Tensor,
    scale: list[float] | tuple[float, ...],
    shift: list[float] | tuple[float, ...],
) -> torch.Tensor:
    """Scale and shift each HED stain concentration of a ``[3, H, W]`` RGB image in [0, 1].

    Computes ``hed_to_rgb(rgb_to_hed(rgb) * scale + shift)``. The three linear steps are folded
    into one 3x3 matrix and an offset on the optical density, so the image is touched by one
    matrix product.
    """
    scale_matrix = torch.diag(torch.tensor(scale, dtype=torch.float64))
    shift_vector = torch.tensor(shift, dtype=torch.float64)
    # od' = R^T diag(scale) R^-T od + R^T shift, where the rows of R are the stain vectors.
    matrix = (RGB_FROM_HED.T @ scale_matrix @ HED_FROM_RGB.T).to(rgb.dtype)
    offset = (RGB_FROM_HED.T @ shift_vector).to(rgb.dtype).view(3, 1, 1)
    optical_density = rgb_to_optical_density(rgb)
    jittered = torch.einsum("ck,khw->chw", matrix, optical_density) + offset
    return optical_density_to_rgb(jittered)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur a ``[C, H, W]`` image with a separable Gaussian of standard deviation ``sigma``.

    The kernel reaches ``ceil(3 * sigma)`` pixels each side (fewer on very small images), with
    reflect padding at the borders.
    """
    channels, height, width = x.shape
    radius = min(max(1, math.ceil(3.0 * sigma)), height - 1, width - 1)
    if radius < 1:
        return x
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()

    # [1, C, H, W]; two depthwise 1-d convolutions.
    batch = F.pad(x.unsqueeze(0), (radius, radius, radius, radius), mode="reflect")
    horizontal = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    batch = F.conv2d(batch, horizontal, groups=channels)
    batch = F.conv2d(batch, vertical, groups=channels)
    return batch.squeeze(0)
