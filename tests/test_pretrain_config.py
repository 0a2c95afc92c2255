"""Checks of ``cytofm.pretrain.config.validate`` that must fail before a run folder exists."""

from __future__ import annotations

import pytest

from cytofm.config import ConfigError
from cytofm.pretrain.config import load_pretrain_config

TINY_MODEL = ["model.patch_size=8", "model.img_size=64", "model.embed_dim=32", "model.num_heads=2"]
TINY_CROPS = ["crops.global_crop_size=64", "crops.local_crop_size=32"]


def _load(*overrides: str):
    return load_pretrain_config(None, [*TINY_MODEL, *TINY_CROPS, *overrides])


def test_tiny_settings_valid():
    config = _load()
    assert config.model.img_size == 64
    assert config.crops.local_crop_size == 32


def test_img_size_not_multiple_of_patch():
    with pytest.raises(ConfigError) as error:
        _load("model.img_size=63")
    message = str(error.value)
    assert "model.img_size" in message
    assert "63" in message
    assert "model.patch_size (8)" in message
    assert "e.g. 64" in message


@pytest.mark.parametrize(
    ("key", "value", "suggestion"),
    [("crops.global_crop_size", 60, 64), ("crops.local_crop_size", 20, 24)],
)
def test_crop_size_not_multiple_of_patch(key, value, suggestion):
    with pytest.raises(ConfigError) as error:
        _load(f"{key}={value}")
    message = str(error.value)
    assert key in message
    assert f"got {value}" in message
    assert "model.patch_size (8)" in message
    assert f"e.g. {suggestion}" in message


def test_num_heads_not_dividing_embed_dim():
    with pytest.raises(ConfigError) as error:
        _load("model.num_heads=5")
    message = str(error.value)
    assert "model.num_heads" in message
    assert "got 5" in message
    assert "width 32 (model.embed_dim)" in message
    assert "e.g. 4" in message


def test_preset_heads_not_dividing_embed_dim():
    # vit_small has 6 heads, which do not divide a width of 32.
    with pytest.raises(ConfigError) as error:
        _load("model.arch=vit_small", "model.num_heads=null")
    message = str(error.value)
    assert "model.num_heads" in message
    assert "6 from vit_small" in message
    assert "e.g. 4" in message


def test_num_heads_not_dividing_preset_width():
    # vit_tiny is 192 wide, which 5 heads do not divide but 4 and 6 do.
    with pytest.raises(ConfigError) as error:
        _load("model.arch=vit_tiny", "model.embed_dim=null", "model.num_heads=5")
    message = str(error.value)
    assert "width 192 (vit_tiny)" in message
    assert "e.g. 4" in message


@pytest.mark.parametrize("value", [0, -0.1])
def test_student_temp_not_positive(value):
    with pytest.raises(ConfigError) as error:
        _load(f"loss.student_temp={value}")
    message = str(error.value)
    assert "loss.student_temp" in message
    assert f"got {value}" in message
    assert "0.1" in message


def test_teacher_temp_not_positive():
    with pytest.raises(ConfigError, match="schedule.teacher_temp must be positive, got 0.0"):
        _load("schedule.teacher_temp=0")


def _sources(source: str) -> str:
    return f"data.sources=[{{path: /data/x, {source}}}]"


@pytest.mark.parametrize(
    ("key", "value"),
    [("magnification", 0), ("magnification", -20), ("base_magnification", -40)],
)
def test_slide_magnification_not_positive(key, value):
    with pytest.raises(ConfigError) as error:
        _load(_sources(f"kind: slides, {key}: {value}"))
    message = str(error.value)
    assert f"data.sources[0].{key} must be positive or null" in message
    assert f"got {value}" in message


def test_slide_magnifications_valid():
    config = _load(_sources("kind: slides, magnification: 20, base_magnification: 40"))
    assert config.data.sources[0].magnification == 20
    assert config.data.sources[0].base_magnification == 40


@pytest.mark.parametrize(
    ("key", "value"),
    [("magnification", 20), ("base_magnification", 40), ("max_glass_fraction", 0.5)],
)
def test_slide_keys_on_image_source(key, value):
    with pytest.raises(ConfigError) as error:
        _load(_sources(f"{key}: {value}"))
    message = str(error.value)
    assert f"data.sources[0].{key} is set to {value}" in message
    assert "applies to slide sources only" in message
    assert "kind: images" in message
