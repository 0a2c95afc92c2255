"""Time MultiCropAugmentation against a torchvision pipeline with iBOT's settings.

The baseline applies each transform to a PIL image as bytedance/ibot's
``DataAugmentationiBOT`` does (random resized crop, flip, colour jitter with p=0.8, grayscale
with p=0.2, PIL Gaussian blur with p 1.0 / 0.1 / 0.5, solarization with p=0.2 on the second
global crop, ToTensor, Normalize). Our pipeline does the same plus the 90-degree rotation and
the HED stain jitter. Both run single-threaded, as in one DataLoader worker, on images that are
already decoded.

Usage:
    python scripts/bench_augment.py [--images DIR] [--count 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms

from cytofm.pretrain.augment import MultiCropAugmentation, MultiCropConfig


class _PilBlur:
    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class _PilSolarize:
    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img


def baseline_pipeline(config: MultiCropConfig):
    """Build a torchvision v1 pipeline with iBOT's per-view settings."""
    jitter = transforms.Compose(
        [
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
        ]
    )
    normalize = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(config.mean, config.std)]
    )
    bicubic = transforms.InterpolationMode.BICUBIC

    def view(size, scale, blur_p, solarize_p):
        return transforms.Compose(
            [
                transforms.RandomResizedCrop(size, scale=scale, interpolation=bicubic),
                jitter,
                _PilBlur(blur_p),
                _PilSolarize(solarize_p),
                normalize,
            ]
        )

    first = view(config.global_crop_size, config.global_crops_scale, 1.0, 0.0)
    other = view(config.global_crop_size, config.global_crops_scale, 0.1, 0.2)
    local = view(config.local_crop_size, config.local_crops_scale, 0.5, 0.0)
    views = [first] + [other] * (config.global_crops_number - 1)
    views += [local] * config.local_crops_number
    return lambda img: [transform(img) for transform in views]


def load_images(folder: Path | None, count: int) -> list[Image.Image]:
    if folder is not None:
        paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".jpg", ".png"})
        if not paths:
            raise SystemExit(f"no .jpg or .png images found under {folder}")
        return [Image.open(path).convert("RGB") for path in paths[:count]]
    generator = np.random.default_rng(0)
    shape = (480, 640, 3)
    return [
        Image.fromarray(generator.integers(0, 256, shape, dtype=np.uint8)) for _ in range(count)
    ]


def time_pipelines(pipelines: dict, images: list[Image.Image], repeats: int) -> dict:
    """Median seconds per image of each pipeline, with the pipelines interleaved per repeat."""
    timings: dict[str, list[float]] = {name: [] for name in pipelines}
    for repeat in range(repeats):
        for name, pipeline in pipelines.items():
            random.seed(repeat)
            torch.manual_seed(repeat)
            start = time.perf_counter()
            for image in images:
                pipeline(image)
            timings[name].append((time.perf_counter() - start) / len(images))
    return {name: statistics.median(values) for name, values in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=None, help="folder of images (recursive)")
    parser.add_argument("--count", type=int, default=64, help="number of images per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="repeats; the median is shown")
    args = parser.parse_args()

    torch.set_num_threads(1)
    images = load_images(args.images, args.count)
    config = MultiCropConfig()
    pipelines = {"baseline": baseline_pipeline(config), "ours": MultiCropAugmentation(config)}
    medians = time_pipelines(pipelines, images, args.repeats)
    baseline, ours = medians["baseline"], medians["ours"]
    size = f"{images[0].width}x{images[0].height}"
    views = MultiCropAugmentation(config).num_views
    print(f"images: {len(images)} ({size}), views per image: {views}")
    print(f"torchvision iBOT-style pipeline: {baseline * 1000:.1f} ms per image")
    print(f"MultiCropAugmentation:           {ours * 1000:.1f} ms per image")
    print(f"speed-up: {baseline / ours:.2f}x")


if __name__ == "__main__":
    main()
