"""Weighted, resumable sampling of ``(index, seed)`` keys over a mix of image sources.

For each epoch the sampler builds one global order from ``(seed, epoch)``:

1. The epoch's samples are split between sources in proportion to their weights (largest
   remainder rounding), so the proportions hold exactly in every epoch, not only on average.
2. Each source's draws walk through random permutations of its images, so no image repeats
   before every image of that source has been drawn once in the epoch.
3. The draws of all sources are shuffled together, and each gets its own 63-bit sample seed.

Rank ``r`` of ``world_size`` takes items ``r::world_size`` of the global order. The order is
padded to a multiple of ``world_size`` so every rank yields the same number of items, which
distributed training needs to stay in step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np


class MixtureDataset(Protocol):
    """Dataset interface the sampler reads: sizes, weights and offsets of the sources."""

    source_sizes: Sequence[int]
    source_weights: Sequence[float]
    source_offsets: np.ndarray


def split_by_weight(total: int, weights: Sequence[float]) -> np.ndarray:
    """Split ``total`` into integer counts proportional to ``weights`` (largest remainder)."""
    weights_array = np.asarray(weights, dtype=np.float64)
    if weights_array.size == 0 or np.any(weights_array <= 0):
        raise ValueError(f"weights must be positive, got {list(weights)}")
    exact = total * weights_array / weights_array.sum()
    counts = np.floor(exact).astype(np.int64)
    remainder = total - int(counts.sum())
    # Ties go to the earlier source, which keeps the split deterministic.
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:remainder]] += 1
    return counts


class MixtureSampler:
    """Sampler of ``(index, sample_seed)`` pairs for ``PretrainImageDataset``.

    Args:
        dataset: Dataset with ``source_sizes``, ``source_weights`` and ``source_offsets``.
        samples_per_epoch: Items in one epoch over all ranks; defaults to ``len(dataset)``.
        seed: Base seed; the order of epoch ``e`` depends only on ``(seed, e)``.
        rank: This process's rank.
        world_size: Number of ranks sharing the epoch.

    ``set_epoch(e)`` selects the epoch and clears any start offset set for another epoch.
    ``set_start(n)`` skips the first ``n`` items of this rank's order in the current epoch, for
    resuming mid-epoch; call it after ``set_epoch``.
    """

    def __init__(
        self,
        dataset: MixtureDataset,
        *,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world_size {world_size}")
        sizes = [int(size) for size in dataset.source_sizes]
        if not sizes or min(sizes) < 1:
            raise ValueError(f"every source needs at least one image, got sizes {sizes}")
        self.source_sizes = sizes
        self.source_weights = [float(weight) for weight in dataset.source_weights]
        self.source_offsets = np.asarray(dataset.source_offsets, dtype=np.int64)
        total = sum(sizes) if samples_per_epoch is None else int(samples_per_epoch)
        if total < 1:
            raise ValueError(f"samples_per_epoch must be positive, got {samples_per_epoch}")
        self.samples_per_epoch = total
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None

    @property
    def per_rank(self) -> int:
        """Items each rank yields in a full epoch."""
        return math.ceil(self.samples_per_epoch / self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order is yielded next."""
        if epoch != self.epoch:
            self.start = 0
        self.epoch = int(epoch)

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` items of this rank's order in the current epoch."""
        if not 0 <= start <= self.per_rank:
            raise ValueError(f"start {start} out of range for {self.per_rank} items per rank")
        self.start = int(start)

    def global_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(indices, seeds)`` of the whole epoch over all ranks, before rank slicing."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1], self._cache[2]
        generator = np.random.default_rng([self.seed, epoch])
        total = self.per_rank * self.world_size
        counts = split_by_weight(total, self.source_weights)
        parts = []
        for source, count in enumerate(counts):
            size = self.source_sizes[source]
            repeats = math.ceil(count / size)
            cycles = np.tile(np.arange(size, dtype=np.int64), (repeats, 1))
            positions = generator.permuted(cycles, axis=1).ravel()[:count]
            parts.append(positions + self.source_offsets[source])
        indices = generator.permutation(np.concatenate(parts))
        seeds = generator.integers(0, 2**63 - 1, size=total, dtype=np.int64)
        self._cache = (epoch, indices, seeds)
        return indices, seeds

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices, seeds = self.global_order(self.epoch)
        rank_indices = indices[self.rank :: self.world_size][self.start :]
        rank_seeds = seeds[self.rank :: self.world_size][self.start :]
        yield from zip(rank_indices.tolist(), rank_seeds.tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start

    def state_dict(self) -> dict[str, Any]:
        """Return the sampler settings and position (``start`` as last set) as plain data."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "start": self.start,
            "samples_per_epoch": self.samples_per_epoch,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``epoch`` and ``start``; the seed and epoch size must match this sampler."""
        for key in ("seed", "samples_per_epoch"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler {key} differs from the saved one ({getattr(self, key)} vs "
                    f"{state[key]}); resume with the same data settings"
                )
        self.set_epoch(int(state["epoch"]))
        self.set_start(int(state.get("start", 0)))
