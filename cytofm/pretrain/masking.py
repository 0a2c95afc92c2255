"""Patch masks for masked image modelling: blockwise (BEiT, iBOT) or uniformly random.

Each image draws its own mask ratio as iBOT's ``ImageFolderMask.get_pred_ratio`` does: one
value ``uniform(r - v, r + v)`` per entry of ``ratios``/``ratio_variations``, then one of those
values at random. iBOT ViT-B uses ratios ``[0, 0.3]`` with variations ``[0, 0.2]``, so about
half of the images are not masked and the other half mask 10-50% of their patches.

Block mode follows iBOT's loop, which iBOT took from BEiT's ``MaskingGenerator``. It places
rectangles of random area in ``[min_patches_per_block, remaining]`` and log-uniform aspect
ratio. A rectangle is accepted only when it adds at least one new patch and no more than the
number still to be masked.
Up to 10 tries are made per rectangle, and the loop stops once the target is reached or when
10 tries in a row add nothing. iBOT's default minimum area is ``(min(h, w) // 3) ** 2``. The
loop never overshoots, but it can stop short of the target. iBOT keeps such a mask as it is,
while ``fill_to_target=True`` here masks extra random patches to reach the exact count.

Random mode masks ``int(ratio * h * w)`` patches chosen uniformly, as iBOT's ``rand`` shape.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np
import torch

from cytofm.config import ConfigError

_TRIES_PER_BLOCK = 10


@dataclass
class MaskingConfig:
    """Settings of the patch masks.

    Attributes:
        mode: ``block`` for rectangles of patches, ``random`` for independent patches.
        ratios: Candidate mask ratios, one picked per image (iBOT's ``pred_ratio``).
        ratio_variations: Half-width of the uniform interval around each ratio (iBOT's
            ``pred_ratio_var``). Must have the same length as ``ratios``, with each value at most
            its ratio.
        aspect_ratio: Range of block height/width, sampled log-uniformly.
        min_patches_per_block: Smallest block area in patches; None uses iBOT's
            ``(min(h, w) // 3) ** 2``.
        fill_to_target: After placing blocks, mask random extra patches until the count equals
            the target exactly (iBOT does not).
        start_epoch: Epoch from which masking is on; earlier epochs get empty masks.
    """

    mode: Literal["block", "random"] = "block"
    ratios: list[float] = field(default_factory=lambda: [0.0, 0.3])
    ratio_variations: list[float] = field(default_factory=lambda: [0.0, 0.2])
    aspect_ratio: tuple[float, float] = (0.3, 1 / 0.3)
    min_patches_per_block: int | None = None
    fill_to_target: bool = False
    start_epoch: int = 0

    def __post_init__(self) -> None:
        if not self.ratios or len(self.ratios) != len(self.ratio_variations):
            raise ConfigError(
                f"masking ratios {self.ratios} and ratio_variations {self.ratio_variations} must "
                "be non-empty lists of equal length"
            )
        for ratio, variation in zip(self.ratios, self.ratio_variations):
            if not 0.0 <= variation <= ratio or ratio + variation > 1.0:
                raise ConfigError(
                    f"masking ratio {ratio} with variation {variation} must satisfy "
                    "0 <= variation <= ratio and ratio + variation <= 1"
                )
        low, high = self.aspect_ratio
        if not 0.0 < low <= high:
            raise ConfigError(
                f"masking aspect_ratio must be (low, high) with 0 < low <= high, "
                f"got {self.aspect_ratio}"
            )
        if self.min_patches_per_block is not None and self.min_patches_per_block < 1:
            raise ConfigError(
                f"min_patches_per_block must be at least 1 or null, got "
                f"{self.min_patches_per_block}"
            )


class GeneratedMasks(NamedTuple):
    """Masks of one batch and the ratio drawn for each image."""

    masks: torch.Tensor  # bool [B, grid_h * grid_w], True = masked
    ratios: torch.Tensor  # float32 [B], the drawn target ratios


def generate_masks(
    batch_size: int,
    grid_h: int,
    grid_w: int,
    config: MaskingConfig,
    generator: torch.Generator,
    epoch: int | None = None,
) -> GeneratedMasks:
    """Draw one patch mask per image.

    The result depends only on the state of ``generator``, which advances by one draw. For
    two global crops per image call it with ``batch_size = 2 * B`` so that every crop draws
    its own ratio, as iBOT does.

    Args:
        batch_size: Number of masks.
        grid_h: Patch rows per image.
        grid_w: Patch columns per image.
        config: Masking settings.
        generator: Source of randomness (a CPU ``torch.Generator``).
        epoch: Current epoch; before ``config.start_epoch`` all masks are empty. None means
            masking is on.

    Returns:
        ``GeneratedMasks(masks, ratios)``. ``ratios`` holds the drawn target ratios; the
        masked fraction of a block mask can fall below its ratio unless ``fill_to_target``.
    """
    if batch_size < 0 or grid_h < 1 or grid_w < 1:
        raise ValueError(
            f"invalid mask shape: batch_size={batch_size}, grid_h={grid_h}, grid_w={grid_w}"
        )
    num_patches = grid_h * grid_w
    if epoch is not None and epoch < config.start_epoch:
        return GeneratedMasks(
            torch.zeros(batch_size, num_patches, dtype=torch.bool),
            torch.zeros(batch_size, dtype=torch.float32),
        )

    # One 63-bit draw from the torch generator seeds a numpy generator for the array draws and
    # a private random.Random for the many scalar draws of the block loop, where it is much
    # faster than numpy or torch. The global ``random`` state is not touched.
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator).item())
    rng = np.random.default_rng(seed)
    block_rng = random.Random(seed)

    ratios = _draw_ratios(batch_size, config, rng)
    masks = np.zeros((batch_size, grid_h, grid_w), dtype=bool)
    for index, ratio in enumerate(ratios):
        if config.mode == "block":
            target = ratio * num_patches
            _place_blocks(masks[index], target, config, block_rng)
            if config.fill_to_target:
                _fill_randomly(masks[index], int(round(target)), rng)
        else:
            _fill_randomly(masks[index], int(ratio * num_patches), rng)
    return GeneratedMasks(
        torch.from_numpy(masks.reshape(batch_size, num_patches)),
        torch.from_numpy(ratios.astype(np.float32)),
    )


def masked_token_index(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image index of every masked token, and the masked count per image.

    Boolean indexing ``tokens[masks]`` of a ``[B, N, D]`` tensor returns the masked tokens in
    the same row-major order as this index.

    Args:
        masks: ``[B, N]`` bool, True = masked.

    Returns:
        ``(mask_image_index [M] int64, num_masked_per_image [B] int64)``.
    """
    if masks.ndim != 2 or masks.dtype != torch.bool:
        raise ValueError(f"masks must be a bool tensor [B, N], got {masks.dtype} {masks.shape}")
    mask_image_index = masks.nonzero(as_tuple=True)[0]
    return mask_image_index, masks.sum(dim=1)


def _draw_ratios(batch_size: int, config: MaskingConfig, rng: np.random.Generator) -> np.ndarray:
    centers = np.asarray(config.ratios, dtype=np.float64)
    variations = np.asarray(config.ratio_variations, dtype=np.float64)
    # [B, choices]: one candidate per choice, as iBOT draws all and then picks one.
    candidates = rng.uniform(centers - variations, centers + variations, (batch_size, len(centers)))
    picks = rng.integers(0, len(centers), batch_size)
    return candidates[np.arange(batch_size), picks]


def _place_blocks(
    mask: np.ndarray, target: float, config: MaskingConfig, rng: random.Random
) -> None:
    grid_h, grid_w = mask.shape
    min_area = config.min_patches_per_block
    if min_area is None:
        min_area = (min(grid_h, grid_w) // 3) ** 2
    log_low, log_high = math.log(config.aspect_ratio[0]), math.log(config.aspect_ratio[1])

    count = 0
    while count < target:
        remaining = target - count
        added = 0
        for _ in range(_TRIES_PER_BLOCK):
            # Like Python's random.uniform, which iBOT uses, accept a minimum above the remainder.
            area = rng.uniform(min(min_area, remaining), max(min_area, remaining))
            aspect = math.exp(rng.uniform(log_low, log_high))
            height = int(round(math.sqrt(area * aspect)))
            width = int(round(math.sqrt(area / aspect)))
            # iBOT requires the block to be strictly smaller than the grid in both directions.
            if not (height < grid_h and width < grid_w):
                continue
            top = rng.randint(0, grid_h - height)
            left = rng.randint(0, grid_w - width)
            window = mask[top : top + height, left : left + width]
            new = height * width - int(np.count_nonzero(window))
            if 0 < new <= remaining:
                window[...] = True
                added = new
                break
        if added == 0:
            break
        count += added


def _fill_randomly(mask: np.ndarray, target_count: int, rng: np.random.Generator) -> None:
    flat = mask.reshape(-1)
    missing = target_count - int(flat.sum())
    if missing <= 0:
        return
    free = np.flatnonzero(~flat)
    flat[rng.choice(free, size=min(missing, free.size), replace=False)] = True
