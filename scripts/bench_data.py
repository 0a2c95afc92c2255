"""Measure pretraining data loading against the training step of a small ViT on CPU.

Writes a demo set, then times (1) ``PretrainImageDataset`` + ``MixtureSampler`` through a
DataLoader with a multi-crop-like transform and (2) one iBOT-like training step of a ViT on
batches of the same crops (student forward and backward on all crops, teacher forward on the
global crops). Loading keeps up when its images per second exceed the model's.

Usage: python scripts/bench_data.py [--workers 2] [--batches 6] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer
from torchvision import transforms

from cytofm.data.demo import generate_demo_set
from cytofm.data.pretrain_dataset import ImageSource, MixtureSampler, PretrainImageDataset


class MultiCrop:
    """Two global and several local crops with flips, colour jitter and blur."""

    def __init__(self, global_size: int, local_size: int, local_crops: int) -> None:
        normalise = [transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.25] * 3)]
        common = [
            transforms.RandomHorizontalFlip(),
            transforms.RandomVerticalFlip(),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.05)], p=0.8),
        ]
        self.global_crop = transforms.Compose(
            [
                transforms.RandomResizedCrop(global_size, scale=(0.32, 1.0)),
                *common,
                transforms.RandomApply([transforms.GaussianBlur(9)], p=0.5),
                *normalise,
            ]
        )
        self.local_crop = transforms.Compose(
            [transforms.RandomResizedCrop(local_size, scale=(0.05, 0.32)), *common, *normalise]
        )
        self.local_crops = local_crops

    def __call__(self, image):
        globals_ = [self.global_crop(image) for _ in range(2)]
        locals_ = [self.local_crop(image) for _ in range(self.local_crops)]
        return torch.stack(globals_), torch.stack(locals_)


def time_loading(dataset, sampler, workers: int, batch_size: int, batches: int) -> float:
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    iterator = iter(loader)
    next(iterator)  # worker start-up is not part of the steady state
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def time_model(args, batches: int) -> float:
    def vit():
        return VisionTransformer(
            img_size=args.global_size,
            patch_size=16,
            embed_dim=192,
            depth=12,
            num_heads=3,
            num_classes=0,
            dynamic_img_size=True,
        )

    student, teacher = vit(), vit().eval()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    globals_ = torch.randn(args.batch_size * 2, 3, args.global_size, args.global_size)
    locals_ = torch.randn(args.batch_size * args.local_crops, 3, args.local_size, args.local_size)

    def step():
        with torch.no_grad():
            target = teacher(globals_)
        loss = (student(globals_) - target).pow(2).mean() + student(locals_).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()
    start = time.perf_counter()
    for _ in range(batches):
        step()
    return batches * args.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--batches", type=int, default=6, help="timed batches per measurement")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch")
    parser.add_argument("--global-size", type=int, default=224, help="global crop side, px")
    parser.add_argument("--local-size", type=int, default=96, help="local crop side, px")
    parser.add_argument("--local-crops", type=int, default=6, help="local crops per image")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the model")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        generate_demo_set(folder, num_images=200, seed=0)
        generation = time.perf_counter() - start
        transform = MultiCrop(args.global_size, args.local_size, args.local_crops)
        dataset = PretrainImageDataset([ImageSource(Path(folder) / "images")], transform)
        sampler = MixtureSampler(dataset, samples_per_epoch=100_000, seed=0)
        torch.set_num_threads(1)
        single = time_loading(dataset, sampler, 0, args.batch_size, args.batches)
        parallel = time_loading(dataset, sampler, args.workers, args.batch_size, args.batches)

    torch.set_num_threads(args.threads)
    model = time_model(args, max(2, args.batches // 2))
    print(f"cpu cores visible: {os.cpu_count()}")
    print(f"demo set, 200 images of 256 px: {generation:.1f} s")
    print(f"loading, main process only: {single:.1f} images/s")
    print(f"loading, {args.workers} workers: {parallel:.1f} images/s")
    print(f"ViT-Tiny/16 training step ({args.threads} threads): {model:.1f} images/s")
    print(f"loading / model: {parallel / model:.2f}")


if __name__ == "__main__":
    main()
