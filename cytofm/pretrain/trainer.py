"""The iBOT pretraining loop: one optimizer step per batch, checkpoints, resume, monitoring.

One step: the teacher embeds the global crops without gradients. The student embeds the
global crops with masked patches replaced by the mask token, and the local crops unmasked.
The iBOT loss compares CLS outputs across views and patch outputs at masked positions. Then
AdamW updates the student, the teacher follows by EMA, and the loss centres move.

Every value that changes over a run is a function of the seed and the global step: lr, weight
decay, teacher momentum and temperature, the masks, the data order and stochastic depth. So a
run resumed from a checkpoint continues exactly as it would have without the interruption.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cytofm.config import to_dict
from cytofm.pretrain.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CheckpointMismatchError,
    capture_rng_state,
    check_checkpoint_fits,
    list_checkpoints,
    load_latest_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from cytofm.pretrain.config import PretrainConfig
from cytofm.pretrain.distributed import DistributedContext, all_reduce_mean, barrier
from cytofm.pretrain.loader import PretrainData, build_pretrain_data
from cytofm.pretrain.loss import IBOTLoss
from cytofm.pretrain.masking import MaskingConfig, generate_masks
from cytofm.pretrain.metrics import MetricsWriter
from cytofm.pretrain.networks import (
    IBOTNetwork,
    NetworkOutput,
    backbone_arguments,
    build_student_teacher,
)
from cytofm.pretrain.precision import resolve_precision
from cytofm.pretrain.run_folder import save_resolved_config
from cytofm.pretrain.schedules import Schedules, ScheduleValues, scale_learning_rate
from cytofm.pretrain.stop_signals import StopSignals
from cytofm.pretrain.teacher import cancel_last_layer_gradients, param_groups, update_teacher

logger = logging.getLogger(__name__)

# Steps between the cross-rank checks for a stop signal (each costs a device synchronisation).
STOP_CHECK_EVERY_STEPS = 10

LOSS_TERMS = ("total", "cls", "patch")

# Streams of the per-step seeds, so masks and stochastic depth never share random numbers.
_MASK_STREAM = 0
_TORCH_STREAM = 1
_INIT_STREAM = 2


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops before the weights are updated."""


@dataclass
class TrainResult:
    """Outcome of ``PretrainTrainer.train``.

    Attributes:
        step: Optimizer steps done, counted over the whole run (resumed runs included).
        epoch: Epoch the next step belongs to.
        losses: Loss terms of the last step (mean over ranks), empty if no step ran.
        checkpoint: Path of the last checkpoint written by this process, if any.
        stop_signal: Number of the signal that stopped the run before its last step (after
            a checkpoint), or None if it ran to the end.
    """

    step: int
    epoch: int
    losses: dict[str, float]
    checkpoint: Path | None
    stop_signal: int | None = None


