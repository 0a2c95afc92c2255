"""Typed configuration of an iBOT pretraining run, loaded from YAML by ``cytofm.config``.

Sections: ``model`` (backbone), ``data`` (image sources and loader), ``crops`` (multi-crop
augmentation), ``masking`` (masked-patch sampling), ``head`` (projection head), ``loss``,
``optim`` (AdamW and clipping), ``schedule`` (per-step schedules) and ``run`` (output folder,
length, checkpoints, precision). Every field has a default, so a YAML file only lists what it
changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cytofm.config import ConfigError, load_config
from cytofm.models.vit import ARCHITECTURES
from cytofm.pretrain.augment import MultiCropConfig
from cytofm.pretrain.masking import MaskingConfig


@dataclass
class ModelConfig:
    """Backbone architecture, passed to ``cytofm.models.vit.build_vit``."""

    arch: Literal["vit_tiny", "vit_small", "vit_base", "vit_large"] = "vit_small"
    patch_size: int = 16
    img_size: int = 224
    drop_path_rate: float = 0.1
    init_values: float | None = None
    reg_tokens: int = 0
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None


@dataclass
class SourceConfig:
    """One source: a folder or manifest of images or whole slides, drawn with ``weight``.

    ``kind: slides`` tiles whole-slide images (OpenSlide) into ``data.field_size`` tiles at
    ``magnification`` and leaves out tiles with more than ``max_glass_fraction`` glass.
    """

    path: Path = Path("images")
    weight: float = 1.0
    recursive: bool = True
    kind: Literal["images", "slides"] = "images"
    magnification: float | None = None
    base_magnification: float | None = None
    max_glass_fraction: float = 0.9


# SourceConfig fields that only slide sources read.
_SLIDE_ONLY_KEYS = ("magnification", "base_magnification", "max_glass_fraction")


@dataclass
class DataConfig:
    """Image sources and data loading."""

    sources: list[SourceConfig] = field(default_factory=list)
    # Folder that relative source paths are resolved against; None: the working directory.
    root: Path | None = None
    batch_size_per_gpu: int = 64
    num_workers: int = 8
    samples_per_epoch: int | None = None
    prefetch_factor: int = 2
    pin_memory: bool = True
    field_size: int | None = 512
    max_pixels: int | None = None
    max_bad_fraction: float = 0.01


@dataclass
class HeadConfig:
    """iBOT projection head: MLP, L2-normalised bottleneck and weight-normalised last layer."""

    out_dim: int = 8192
    patch_out_dim: int = 8192
    shared: bool = True
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    num_layers: int = 3
    norm_last_layer: bool = True
    use_bn: bool = False


@dataclass
class LossConfig:
    """iBOT loss: CLS self-distillation plus masked-patch distillation, with centring.

    ``centering: sinkhorn_knopp`` replaces iBOT's EMA centring of the teacher outputs with
    DINOv2's Sinkhorn-Knopp balancing over the global batch (``sinkhorn_iterations`` rounds).
    """

    student_temp: float = 0.1
    center_momentum: float = 0.9
    cls_weight: float = 1.0
    patch_weight: float = 1.0
    centering: Literal["ema", "sinkhorn_knopp"] = "ema"
    sinkhorn_iterations: int = 3


@dataclass
class OptimConfig:
    """AdamW, weight decay range and gradient clipping.

    ``lr`` is per 256 images: the peak learning rate is ``lr * global_batch / 256``.
    """

    lr: float = 5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float | None = 3.0
    freeze_last_layer_epochs: int = 1


@dataclass
class ScheduleConfig:
    """Per-step schedules: lr warmup, teacher momentum and teacher temperature warmup."""

    warmup_epochs: float = 10.0
    teacher_momentum: float = 0.996
    teacher_momentum_end: float = 1.0
    teacher_temp_start: float = 0.04
    teacher_temp: float = 0.07
    teacher_patch_temp_start: float = 0.04
    teacher_patch_temp: float = 0.07
    teacher_temp_warmup_epochs: float = 30.0


@dataclass
class RunConfig:
    """Output folder, run length, checkpointing, precision and monitoring.

    ``max_steps`` stops the run early without changing the schedules, which keep their
    ``epochs`` length. ``num_threads`` sets torch's intra-op CPU threads (None keeps torch's
    default, one per core).
    """

    output_dir: Path = Path("runs/pretrain")
    epochs: int = 100
    max_steps: int | None = None
    save_every_steps: int = 1000
    keep_last: int = 3
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int | None = None
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False
    grad_checkpointing: bool = False
    log_every_steps: int = 10
    progress_bar: bool = True


@dataclass
class PretrainConfig:
    """Complete configuration of a ``cytofm-pretrain`` run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    crops: MultiCropConfig = field(default_factory=MultiCropConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)


