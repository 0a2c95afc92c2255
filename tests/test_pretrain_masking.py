"""Block and random patch masks: ratios, shapes, determinism, block structure."""

from __future__ import annotations

import pytest
import torch

from cytofm.pretrain.masking import MaskingConfig, generate_masks, masked_token_index

GRID = 14


def draw(config: MaskingConfig, batch_size: int = 256, seed: int = 0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return generate_masks(batch_size, GRID, GRID, config, generator, **kwargs)


def neighbour_fraction(masks: torch.Tensor) -> float:
    """Mean share of masked 4-neighbours among the in-grid neighbours of masked patches."""
    grid = masks.view(-1, GRID, GRID).float()
    padded = torch.nn.functional.pad(grid, (1, 1, 1, 1))
    neighbours = (
        padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    )
    inside = torch.nn.functional.pad(torch.ones_like(grid), (1, 1, 1, 1))
    in_grid = (
        inside[:, :-2, 1:-1] + inside[:, 2:, 1:-1] + inside[:, 1:-1, :-2] + inside[:, 1:-1, 2:]
    )
    selected = grid > 0
    return float((neighbours[selected] / in_grid[selected]).mean())


def test_masks_shape_and_dtype():
    masks, ratios = draw(MaskingConfig(), batch_size=5)
    assert masks.shape == (5, GRID * GRID)
    assert masks.dtype == torch.bool
    assert ratios.shape == (5,)


def test_ratios_follow_configured_choices():
    _, ratios = draw(MaskingConfig(ratios=[0.0, 0.3], ratio_variations=[0.0, 0.2]), 2000)
    zero = ratios == 0
    assert 0.4 < zero.float().mean() < 0.6
    nonzero = ratios[~zero]
    assert nonzero.min() >= 0.1
    assert nonzero.max() <= 0.5
    # Uniform on [0.1, 0.5]: the mean is 0.3 and both halves are populated.
    assert abs(float(nonzero.mean()) - 0.3) < 0.02
    assert (nonzero < 0.2).any()
    assert (nonzero > 0.4).any()


def test_block_masks_never_exceed_target():
    masks, ratios = draw(MaskingConfig(), 500)
    counts = masks.sum(1)
    assert (counts <= ratios * GRID * GRID + 1e-4).all()
    assert (counts[ratios == 0] == 0).all()


def test_block_masks_reach_most_of_target():
    masks, ratios = draw(MaskingConfig(ratios=[0.4], ratio_variations=[0.1]), 500)
    reached = masks.sum(1).float() / (ratios * GRID * GRID)
    assert float(reached.mean()) > 0.9


def test_fill_to_target_hits_exact_count():
    config = MaskingConfig(ratios=[0.4], ratio_variations=[0.1], fill_to_target=True)
    masks, ratios = draw(config, 300)
    expected = torch.round(ratios.double() * GRID * GRID).long()
    assert torch.equal(masks.sum(1), expected)


def test_random_mode_exact_count():
    masks, ratios = draw(MaskingConfig(mode="random", ratios=[0.25], ratio_variations=[0.1]), 300)
    expected = (ratios.double() * GRID * GRID).long()
    assert torch.equal(masks.sum(1), expected)


def test_block_masks_are_clustered():
    block, _ = draw(MaskingConfig(ratios=[0.3], ratio_variations=[0.0]), 200)
    scattered, _ = draw(MaskingConfig(mode="random", ratios=[0.3], ratio_variations=[0.0]), 200)
    assert neighbour_fraction(block) > 0.6
    assert neighbour_fraction(scattered) < 0.4


def test_masks_deterministic_for_seed():
    config = MaskingConfig()
    first = draw(config, 64, seed=7)
    second = draw(config, 64, seed=7)
    other = draw(config, 64, seed=8)
    assert torch.equal(first.masks, second.masks)
    assert torch.equal(first.ratios, second.ratios)
    assert not torch.equal(first.masks, other.masks)


def test_masks_empty_before_start_epoch():
    config = MaskingConfig(ratios=[0.5], ratio_variations=[0.0], start_epoch=3)
    before, _ = draw(config, 16, epoch=2)
    after, _ = draw(config, 16, epoch=3)
    assert not before.any()
    assert after.any()


def test_masked_token_index_matches_loop():
    masks, _ = draw(MaskingConfig(ratios=[0.3], ratio_variations=[0.2]), 6)
    index, counts = masked_token_index(masks)
    expected = [b for b in range(6) for n in range(GRID * GRID) if masks[b, n]]
    assert index.tolist() == expected
    assert counts.tolist() == [int(row.sum()) for row in masks]
    tokens = torch.arange(6 * GRID * GRID).view(6, GRID * GRID)
    assert torch.equal(tokens[masks] // (GRID * GRID), index)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ratios": [0.3], "ratio_variations": [0.0, 0.1]},
        {"ratios": [0.1], "ratio_variations": [0.2]},
        {"ratios": [0.9], "ratio_variations": [0.2]},
        {"aspect_ratio": (2.0, 1.0)},
        {"min_patches_per_block": 0},
    ],
)
def test_masking_config_rejects_invalid(kwargs):
    with pytest.raises(ValueError):
        MaskingConfig(**kwargs)