def derive_seed(*values: int) -> int:
    """Mix integers (seed, step, stream, ...) into one 63-bit seed."""
    state = np.random.SeedSequence([int(value) for value in values]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def describe_non_finite_loss(
    losses: dict[str, float],
    *,
    step: int,
    epoch: int,
    last_checkpoint: Path | None,
    output_dir: Path,
    precision: str,
) -> str:
    """Return the error message for a NaN or infinite loss at ``step`` (counted from 1).

    The message names the checkpoint a new start would resume from, or states that there is
    none, and suggests fp32 only to a run that uses another precision.
    """
    described = ", ".join(f"{name}={value}" for name, value in losses.items())
    parts = [
        f"non-finite loss at step {step} (epoch {epoch}): {described}.",
        "The weights of this step were not updated.",
    ]
    if last_checkpoint is not None:
        parts.append(f"The last checkpoint, {last_checkpoint}, is intact.")
    else:
        parts.append(
            f"No checkpoint was written to {output_dir} yet, so running again starts from step 0."
        )
    if precision == "fp32":
        parts.append("Lower optim.lr or raise schedule.teacher_temp_start.")
    else:
        parts.append(
            "Lower optim.lr, raise schedule.teacher_temp_start, or use run.precision=fp32 to "
            f"rule out {precision} overflow."
        )
    return " ".join(parts)


def draw_step_masks(
    config: MaskingConfig,
    *,
    seed: int,
    step: int,
    epoch: int,
    num_global_crops: int,
    batch_size_per_rank: int,
    rank: int,
    world_size: int,
    grid: tuple[int, int],
) -> torch.Tensor:
    """Draw one rank's global-crop masks at ``step``, crop-major ``[crops * B, h * w]``.

    Each mask comes from a generator seeded with ``(seed, step, crop, position)``, where
    ``position`` is the image's place in the step's global batch. Rank ``r`` gets positions
    ``r, r + world_size, ...`` as the sampler deals them. So an image's masks neither depend
    on the number of processes nor change when a run resumes, and each rank draws only its
    own masks.
    """
    masks = []
    for crop in range(num_global_crops):
        for item in range(batch_size_per_rank):
            position = rank + world_size * item
            generator = torch.Generator().manual_seed(
                derive_seed(seed, step, _MASK_STREAM, crop, position)
            )
            drawn = generate_masks(1, grid[0], grid[1], config, generator, epoch=epoch)
            masks.append(drawn.masks)
    return torch.cat(masks)


def build_optimizer(student: nn.Module, config: PretrainConfig, device: torch.device):
    """Build AdamW over the student's decay and no-decay groups.

    The fused CUDA kernel is used on GPU and the multi-tensor (foreach) kernel elsewhere. The
    schedules set lr and weight decay before every step.
    """
    groups = param_groups(student, config.optim.weight_decay)
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        groups,
        lr=0.0,
        betas=config.optim.betas,
        eps=config.optim.eps,
        fused=fused or None,
        foreach=None if fused else True,
    )


def group_by_size(crops: list[torch.Tensor]) -> list[torch.Tensor]:
    """Concatenate consecutive crop batches of the same spatial size into one batch each.

    The loss expects student outputs in crop order, so crops of one size must be contiguous.

    Raises:
        ValueError: a crop size reappears after a crop of another size.
    """
    groups: dict[tuple[int, int], list[torch.Tensor]] = {}
    for crop in crops:
        size = tuple(crop.shape[-2:])
        if size in groups and size != list(groups)[-1]:
            sizes = [tuple(crop.shape[-2:]) for crop in crops]
            raise ValueError(f"local crops of one size must be contiguous, got sizes {sizes}")
        groups.setdefault(size, []).append(crop)
    return [torch.cat(group) for group in groups.values()]


