"""Multi-crop augmentation: view count and sizes, determinism, HED stain space, blur."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from cytofm.config import ConfigError, load_config
from cytofm.pretrain.augment import MultiCropAugmentation, MultiCropConfig, random_resized_crop_box

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def small_config(**overrides) -> MultiCropConfig:
    values = dict(
        global_crops_number=2,
        global_crop_size=32,
        local_crops_number=3,
        local_crop_size=16,
    )
    values.update(overrides)
    return MultiCropConfig(**values)


def identity_config(**overrides) -> MultiCropConfig:
    """Crops the whole square image and applies no random change unless overridden."""
    values = dict(
        global_crops_number=1,
        global_crop_size=40,
        global_crops_scale=(1.0, 1.0),
        local_crops_number=0,
        crop_aspect_ratio=(1.0, 1.0),
        flip_p=0.0,
        rotate90=False,
        stain_p=0.0,
        color_jitter_p=0.0,
        grayscale_p=0.0,
        blur_p_first_global=0.0,
        solarize_p_first_global=0.0,
    )
    values.update(overrides)
    return MultiCropConfig(**values)


def make_image(width: int = 60, height: int = 50, seed: int = 0) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_multicrop_view_count_and_sizes():
    augment = MultiCropAugmentation(small_config())
    seed_all(0)
    views = augment(make_image())
    assert augment.num_views == 5
    assert [tuple(view.shape) for view in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(view.dtype == torch.float32 for view in views)


def test_multicrop_deterministic_under_seed():
    augment = MultiCropAugmentation(small_config())
    image = make_image()
    seed_all(123)
    first = augment(image)
    seed_all(123)
    second = augment(image)
    seed_all(124)
    other = augment(image)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_multicrop_identity_settings_give_normalised_pixels():
    image = make_image(40, 40)
    seed_all(0)
    (view,) = MultiCropAugmentation(identity_config())(image)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(view, (pixels - MEAN) / STD)


def test_multicrop_flip_and_solarize():
    image = make_image(40, 40)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    seed_all(0)
    (flipped,) = MultiCropAugmentation(identity_config(flip_p=1.0))(image)
    torch.testing.assert_close(flipped, (pixels.flip(-1) - MEAN) / STD)

    (solarized,) = MultiCropAugmentation(identity_config(solarize_p_first_global=1.0))(image)
    expected = torch.where(pixels >= 0.5, 1 - pixels, pixels)
    torch.testing.assert_close(solarized, (expected - MEAN) / STD)


def test_multicrop_rotations_cover_all_quarter_turns():
    image = make_image(40, 40)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    rotations = [(torch.rot90(pixels, k, dims=(1, 2)) - MEAN) / STD for k in range(4)]
    augment = MultiCropAugmentation(identity_config(rotate90=True))
    seen = set()
    seed_all(0)
    for _ in range(40):
        (view,) = augment(image)
        matches = [k for k, rotated in enumerate(rotations) if torch.allclose(view, rotated)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == {0, 1, 2, 3}


def test_multicrop_grayscale_channels_equal():
    seed_all(0)
    (view,) = MultiCropAugmentation(identity_config(grayscale_p=1.0))(make_image(40, 40))
    pixels = view * STD + MEAN
    torch.testing.assert_close(pixels[0], pixels[1])
    torch.testing.assert_close(pixels[1], pixels[2])


def test_random_resized_crop_box_inside_image():
    random.seed(0)
    for _ in range(200):
        left, top, width, height = random_resized_crop_box(120, 80, (0.05, 0.4), (0.75, 4 / 3))
        assert left >= 0
        assert left + width <= 120
        assert top >= 0
        assert top + height <= 80
        area = width * height / (120 * 80)
        assert 0.03 < area < 0.45


@pytest.mark.parametrize(
    "overrides",
    [
        {"flip_p": 1.5},
        {"blur_p_local": -0.1},
        {"global_crops_scale": (0.5, 0.2)},
        {"local_crops_scale": (0.0, 0.3)},
        {"hue": 0.7},
        {"global_crops_number": 0},
    ],
)
def test_multicrop_config_rejects_invalid(overrides):
    with pytest.raises(ValueError):
        small_config(**overrides)


def test_multicrop_config_loads_from_yaml(tmp_path):
    path = tmp_path / "augment.yaml"
    path.write_text("local_crops_number: 6\nstain_shift: [-0.1, 0.1]\n")
    config = load_config(MultiCropConfig, path, ["global_crops_scale=[0.4, 1.0]"])
    assert config.local_crops_number == 6
    assert config.stain_shift == (-0.1, 0.1)
    assert config.global_crops_scale == (0.4, 1.0)
    with pytest.raises(ConfigError):
        load_config(MultiCropConfig, None, ["flip_p=2.0"])
