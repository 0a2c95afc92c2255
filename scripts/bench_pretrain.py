"""Throughput and peak memory of full iBOT training steps.

Modes, measured in one process so that their ratios are comparable:

- ``data``: ``PretrainTrainer.train_step`` fed by the real data pipeline (DataLoader workers,
  decoding, multi-crop augmentation). The time of a step includes waiting for its batch.
- ``tensors``: the same steps on one pre-made batch, reused; the gap to ``data`` shows
  whether data loading limits the run.
- ``bare``: the model math alone, as a baseline. A timm ViT of the same size runs forward and
  backward on all crops, and a copy of it (the teacher) runs forward on the global crops. There
  are no heads, loss, masks or optimizer.

Each mode runs ``--warmup`` untimed steps, then ``--steps`` timed ones, and reports the median
step time as images per second. On CUDA it also reports peak allocated memory and model FLOPs
utilisation from a FLOP estimate computed from layer shapes.

Examples::

    # CPU reference configuration (ViT-S/16, 16 images, 2x224 + 6x96, fp32, 2 workers)
    python scripts/bench_pretrain.py --preset bench-s --images /data/rbc-smears/images

    # ViT-B/16 paper recipe in bf16 on one GPU
    python scripts/bench_pretrain.py --preset gpu-vitb16 --images /data/smears --modes data

    # any config file with overrides
    python scripts/bench_pretrain.py --config configs/pretrain/demo_cpu.yaml \\
        --images data/demo/images data.batch_size_per_gpu=32
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from cytofm.pretrain.config import PretrainConfig, load_pretrain_config  # noqa: E402
from cytofm.pretrain.distributed import init_distributed  # noqa: E402
from cytofm.pretrain.trainer import PretrainTrainer  # noqa: E402

logger = logging.getLogger("bench_pretrain")

# Peak dense bf16 throughput of an H200 (SXM), in TFLOP/s, the default for --peak-tflops.
H200_BF16_PEAK_TFLOPS = 790.0

PRESETS: dict[str, tuple[str | None, list[str]]] = {
    # ViT-S/16 with stochastic depth 0.1 and 16 images per step, each cut into 2 global crops
    # of 224 and 6 local crops of 96. One 8192-way head with normalised prototypes is shared
    # by CLS and patch tokens. Block masking at ratio 0.3, fp32, AdamW, clipping at 3.0, and
    # 2 data-loading workers.
    "bench-s": (
        None,
        [
            "model.arch=vit_small",
            "model.patch_size=16",
            "model.img_size=224",
            "model.drop_path_rate=0.1",
            "data.batch_size_per_gpu=16",
            "data.num_workers=2",
            "data.field_size=null",
            "crops.global_crops_number=2",
            "crops.global_crop_size=224",
            "crops.local_crops_number=6",
            "crops.local_crop_size=96",
            "head.out_dim=8192",
            "head.patch_out_dim=8192",
            "head.shared=true",
            "head.norm_last_layer=true",
            "masking.mode=block",
            "masking.ratios=[0.3]",
            "masking.ratio_variations=[0.0]",
            "optim.clip_grad=3.0",
            "run.precision=fp32",
            "run.device=cpu",
        ],
    ),
    # The ViT-B/16 recipe as configured, bf16 on one GPU.
    "gpu-vitb16": (
        str(REPO_ROOT / "configs" / "pretrain" / "cytofm_vitb16.yaml"),
        ["run.precision=bf16", "run.device=cuda"],
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), help="named configuration")
    parser.add_argument("--config", type=Path, help="YAML config (instead of a preset)")
    parser.add_argument("--images", type=Path, required=True, help="folder of training images")
    parser.add_argument(
        "--modes", default="data,tensors,bare", help="comma-separated: data, tensors, bare"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per mode")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=H200_BF16_PEAK_TFLOPS,
        help="accelerator peak in TFLOP/s for model FLOPs utilisation (default: H200 bf16)",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)
    if (args.preset is None) == (args.config is None):
        parser.error("give exactly one of --preset and --config")
    return args


def build_config(args: argparse.Namespace, output_dir: Path) -> PretrainConfig:
    """Resolve the preset or config file plus overrides into a config."""
    config_path, preset_overrides = PRESETS[args.preset] if args.preset else (str(args.config), [])
    overrides = [
        *preset_overrides,
        f"data.sources=[{{path: '{args.images}'}}]",
        f"run.output_dir={output_dir}",
        "run.progress_bar=false",
        *args.overrides,
    ]
    return load_pretrain_config(config_path, overrides)


# ------------------------------------------------------------------------------ FLOP estimate


def vit_forward_flops(
    embed_dim: int, depth: int, tokens: int, patch_pixels: int, mlp_ratio: float = 4.0
) -> float:
    """Estimate the forward FLOPs of one ViT image: 2 FLOPs per multiply-add, from shapes.

    Counts the patch embedding, the qkv, output and MLP projections of every block and the two
    attention products; norms, softmax and activations are left out.
    """
    dim = embed_dim
    patch_embed = 2 * (tokens - 1) * patch_pixels * dim
    projections = 2 * tokens * dim * (3 * dim + dim + 2 * mlp_ratio * dim)
    attention = 2 * 2 * tokens * tokens * dim
    return patch_embed + depth * (projections + attention)


def head_forward_flops(config: PretrainConfig, embed_dim: int) -> float:
    """Estimate the forward FLOPs of the projection head for one token."""
    head = config.head
    widths = [embed_dim] + [head.hidden_dim] * (head.num_layers - 1) + [head.bottleneck_dim]
    mlp = sum(2 * a * b for a, b in zip(widths[:-1], widths[1:]))
    return mlp + 2 * head.bottleneck_dim * head.out_dim


def estimate_step_flops(config: PretrainConfig, trainer: PretrainTrainer) -> dict[str, float]:
    """Estimate the FLOPs of one training step per image, with and without the heads.

    Student: forward and backward (3x forward) on every crop. Teacher: forward on the global
    crops. Heads: CLS tokens of every crop plus the expected number of masked tokens, from the
    mean of the configured ratios. Block masks can fall short of their ratio, so this part is
    an upper estimate.
    """
    backbone = trainer.student.backbone
    dim, depth, patch = backbone.embed_dim, len(backbone.blocks), backbone.patch_size
    crops = config.crops
    patch_pixels = 3 * patch * patch
    global_tokens = (crops.global_crop_size // patch) ** 2 + backbone.num_prefix_tokens
    local_tokens = (crops.local_crop_size // patch) ** 2 + backbone.num_prefix_tokens
    global_fwd = vit_forward_flops(dim, depth, global_tokens, patch_pixels)
    local_fwd = vit_forward_flops(dim, depth, local_tokens, patch_pixels)
    student = 3 * (crops.global_crops_number * global_fwd + crops.local_crops_number * local_fwd)
    teacher = crops.global_crops_number * global_fwd

    mean_ratio = statistics.fmean(config.masking.ratios)
    masked = crops.global_crops_number * mean_ratio * (global_tokens - backbone.num_prefix_tokens)
    cls_tokens = crops.global_crops_number + crops.local_crops_number
    per_token = head_forward_flops(config, dim)
    heads = per_token * (3 * (cls_tokens + masked) + crops.global_crops_number + masked)
    return {"model": student + teacher, "with_heads": student + teacher + heads}


# ------------------------------------------------------------------------------ measuring


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work so that wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device: torch.device) -> float:
    """Peak allocated CUDA memory, or the peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux. It never decreases, so later modes include earlier peaks.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_steps(
    step: Callable[[], None], warmup: int, steps: int, device: torch.device
) -> list[float]:
    """Run ``warmup`` untimed and ``steps`` timed calls; return the timed durations."""
    durations = []
    for index in range(warmup + steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        if index >= warmup:
            durations.append(time.perf_counter() - start)
            logger.info("step %d: %.3f s", index + 1, durations[-1])
    return durations


def bench_trainer(trainer: PretrainTrainer, mode: str, warmup: int, steps: int) -> list[float]:
    """Time full training steps, fed by the data pipeline or by one pre-made batch."""
    trainer.student.train()
    trainer.teacher.train()
    batches = iter(trainer.data.loader)
    fixed = next(batches) if mode == "tensors" else None

    def one_step() -> None:
        crops = fixed if fixed is not None else next(batches)
        trainer.train_step(crops)
        trainer.step += 1

    return time_steps(one_step, warmup, steps, trainer.device)


def bench_bare(trainer: PretrainTrainer, warmup: int, steps: int) -> list[float]:
    """Time the model math alone: timm ViT forward/backward on all crops, teacher forward."""
    from timm.models.vision_transformer import VisionTransformer

    spec = trainer.student.backbone.spec
    config = trainer.config
    kwargs = {
        "img_size": spec.img_size,
        "patch_size": spec.patch_size,
        "embed_dim": spec.embed_dim,
        "depth": spec.depth,
        "num_heads": spec.num_heads,
        "num_classes": 0,
        "dynamic_img_size": True,
    }
    device = trainer.device
    student = VisionTransformer(drop_path_rate=config.model.drop_path_rate, **kwargs)
    student = student.to(device).train()
    teacher = copy.deepcopy(student).requires_grad_(False)
    crops = [crop.to(device) for crop in next(iter(trainer.data.loader))]
    num_global = config.crops.global_crops_number
    global_crops = torch.cat(crops[:num_global])
    local_crops = torch.cat(crops[num_global:]) if len(crops) > num_global else None

    def one_step() -> None:
        with trainer.precision.autocast():
            with torch.no_grad():
                teacher.forward_features(global_crops)
            loss = student.forward_features(global_crops).float().mean()
            if local_crops is not None:
                loss = loss + student.forward_features(local_crops).float().mean()
        loss.backward()
        student.zero_grad(set_to_none=True)

    return time_steps(one_step, warmup, steps, device)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one line per mode."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = sorted(set(modes) - {"data", "tensors", "bare"})
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; use data, tensors and bare")

    with tempfile.TemporaryDirectory(prefix="bench_pretrain_") as output_dir:
        config = build_config(args, Path(output_dir))
        context = init_distributed(config.run.device)
        trainer = PretrainTrainer(config, context)
        device = trainer.device
        batch = config.data.batch_size_per_gpu
        flops = estimate_step_flops(config, trainer)
        results = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "device": str(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),
            "preset": args.preset,
            "config": str(args.config) if args.config else None,
            "images_per_step": batch,
            "gflop_per_image_model": flops["model"] / 1e9,
            "gflop_per_image_with_heads": flops["with_heads"] / 1e9,
            "modes": {},
        }
        for mode in modes:
            logger.info("mode %s: %d warm-up and %d timed steps", mode, args.warmup, args.steps)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            if mode == "bare":
                durations = bench_bare(trainer, args.warmup, args.steps)
                step_flops = flops["model"] * batch
            else:
                durations = bench_trainer(trainer, mode, args.warmup, args.steps)
                step_flops = flops["with_heads"] * batch
            median = statistics.median(durations)
            entry = {
                "images_per_second": batch / median,
                "median_step_seconds": median,
                "step_seconds": durations,
                "peak_memory_mib": peak_memory_mib(device),
                "achieved_tflops": step_flops / median / 1e12,
            }
            if device.type == "cuda":
                entry["model_flops_utilisation"] = entry["achieved_tflops"] / args.peak_tflops
            results["modes"][mode] = entry
        results["load_average_after"] = os.getloadavg()

    bare = results["modes"].get("bare")
    for mode, entry in results["modes"].items():
        ratio = entry["images_per_second"] / bare["images_per_second"] if bare else float("nan")
        line = (
            f"{mode:8s} {entry['images_per_second']:8.3f} images/s  "
            f"median step {entry['median_step_seconds']:.3f} s  "
            f"{entry['achieved_tflops'] * 1e3:8.1f} GFLOP/s  "
            f"peak memory {entry['peak_memory_mib']:.0f} MiB  ratio to bare {ratio:.3f}"
        )
        if "model_flops_utilisation" in entry:
            line += f"  MFU {entry['model_flops_utilisation']:.1%}"
        print(line)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
