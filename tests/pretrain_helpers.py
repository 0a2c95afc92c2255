"""Tiny pretraining runs shared by the loop tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cytofm.pretrain.config import PretrainConfig, load_pretrain_config
from cytofm.pretrain.distributed import DistributedContext
from cytofm.pretrain.trainer import PretrainTrainer, TrainResult

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "configs" / "pretrain" / "demo_cpu.yaml"
CPU = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def write_random_images(folder: Path, count: int, size: int = 48, seed: int = 0) -> Path:
    """Write ``count`` random RGB PNGs of ``size`` px into ``folder`` and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"image_{index:03d}.png")
    return folder


def tiny_overrides(images: Path, output_dir: Path, **extra: object) -> list[str]:
    """Overrides that turn any pretraining config into a run of a few seconds on CPU.

    A 2-block ViT of width 32 with 8-px patches, 2 global crops of 32 px and 2 local crops of
    16 px, a 64-way head and batches of 4 images.
    """
    values: dict[str, object] = {
        "model.arch": "vit_tiny",
        "model.embed_dim": 32,
        "model.depth": 2,
        "model.num_heads": 2,
        "model.patch_size": 8,
        "model.img_size": 32,
        "model.drop_path_rate": 0.1,
        "crops.global_crop_size": 32,
        "crops.local_crop_size": 16,
        "crops.local_crops_number": 2,
        "head.out_dim": 64,
        "head.patch_out_dim": 64,
        "head.hidden_dim": 64,
        "head.bottleneck_dim": 16,
        "data.sources": f"[{{path: {images}}}]",
        "data.batch_size_per_gpu": 4,
        "data.num_workers": 0,
        "data.field_size": 64,
        "run.output_dir": str(output_dir),
        "run.epochs": 2,
        "run.device": "cpu",
        "run.precision": "fp32",
        "run.log_every_steps": 1,
        "run.save_every_steps": 2,
        "run.keep_last": 5,
        "run.progress_bar": "false",
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


def tiny_config(images: Path, output_dir: Path, **extra: object) -> PretrainConfig:
    """Load the default config with ``tiny_overrides``."""
    return load_pretrain_config(None, tiny_overrides(images, output_dir, **extra))


def run_tiny(
    images: Path, output_dir: Path, **extra: object
) -> tuple[PretrainTrainer, TrainResult]:
    """Build a trainer for a tiny run (resuming from ``output_dir`` if possible) and train."""
    trainer = PretrainTrainer(tiny_config(images, output_dir, **extra), CPU)
    return trainer, trainer.train()


def logged_losses(trainer: PretrainTrainer) -> list[float]:
    """Total loss of every logged step of a finished run."""
    return [entry["loss/total"] for entry in trainer.metrics.history]
