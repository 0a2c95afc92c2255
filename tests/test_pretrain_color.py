"""Colour operations: HED stain space, folded colour jitter, Gaussian blur."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from cytofm.pretrain.color import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    LUMA,
    RGB_FROM_HED,
    SATURATION,
    apply_color_affine,
    color_jitter_affine,
    gaussian_blur,
    hed_to_rgb,
    hue_rotation_matrix,
    optical_density_to_rgb,
    rgb_to_hed,
    stain_jitter,
)


def test_hed_round_trip():
    generator = torch.Generator().manual_seed(0)
    rgb = torch.rand(3, 16, 16, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(hed_to_rgb(rgb_to_hed(rgb)), rgb, rtol=0, atol=1e-10)
    rgb32 = rgb.float()
    torch.testing.assert_close(hed_to_rgb(rgb_to_hed(rgb32)), rgb32, rtol=0, atol=1e-5)


def test_rgb_to_hed_recovers_pure_haematoxylin():
    # Optical density of 0.8 units of haematoxylin only, as RGB.
    optical_density = (0.8 * RGB_FROM_HED[0]).view(3, 1, 1).expand(3, 2, 2)
    rgb = optical_density_to_rgb(optical_density)
    hed = rgb_to_hed(rgb)
    expected = torch.tensor([0.8, 0.0, 0.0], dtype=torch.float64).view(3, 1, 1).expand(3, 2, 2)
    torch.testing.assert_close(hed, expected, rtol=0, atol=1e-10)


def test_stain_jitter_equals_explicit_chain():
    generator = torch.Generator().manual_seed(1)
    rgb = torch.rand(3, 8, 8, generator=generator, dtype=torch.float64)
    scale, shift = [1.1, 0.9, 1.05], [0.02, -0.03, 0.01]
    hed = rgb_to_hed(rgb)
    scale_t = torch.tensor(scale, dtype=torch.float64).view(3, 1, 1)
    shift_t = torch.tensor(shift, dtype=torch.float64).view(3, 1, 1)
    jittered_hed = hed * scale_t + shift_t
    expected = hed_to_rgb(jittered_hed)
    torch.testing.assert_close(stain_jitter(rgb, scale, shift), expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(stain_jitter(rgb, [1, 1, 1], [0, 0, 0]), rgb, rtol=0, atol=1e-10)


def test_gaussian_blur_matches_torchvision():
    generator = torch.Generator().manual_seed(2)
    image = torch.rand(3, 24, 24, generator=generator)
    sigma = 1.3
    radius = 4  # ceil(3 * 1.3)
    expected = TF.gaussian_blur(image, kernel_size=[2 * radius + 1] * 2, sigma=[sigma, sigma])
    torch.testing.assert_close(gaussian_blur(image, sigma), expected, rtol=1e-5, atol=1e-5)
    constant = torch.full((3, 10, 10), 0.3)
    torch.testing.assert_close(gaussian_blur(constant, 2.0), constant)


def mid_range_image(seed: int) -> torch.Tensor:
    """Float64 image in [0.35, 0.65], so mild jitter never needs clamping."""
    generator = torch.Generator().manual_seed(seed)
    return 0.35 + 0.3 * torch.rand(3, 12, 12, generator=generator, dtype=torch.float64)


def apply_operations(image: torch.Tensor, operations) -> torch.Tensor:
    matrix, offset = color_jitter_affine(operations, image.mean(dim=(1, 2)))
    return apply_color_affine(image, matrix, offset)


@pytest.mark.parametrize(
    "operations",
    [
        [(BRIGHTNESS, 1.2)],
        [(CONTRAST, 0.7)],
        [(SATURATION, 1.3)],
        [(SATURATION, 0.6), (BRIGHTNESS, 0.9), (CONTRAST, 1.2)],
        [(CONTRAST, 1.25), (SATURATION, 0.8), (BRIGHTNESS, 1.1)],
    ],
)
def test_color_jitter_matches_torchvision_without_clamping(operations):
    image = mid_range_image(0)
    expected = image
    for name, value in operations:
        adjust = {
            BRIGHTNESS: TF.adjust_brightness,
            CONTRAST: TF.adjust_contrast,
            SATURATION: TF.adjust_saturation,
        }[name]
        expected = adjust(expected, value)
    torch.testing.assert_close(apply_operations(image, operations), expected, rtol=0, atol=1e-6)


def test_color_jitter_clamps_to_unit_range():
    image = mid_range_image(1)
    bright = apply_operations(image, [(BRIGHTNESS, 3.0)])
    assert bright.max() == 1.0
    assert bright.min() >= 0.0
    assert torch.equal(bright, (image * 3.0).clamp(0, 1))


def test_hue_rotation_keeps_luma_and_gray():
    image = mid_range_image(2)
    rotated = apply_operations(image, [(HUE, 0.1)])
    luma = torch.einsum("c,chw->hw", LUMA, image)
    torch.testing.assert_close(torch.einsum("c,chw->hw", LUMA, rotated), luma, rtol=0, atol=2e-4)
    assert not torch.allclose(rotated, image, atol=1e-3)
    gray = torch.full((3, 4, 4), 0.4, dtype=torch.float64)
    torch.testing.assert_close(apply_operations(gray, [(HUE, 0.3)]), gray, rtol=0, atol=1e-4)


def test_hue_rotations_compose():
    half_turns = hue_rotation_matrix(0.25) @ hue_rotation_matrix(0.25)
    torch.testing.assert_close(
        torch.from_numpy(half_turns), torch.from_numpy(hue_rotation_matrix(0.5)), rtol=0, atol=1e-9
    )
    full = hue_rotation_matrix(0.5) @ hue_rotation_matrix(0.5)
    torch.testing.assert_close(
        torch.from_numpy(full), torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-9
    )


def test_color_jitter_rejects_unknown_operation():
    with pytest.raises(ValueError, match="gamma"):
        color_jitter_affine([("gamma", 1.1)], torch.zeros(3))