def _first_mismatch(error: RuntimeError) -> str:
    """Return the first specific line of a ``load_state_dict`` error."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1:
        return lines[1]
    return lines[0] if lines else type(error).__name__


class PretrainTrainer:
    """iBOT pretraining of a ViT student with an EMA teacher.

    Builds data, networks, loss, optimizer and schedules from the config, resumes from the
    newest checkpoint in ``run.output_dir`` if one exists, and trains with ``train()``.

    Args:
        config: Resolved run configuration.
        context: Process placement from ``init_distributed``.
    """

    def __init__(self, config: PretrainConfig, context: DistributedContext) -> None:
        self.config = config
        self.context = context
        self.device = context.device
        self.output_dir = Path(config.run.output_dir)
        self.precision = resolve_precision(config.run.precision, self.device)
        if config.run.num_threads is not None:
            torch.set_num_threads(config.run.num_threads)

        self.data: PretrainData = build_pretrain_data(config, context)
        self.steps_per_epoch = self.data.steps_per_epoch
        self.total_steps = config.run.epochs * self.steps_per_epoch
        self.global_batch_size = config.data.batch_size_per_gpu * context.world_size

        # Every rank draws the same initial weights; DDP also broadcasts rank 0's at wrap time.
        torch.manual_seed(derive_seed(config.run.seed, _INIT_STREAM))
        student, teacher = build_student_teacher(config.model, config.head)
        if config.run.grad_checkpointing:
            student.backbone.set_grad_checkpointing(True)
        self.student: IBOTNetwork = student.to(self.device)
        self.teacher: IBOTNetwork = teacher.to(self.device)

        crops = config.crops
        self.num_global_crops = crops.global_crops_number
        self.loss_fn = IBOTLoss(
            config.head.out_dim,
            config.head.patch_out_dim,
            num_global_crops=crops.global_crops_number,
            num_local_crops=crops.local_crops_number,
            cls_weight=config.loss.cls_weight,
            patch_weight=config.loss.patch_weight,
            center_momentum=config.loss.center_momentum,
            patch_center_momentum=config.loss.center_momentum,
            centering=config.loss.centering,
            sinkhorn_iterations=config.loss.sinkhorn_iterations,
        ).to(self.device)
        self.optimizer = build_optimizer(self.student, config, self.device)
        self.scaler = self.precision.make_grad_scaler()
        self.schedules = self._build_schedules()

        self.step = 0
        self.last_checkpoint: Path | None = None
        self.stop_signals = StopSignals()
        self._resume()

        self.student_forward = self._wrap_student()
        self.teacher_forward = self.teacher
        if config.run.compile:
            self.teacher_forward = torch.compile(self.teacher)
        self.metrics = MetricsWriter(self.output_dir, enabled=context.is_main)

    # ----------------------------------------------------------------------------- set-up

    def _build_schedules(self) -> Schedules:
        config = self.config
        peak_lr = scale_learning_rate(config.optim.lr, self.global_batch_size)
        schedule = config.schedule
        logger.info(
            "global batch %d, peak lr %.3g, %d steps per epoch, %d steps in %d epochs",
            self.global_batch_size,
            peak_lr,
            self.steps_per_epoch,
            self.total_steps,
            config.run.epochs,
        )
        return Schedules.from_epochs(
            epochs=config.run.epochs,
            steps_per_epoch=self.steps_per_epoch,
            lr=peak_lr,
            lr_warmup_epochs=schedule.warmup_epochs,
            teacher_temp_warmup_epochs=schedule.teacher_temp_warmup_epochs,
            min_lr=config.optim.min_lr,
            weight_decay=config.optim.weight_decay,
            weight_decay_end=config.optim.weight_decay_end,
            teacher_momentum=schedule.teacher_momentum,
            teacher_momentum_end=schedule.teacher_momentum_end,
            teacher_temp_start=schedule.teacher_temp_start,
            teacher_temp=schedule.teacher_temp,
            teacher_patch_temp_start=schedule.teacher_patch_temp_start,
            teacher_patch_temp=schedule.teacher_patch_temp,
        )

    def _wrap_student(self) -> nn.Module:
        module: nn.Module = self.student
        if self.context.is_distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(
                module, device_ids=device_ids, broadcast_buffers=False
            )
        if self.config.run.compile:
            module = torch.compile(module)
        return module

    def _resume(self) -> None:
        found = load_latest_checkpoint(self.output_dir, set_aside_unreadable=self.context.is_main)
        if found is None:
            logger.info("no checkpoint in %s: starting from step 0", self.output_dir)
            return
        path, state = found
        check_checkpoint_fits(
            path,
            state,
            backbone_arguments(self.config.model, self.teacher.backbone),
            to_dict(self.config.head),
        )
        saved_batch = state["data"].get("global_batch_size")
        if saved_batch is not None and saved_batch != self.global_batch_size:
            raise ValueError(
                f"the checkpoint in {self.output_dir} was trained with a global batch of "
                f"{saved_batch} images, this run has {self.global_batch_size}; resume with the "
                "same batch_size_per_gpu x number of processes, or use a new run.output_dir"
            )
        if state["data"].get("world_size", self.context.world_size) != self.context.world_size:
            logger.warning(
                "resuming with %d processes instead of %d: the data order and the random "
                "draws can differ from those of an uninterrupted run",
                self.context.world_size,
                state["data"]["world_size"],
            )
        saved_steps = state["data"].get("steps_per_epoch", self.steps_per_epoch)
        if saved_steps != self.steps_per_epoch:
            logger.warning(
                "an epoch now has %d steps, the checkpoint's run had %d (images or "
                "data.samples_per_epoch changed): epochs and schedules continue from step %d "
                "but no longer match the first part of the run",
                self.steps_per_epoch,
                saved_steps,
                state["step"],
            )

        parts = (
            (self.student.backbone, "student"),
            (self.student.head, "student_head"),
            (self.teacher.backbone, "teacher"),
            (self.teacher.head, "teacher_head"),
        )
        for module, key in parts:
            try:
                module.load_state_dict(state[key])
            except RuntimeError as error:
                # The checks above cover the config keys; this names any other difference.
                raise CheckpointMismatchError(
                    f"the {key!r} weights of {path} do not fit the model built from the "
                    f"config: {_first_mismatch(error)}. Use another run.output_dir, or the "
                    "model and head settings the run started with"
                ) from error
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.loss_fn.load_state_dict(state["loss"])
        restore_rng_state(state["rng"])
        self.step = int(state["step"])

    # ----------------------------------------------------------------------------- state

    @property
    def epoch(self) -> int:
        """Epoch of the next step."""
        return self.step // self.steps_per_epoch

    def checkpoint_state(self) -> dict[str, Any]:
        """Return the full training state as plain data (see ``cytofm.pretrain.checkpoint``)."""
        step_in_epoch = self.step % self.steps_per_epoch
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "student": self.student.backbone.state_dict(),
            "teacher": self.teacher.backbone.state_dict(),
            "student_head": self.student.head.state_dict(),
            "teacher_head": self.teacher.head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "data": {
                "epoch": self.epoch,
                "step_in_epoch": step_in_epoch,
                "samples_done_per_rank": step_in_epoch * self.config.data.batch_size_per_gpu,
                "steps_per_epoch": self.steps_per_epoch,
                "global_batch_size": self.global_batch_size,
                "world_size": self.context.world_size,
                "seed": self.config.run.seed,
            },
            "rng": capture_rng_state(),
            "config": to_dict(self.config),
            "model": backbone_arguments(self.config.model, self.teacher.backbone),
        }

    def _stop_requested(self) -> bool:
        """Check whether any rank received a stop signal, so every rank stops at the same step.

        With several processes the check is an all-reduce that waits for the device, so it runs
        only every ``STOP_CHECK_EVERY_STEPS`` steps, and all ranks skip the same steps. A rank
        that received no signal takes the highest signal number among the ranks as its own.
        """
        received = self.stop_signals.received
        if self.context.world_size > 1:
            if self.step % STOP_CHECK_EVERY_STEPS != 0:
                return False
            flag = torch.tensor([float(received or 0)], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if flag.item() > 0 and received is None:
                self.stop_signals.received = int(flag.item())
            return flag.item() > 0
        return received is not None

    def save(self) -> None:
        """Write a checkpoint from rank 0; every rank waits until it is on disk."""
        if self.context.is_main:
            self.last_checkpoint = save_checkpoint(
                self.checkpoint_state(), self.output_dir, self.config.run.keep_last
            )
        barrier(self.context)

    # ----------------------------------------------------------------------------- one step

    def masks_for_step(self, step: int, grid: tuple[int, int]) -> torch.Tensor:
        """Draw the masks of this rank's global crops at ``step`` (see ``draw_step_masks``)."""
        return draw_step_masks(
            self.config.masking,
            seed=self.config.run.seed,
            step=step,
            epoch=step // self.steps_per_epoch,
            num_global_crops=self.num_global_crops,
            batch_size_per_rank=self.config.data.batch_size_per_gpu,
            rank=self.context.rank,
            world_size=self.context.world_size,
            grid=grid,
        )

    def _set_optimizer_values(self, values: ScheduleValues) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = values.lr
            group["weight_decay"] = values.weight_decay if group["apply_weight_decay"] else 0.0

    def train_step(self, crops: list[torch.Tensor], monitor: bool = False) -> dict[str, Any]:
        """Run one optimizer step on a batch of crops (global crops first).

        Args:
            crops: One batch ``[B, 3, H, W]`` per crop, global crops first.
            monitor: Also return the teacher's CLS probabilities, centred with the centre the
                loss used (before this step's update), for the collapse signals.

        Returns:
            Loss terms (mean over ranks, floats), the schedule values, the gradient norm
            (a tensor, read only when logged), the teacher outputs and, with ``monitor``,
            the teacher probabilities.

        Raises:
            NonFiniteLossError: a loss term is NaN or infinite; nothing was updated.
        """
        config = self.config
        step = self.step
        values = self.schedules(step)
        self._set_optimizer_values(values)
        torch.manual_seed(derive_seed(config.run.seed, step, _TORCH_STREAM, self.context.rank))

        num_global = self.num_global_crops
        global_crops = torch.cat(
            [crop.to(self.device, non_blocking=True) for crop in crops[:num_global]]
        )
        local_crops = group_by_size(
            [crop.to(self.device, non_blocking=True) for crop in crops[num_global:]]
        )
        patch_size = self.student.backbone.patch_size
        grid = (global_crops.shape[-2] // patch_size, global_crops.shape[-1] // patch_size)
        masks = self.masks_for_step(step, grid)
        # Index the masks on the host, so no device synchronisation is needed to size them.
        mask_index = tuple(
            index.to(self.device, non_blocking=True) for index in masks.nonzero(as_tuple=True)
        )
        num_masked = masks.sum(dim=1).to(self.device, non_blocking=True)
        masks = masks.to(self.device, non_blocking=True)
        mask_image_index = mask_index[0]

        with torch.no_grad(), self.precision.autocast():
            teacher_out: NetworkOutput = self.teacher_forward(
                global_crops, masks, mask_inputs=False, mask_index=mask_index
            )
        with self.precision.autocast():
            student_out: NetworkOutput = self.student_forward(
                global_crops, masks, local_crops, mask_index=mask_index
            )
        losses = self.loss_fn(
            student_out.cls_logits,
            student_out.patch_logits,
            teacher_out.cls_logits,
            teacher_out.patch_logits,
            mask_image_index,
            num_masked,
            config.loss.student_temp,
            values.teacher_temp,
            values.teacher_patch_temp,
        )
        terms = torch.stack([losses[name].detach() for name in LOSS_TERMS])
        loss_values = dict(zip(LOSS_TERMS, all_reduce_mean(terms, self.context).tolist()))
        if not all(math.isfinite(value) for value in loss_values.values()):
            earlier = [path for saved, path in list_checkpoints(self.output_dir) if saved <= step]
            raise NonFiniteLossError(
                describe_non_finite_loss(
                    loss_values,
                    step=step + 1,
                    epoch=self.epoch,
                    last_checkpoint=earlier[-1] if earlier else None,
                    output_dir=self.output_dir,
                    precision=self.precision.name,
                )
            )

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["total"]).backward()
        self.scaler.unscale_(self.optimizer)
        max_norm = config.optim.clip_grad if config.optim.clip_grad is not None else math.inf
        grad_norm = nn.utils.clip_grad_norm_(self.student.parameters(), max_norm, foreach=True)
        cancel_last_layer_gradients(
            self.student.head, self.epoch, config.optim.freeze_last_layer_epochs
        )
        self.scaler.step(self.optimizer)
        self.scaler.update()

        update_teacher(
            self.student.parameters(), self.teacher.parameters(), values.teacher_momentum
        )
        teacher_probs = None
        if monitor:
            teacher_probs = self.loss_fn.teacher_probabilities(
                teacher_out.cls_logits, values.teacher_temp
            )
        self.loss_fn.update_center(teacher_out.cls_logits, teacher_out.patch_logits)
        return {
            "losses": loss_values,
            "schedule": values,
            "grad_norm": grad_norm,
            "teacher": teacher_out,
            "teacher_probs": teacher_probs,
        }

    # ----------------------------------------------------------------------------- the loop

    def stop_step(self) -> int:
        """Global step at which this run stops (``run.max_steps`` caps the epochs)."""
        if self.config.run.max_steps is None:
            return self.total_steps
        return min(self.total_steps, self.config.run.max_steps)

    def train(self) -> TrainResult:
        """Train until the last epoch or ``run.max_steps``, saving and logging on the way.

        Raises:
            NonFiniteLossError: the loss became NaN or infinite.
        """
        config = self.config
        stop = self.stop_step()
        losses: dict[str, float] = {}
        if self.step >= stop:
            # config.yaml stays as it is, because it describes the settings that trained the
            # checkpoints.
            logger.info("nothing to do: step %d already reached the stop step %d", self.step, stop)
            return TrainResult(self.step, self.epoch, losses, self.last_checkpoint)
        if self.context.is_main:
            save_resolved_config(self.config, self.output_dir, self.step)

        logger.info(
            "training from step %d (epoch %d) to step %d on %d process(es)",
            self.step,
            self.epoch,
            stop,
            self.context.world_size,
        )
        progress = tqdm(
            total=stop,
            initial=self.step,
            desc="pretrain",
            unit="step",
            dynamic_ncols=True,
            disable=not (self.context.is_main and config.run.progress_bar),
        )
        self.student.train()
        self.teacher.train()
        window_start, window_steps = time.perf_counter(), 0
        self.stop_signals.install()
        try:
            while self.step < stop and not self._stop_requested():
                epoch = self.epoch
                sampler = self.data.sampler
                sampler.set_epoch(epoch)
                sampler.set_start(
                    (self.step % self.steps_per_epoch) * config.data.batch_size_per_gpu
                )
                for crops in self.data.loader:
                    log_now = (self.step + 1) % config.run.log_every_steps == 0
                    result = self.train_step(crops, monitor=log_now or self.step + 1 == stop)
                    self.step += 1
                    window_steps += 1
                    losses = result["losses"]
                    progress.update(1)
                    progress.set_postfix(loss=f"{losses['total']:.4f}", epoch=epoch)

                    end_of_epoch = self.step % self.steps_per_epoch == 0
                    if result["teacher_probs"] is not None:
                        elapsed = time.perf_counter() - window_start
                        images_per_second = window_steps * self.global_batch_size / elapsed
                        self.metrics.log_step(self.step, result, images_per_second)
                        window_start, window_steps = time.perf_counter(), 0
                    stopping = self._stop_requested()
                    if (
                        self.step % config.run.save_every_steps == 0
                        or end_of_epoch
                        or self.step == stop
                        or stopping
                    ):
                        self.save()
                    if stopping:
                        logger.warning(
                            "received %s: saved a checkpoint at step %d and stopped; run the "
                            "same command again to resume",
                            signal.Signals(self.stop_signals.received).name,
                            self.step,
                        )
                    if end_of_epoch or self.step >= stop or stopping:
                        break
        finally:
            self.stop_signals.restore()
            progress.close()
            self.metrics.close()
        logger.info("stopped at step %d (epoch %d)", self.step, self.epoch)
        stop_signal = self.stop_signals.received if self.step < stop else None
        return TrainResult(self.step, self.epoch, losses, self.last_checkpoint, stop_signal)
