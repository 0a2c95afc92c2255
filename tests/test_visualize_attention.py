"""Attention maps: CLS-to-patch normalisation, mass thresholding, geometry back to the image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cytofm.data.decode import ImageDecodeError
from cytofm.models.loading import build_transform
from cytofm.visualize.attention import (
    cls_patch_attention,
    compute_attention_maps,
    mass_threshold_mask,
    run_attention,
)
from cytofm.visualize.drawing import blend_heatmap, dim_outside_mask
from cytofm.visualize.images import (
    plan_model_input,
    prepare_input,
    upsample_to_image,
)
from tests.visualize_fixtures import (
    TINY_HEADS,
    tiny_model,
    write_noise_image,
    write_tiny_checkpoint,
)

TRANSFORM = build_transform(None)


def noise_image(height: int, width: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_cls_patch_attention_known_values():
    # One head, CLS + 1 register + a 2x2 grid; the CLS row puts 0.5 on the prefix tokens.
    attention = np.zeros((1, 1, 6, 6))
    attention[0, 0, 0] = [0.3, 0.2, 0.1, 0.1, 0.2, 0.1]
    maps = cls_patch_attention(attention, num_prefix_tokens=2, grid=(2, 2))
    expected = np.array([[0.2, 0.2], [0.4, 0.2]])
    assert maps.shape == (1, 1, 2, 2)
    np.testing.assert_allclose(maps[0, 0], expected)


def test_cls_patch_attention_rejects_wrong_grid():
    attention = np.full((1, 1, 5, 5), 0.2)
    with pytest.raises(ValueError, match="2x3 patch grid"):
        cls_patch_attention(attention, num_prefix_tokens=1, grid=(2, 3))


def test_head_maps_sum_to_one_before_upsampling():
    model = tiny_model(reg_tokens=1)
    image = noise_image(40, 56)
    maps = compute_attention_maps(model, TRANSFORM, image, max_size=None)
    assert maps.grid_maps.shape == (TINY_HEADS, 5, 7)
    np.testing.assert_allclose(maps.grid_maps.sum(axis=(1, 2)), 1.0, atol=1e-6)

    # Independent path: the model's attention row of CLS, registers dropped, renormalised.
    with torch.no_grad():
        _, attention = model.forward_with_attention(TRANSFORM(image).unsqueeze(0))
    for head in range(TINY_HEADS):
        patch_row = attention[0, head, 0, 2:].double().numpy()
        expected = (patch_row / patch_row.sum()).reshape(5, 7)
        np.testing.assert_allclose(maps.grid_maps[head], expected, rtol=1e-6)


def test_mass_threshold_mask_hand_example():
    weights = np.array([[0.1, 0.5], [0.3, 0.1]])
    cases = {
        0.4: [[0, 1], [0, 0]],
        0.5: [[0, 1], [0, 0]],
        0.6: [[0, 1], [1, 0]],
        0.8: [[0, 1], [1, 0]],
    }
    for share, expected in cases.items():
        mask = mass_threshold_mask(weights, share)
        np.testing.assert_array_equal(mask, np.array(expected, dtype=bool), err_msg=f"{share}")


@pytest.mark.parametrize("share", [0.1, 0.45, 0.6, 0.9, 1.0])
def test_mass_threshold_mask_keeps_share(share):
    maps = np.random.default_rng(1).dirichlet(np.full(35, 0.5), size=4).reshape(4, 5, 7)
    masks = mass_threshold_mask(maps, share)
    for weights, mask in zip(maps, masks):
        kept = weights[mask]
        dropped = weights[~mask]
        assert kept.sum() >= share - 1e-9
        assert kept.sum() - kept.min() < share
        if dropped.size:
            assert kept.min() >= dropped.max()


def test_mass_threshold_mask_rejects_bad_share():
    with pytest.raises(ValueError, match="share"):
        mass_threshold_mask(np.ones((2, 2)) / 4, 0.0)


@pytest.mark.parametrize(
    ("image_size", "patch", "max_size", "fit", "content", "input_size"),
    [
        ((37, 61), 8, None, "resize", (40, 64), (40, 64)),
        ((37, 61), 8, None, "pad", (37, 61), (40, 64)),
        ((37, 61), 8, 30, "resize", (16, 32), (16, 32)),
        ((37, 61), 8, 30, "pad", (18, 30), (24, 32)),
        ((3, 3), 8, None, "resize", (8, 8), (8, 8)),
        ((64, 64), 16, None, "resize", (64, 64), (64, 64)),
    ],
)
def test_plan_model_input(image_size, patch, max_size, fit, content, input_size):
    plan = plan_model_input(image_size, patch, max_size=max_size, fit=fit)
    assert plan.content_size == content
    assert plan.input_size == input_size
    assert plan.grid == (input_size[0] // patch, input_size[1] // patch)


def test_prepare_input_pads_with_zeros():
    plan = plan_model_input((30, 45), 8, fit="pad")
    batch = prepare_input(noise_image(30, 45), plan, TRANSFORM)
    assert batch.shape == (1, 3, 32, 48)
    assert torch.all(batch[..., 30:, :] == 0)
    assert torch.all(batch[..., :, 45:] == 0)
    assert torch.any(batch[..., :30, :45] != 0)


@pytest.mark.parametrize(
    ("image_size", "max_size", "fit", "block"),
    [
        ((32, 48), None, "resize", (slice(8, 16), slice(24, 32))),
        ((30, 45), None, "pad", (slice(8, 16), slice(24, 32))),
        ((64, 96), 48, "resize", (slice(16, 32), slice(48, 64))),
    ],
)
def test_upsampled_patch_lands_on_its_pixels(image_size, max_size, fit, block):
    plan = plan_model_input(image_size, 8, max_size=max_size, fit=fit)
    grid = np.zeros(plan.grid)
    grid[1, 3] = 1.0
    upsampled = upsample_to_image(grid, plan, mode="nearest")
    expected = np.zeros(image_size)
    expected[block] = 1.0
    assert upsampled.shape == image_size
    np.testing.assert_array_equal(upsampled, expected)


@pytest.mark.parametrize("image_size", [(48, 48), (37, 61), (61, 37), (100, 30)])
@pytest.mark.parametrize("fit", ["resize", "pad"])
def test_overlay_has_source_image_size(image_size, fit):
    model = tiny_model()
    image = noise_image(*image_size)
    maps = compute_attention_maps(model, TRANSFORM, image, max_size=40, fit=fit, share=0.5)
    assert maps.image_maps.shape == (TINY_HEADS, *image_size)
    assert maps.image_masks.shape == (TINY_HEADS, *image_size)
    pixels = np.asarray(image)
    assert blend_heatmap(pixels, maps.image_maps[0]).shape == (*image_size, 3)
    assert dim_outside_mask(pixels, maps.image_masks[0]).shape == (*image_size, 3)


def test_blend_heatmap_keeps_image_where_nan():
    image = np.full((4, 4, 3), 100, dtype=np.uint8)
    heat = np.full((4, 4), np.nan)
    heat[0, 0] = 1.0
    blended = blend_heatmap(image, heat, alpha=0.5)
    np.testing.assert_array_equal(blended[1:, :], image[1:, :])
    assert not np.array_equal(blended[0, 0], image[0, 0])


def test_run_attention_writes_one_figure_per_image(tmp_path):
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.pt", reg_tokens=1)
    square = write_noise_image(tmp_path / "square.png", 32, 32)
    wide = write_noise_image(tmp_path / "wide.png", 27, 50, seed=1)
    written = run_attention(checkpoint, [square, wide], tmp_path / "out", max_size=None)
    assert [path.name for path in written] == ["square_attention.png", "wide_attention.png"]
    for path in written:
        with Image.open(path) as figure:
            assert figure.format == "PNG"


def test_run_attention_bad_image_fails_before_loading(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    # The checkpoint does not exist: the image error must come first.
    with pytest.raises(ImageDecodeError, match="broken.png"):
        run_attention(tmp_path / "missing.pt", [broken], tmp_path / "out")


def test_run_attention_skips_bad_image_in_folder(tmp_path, caplog):
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.pt")
    folder = tmp_path / "fields"
    folder.mkdir()
    write_noise_image(folder / "a.png", 32, 32)
    (folder / "b.png").write_bytes(b"not an image")
    write_noise_image(folder / "c.png", 32, 32, seed=2)
    written = run_attention(checkpoint, [folder], tmp_path / "out", max_size=None)
    assert [path.name for path in written] == ["a_attention.png", "c_attention.png"]
    assert "skipping unreadable image" in caplog.text
    assert "b.png" in caplog.text

    (folder / "a.png").unlink()
    (folder / "c.png").unlink()
    with pytest.raises(FileNotFoundError, match="no readable image"):
        run_attention(checkpoint, [folder], tmp_path / "out2")
