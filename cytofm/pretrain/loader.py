"""Data loading for pretraining: multi-crop dataset, resumable sampler and DataLoader."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from cytofm.data.pretrain_dataset import ImageSource, MixtureSampler, PretrainImageDataset
from cytofm.pretrain.augment import MultiCropAugmentation
from cytofm.pretrain.config import PretrainConfig
from cytofm.pretrain.distributed import DistributedContext, barrier
from cytofm.pretrain.stop_signals import ignore_interrupts_in_worker


@dataclass
class PretrainData:
    """Dataset, sampler and loader of a run.

    Attributes:
        dataset: Multi-crop dataset keyed by ``(index, seed)``.
        sampler: Weighted sampler; ``set_epoch`` and ``set_start`` position it.
        loader: DataLoader yielding a list of crop batches ``[B, 3, H, W]`` per step, global
            crops first.
        steps_per_epoch: Optimizer steps in one epoch (incomplete last batches are dropped).
    """

    dataset: PretrainImageDataset
    sampler: MixtureSampler
    loader: DataLoader
    steps_per_epoch: int


def collate_crops(samples: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Stack the i-th crop of every sample into one batch ``[B, 3, H_i, W_i]`` per crop."""
    return [torch.stack(crops) for crops in zip(*samples)]


def build_pretrain_data(config: PretrainConfig, context: DistributedContext) -> PretrainData:
    """Build the multi-crop dataset, this rank's sampler and its DataLoader.

    Raises:
        ValueError: no source is configured, or an epoch has fewer images per rank than one
            batch.
    """
    if not config.data.sources:
        raise ValueError(
            "data.sources is empty: list at least one image folder or manifest, e.g. "
            "data.sources=[{path: /data/smears, weight: 1}]"
        )
    root = config.data.root
    sources = [
        ImageSource(
            path=root / source.path if root is not None else source.path,
            weight=source.weight,
            recursive=source.recursive,
            kind=source.kind,
            magnification=source.magnification,
            base_magnification=source.base_magnification,
            max_glass_fraction=source.max_glass_fraction,
        )
        for source in config.data.sources
    ]
    dataset_kwargs = {}
    if config.data.max_pixels is not None:
        dataset_kwargs["max_pixels"] = config.data.max_pixels
    # Rank 0 builds the slide tile index first and saves it, so the other ranks read the saved
    # index instead of reading every slide's thumbnail again.
    builds_first = any(source.kind == "slides" for source in sources) and context.is_distributed
    if builds_first and not context.is_main:
        barrier(context)
    dataset = PretrainImageDataset(
        sources,
        MultiCropAugmentation(config.crops),
        field_size=config.data.field_size,
        max_bad_fraction=config.data.max_bad_fraction,
        skipped_manifest=config.run.output_dir / "skipped_files.csv",
        slide_index_dir=config.run.output_dir / "slide_index",
        **dataset_kwargs,
    )
    if builds_first and context.is_main:
        barrier(context)
    sampler = MixtureSampler(
        dataset,
        samples_per_epoch=config.data.samples_per_epoch,
        seed=config.run.seed,
        rank=context.rank,
        world_size=context.world_size,
    )
    batch_size = config.data.batch_size_per_gpu
    steps_per_epoch = sampler.per_rank // batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"an epoch has {sampler.per_rank} images per rank, fewer than one batch of "
            f"{batch_size}; lower data.batch_size_per_gpu or raise data.samples_per_epoch"
        )
    workers = config.data.num_workers
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_crops,
        pin_memory=config.data.pin_memory and context.device.type == "cuda",
        drop_last=True,
        persistent_workers=workers > 0,
        prefetch_factor=config.data.prefetch_factor if workers > 0 else None,
        # The main process saves a checkpoint on the first Ctrl-C, which needs live workers.
        worker_init_fn=ignore_interrupts_in_worker,
    )
    return PretrainData(dataset, sampler, loader, steps_per_epoch)