def load_pretrain_config(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> PretrainConfig:
    """Load a pretraining config from YAML plus ``key=value`` overrides and check it.

    Raises:
        ConfigError: an unknown key, a value of the wrong type, or a value out of range.
    """
    config = load_config(PretrainConfig, path, overrides)
    validate(config)
    return config


def validate(config: PretrainConfig) -> None:
    """Check values that the type system cannot, naming the offending key.

    Raises:
        ConfigError: the first invalid value found.
    """
    positive = {
        "data.batch_size_per_gpu": config.data.batch_size_per_gpu,
        "run.epochs": config.run.epochs,
        "run.save_every_steps": config.run.save_every_steps,
        "run.keep_last": config.run.keep_last,
        "run.log_every_steps": config.run.log_every_steps,
        "head.out_dim": config.head.out_dim,
        "head.patch_out_dim": config.head.patch_out_dim,
        "model.patch_size": config.model.patch_size,
        "model.img_size": config.model.img_size,
        # A temperature of 0 or less makes the softmax NaN or inverts it.
        "loss.student_temp": config.loss.student_temp,
        "schedule.teacher_temp_start": config.schedule.teacher_temp_start,
        "schedule.teacher_temp": config.schedule.teacher_temp,
        "schedule.teacher_patch_temp_start": config.schedule.teacher_patch_temp_start,
        "schedule.teacher_patch_temp": config.schedule.teacher_patch_temp,
    }
    for key in ("embed_dim", "depth", "num_heads"):
        if getattr(config.model, key) is not None:
            positive[f"model.{key}"] = getattr(config.model, key)
    typical = {"loss.student_temp": 0.1, "schedule.teacher_temp": 0.07}
    for key, value in positive.items():
        if value <= 0:
            hint = f" (iBOT uses {typical[key]})" if key in typical else ""
            raise ConfigError(f"{key} must be positive, got {value}{hint}")
    _validate_model_shape(config)
    if config.data.num_workers < 0:
        raise ConfigError(f"data.num_workers must be 0 or more, got {config.data.num_workers}")
    if config.run.num_threads is not None and config.run.num_threads <= 0:
        raise ConfigError(f"run.num_threads must be positive or null, got {config.run.num_threads}")
    if config.run.max_steps is not None and config.run.max_steps <= 0:
        raise ConfigError(f"run.max_steps must be positive or null, got {config.run.max_steps}")
    if config.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be positive, got {config.optim.lr}")
    if config.optim.clip_grad is not None and config.optim.clip_grad <= 0:
        raise ConfigError(f"optim.clip_grad must be positive or null, got {config.optim.clip_grad}")
    if config.head.shared and config.head.out_dim != config.head.patch_out_dim:
        raise ConfigError(
            f"head.shared is true, so head.patch_out_dim ({config.head.patch_out_dim}) must equal "
            f"head.out_dim ({config.head.out_dim})"
        )
    if config.loss.sinkhorn_iterations < 1:
        raise ConfigError(
            f"loss.sinkhorn_iterations must be at least 1, got {config.loss.sinkhorn_iterations}"
        )
    for index, source in enumerate(config.data.sources):
        _validate_source(source, f"data.sources[{index}]", config.data.field_size)


def _validate_source(source: SourceConfig, key: str, field_size: int | None) -> None:
    """Check one entry of ``data.sources``; ``key`` names it in errors."""
    if source.weight <= 0:
        raise ConfigError(f"{key}.weight must be positive, got {source.weight}")
    for name in ("magnification", "base_magnification"):
        value = getattr(source, name)
        if value is not None and not value > 0:
            raise ConfigError(f"{key}.{name} must be positive or null, got {value}")
    if not 0.0 <= source.max_glass_fraction <= 1.0:
        raise ConfigError(
            f"{key}.max_glass_fraction must be in [0, 1], got {source.max_glass_fraction}"
        )
    if source.kind == "images":
        defaults = SourceConfig()
        for name in _SLIDE_ONLY_KEYS:
            if getattr(source, name) != getattr(defaults, name):
                raise ConfigError(
                    f"{key}.{name} is set to {getattr(source, name)}, but it applies to slide "
                    f"sources only and {key} has kind: images. Remove it, or set "
                    f"{key}.kind to slides if the path lists whole-slide images"
                )
    if source.kind == "slides" and field_size is None:
        raise ConfigError(
            f"{key} reads slides, which are tiled at data.field_size: "
            "set data.field_size (e.g. 512)"
        )


def _validate_model_shape(config: PretrainConfig) -> None:
    """Check that image and crop sizes tile into whole patches and the heads split the width."""
    patch_size = config.model.patch_size
    sizes = {
        "model.img_size": config.model.img_size,
        "crops.global_crop_size": config.crops.global_crop_size,
        "crops.local_crop_size": config.crops.local_crop_size,
    }
    for key, size in sizes.items():
        if size % patch_size != 0:
            suggestion = math.ceil(size / patch_size) * patch_size
            raise ConfigError(
                f"{key} must be a multiple of model.patch_size ({patch_size}), got {size}. "
                f"Use e.g. {suggestion}"
            )

    model = config.model
    preset_width, _, preset_heads = ARCHITECTURES[model.arch]
    if model.embed_dim is not None:
        width, width_source = model.embed_dim, "model.embed_dim"
    else:
        width, width_source = preset_width, model.arch
    if model.num_heads is not None:
        heads, heads_source = model.num_heads, f"got {model.num_heads}"
    else:
        heads, heads_source = preset_heads, f"got null, so {preset_heads} from {model.arch}"
    if width % heads != 0:
        divisors = [count for count in range(1, width + 1) if width % count == 0]
        suggestion = min(divisors, key=lambda count: (abs(count - heads), count))
        raise ConfigError(
            f"model.num_heads must divide the width {width} ({width_source}), {heads_source}. "
            f"Use e.g. {suggestion}"
        )
