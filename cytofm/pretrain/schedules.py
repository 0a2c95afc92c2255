"""Per-step schedules for learning rate, weight decay, teacher momentum and temperature.

Every schedule is a pure function of the global optimizer step, so a resumed run only needs
the step counter. DINO and iBOT instead build numpy arrays of one value per step at start-up
and index into them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

REFERENCE_BATCH_SIZE = 256


def cosine_schedule(
    step: int,
    total_steps: int,
    base: float,
    final: float,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
) -> float:
    """Compute a cosine schedule with an optional linear warmup at ``step``.

    Steps ``0 .. warmup_steps - 1`` rise linearly from ``warmup_start`` towards ``base``. Step
    ``warmup_steps`` is exactly ``base``, and the cosine decays to exactly ``final`` at the last
    step, ``total_steps - 1``. Later steps stay at ``final``.

    Args:
        step: Global optimizer step, counted from 0.
        total_steps: Number of optimizer steps in the whole run.
        base: Value at the end of the warmup (the peak for a decaying schedule).
        final: Value at the last step.
        warmup_steps: Length of the linear warmup in steps.
        warmup_start: Value at step 0 when ``warmup_steps > 0``.

    Returns:
        The scheduled value.

    Raises:
        ValueError: If ``step`` or ``warmup_steps`` is negative or ``total_steps`` is below 1.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be at least 1, got {total_steps}")
    if step < 0 or warmup_steps < 0:
        raise ValueError(f"step and warmup_steps must be >= 0, got {step} and {warmup_steps}")

    if step < warmup_steps:
        return warmup_start + (base - warmup_start) * step / warmup_steps

    decay_steps = total_steps - 1 - warmup_steps
    if decay_steps <= 0 or step >= total_steps - 1:
        # The last step is exactly ``final``, also when the warmup fills the whole run.
        return final
    progress = (step - warmup_steps) / decay_steps
    # Written so that progress 0 gives exactly ``base``.
    return base + (final - base) * 0.5 * (1.0 - math.cos(math.pi * progress))


def linear_warmup_then_constant(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Rise linearly from ``start`` to ``end`` over ``warmup_steps``, then stay at ``end``.

    Used for the teacher temperature: iBOT goes from 0.04 to 0.07 over the first 30 epochs. iBOT
    changes the value once per epoch, while this function changes it every step.

    Raises:
        ValueError: If ``step`` or ``warmup_steps`` is negative.
    """
    if step < 0 or warmup_steps < 0:
        raise ValueError(f"step and warmup_steps must be >= 0, got {step} and {warmup_steps}")
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


def scale_learning_rate(
    base_lr: float, global_batch_size: int, reference_batch_size: int = REFERENCE_BATCH_SIZE
) -> float:
    """Apply the linear scaling rule: ``base_lr * global_batch_size / reference_batch_size``.

    ``base_lr`` is the learning rate for 256 images per step (the DINO and iBOT convention, where
    ``--lr 0.0005`` is given for a reference batch of 256). ``global_batch_size`` counts images
    per optimizer step over all ranks and accumulation steps, not crops.

    Raises:
        ValueError: If a batch size is not positive.
    """
    if global_batch_size < 1 or reference_batch_size < 1:
        raise ValueError(
            f"batch sizes must be positive, got global_batch_size={global_batch_size} and "
            f"reference_batch_size={reference_batch_size}"
        )
    return base_lr * global_batch_size / reference_batch_size


@dataclass(frozen=True)
class ScheduleValues:
    """Values of every schedule at one step."""

    lr: float
    weight_decay: float
    teacher_momentum: float
    teacher_temp: float
    teacher_patch_temp: float


@dataclass(frozen=True)
class Schedules:
    """All pretraining schedules, evaluated per optimizer step.

    Defaults follow the iBOT ViT-B recipe, with lengths given in steps. Build it with
    ``Schedules.from_epochs`` to give lengths in epochs, as the recipe does.

    Attributes:
        total_steps: Optimizer steps in the whole run.
        lr: Peak learning rate, already scaled for the global batch (see
            ``scale_learning_rate``).
        min_lr: Learning rate at the last step.
        lr_warmup_steps: Linear warmup from 0 to ``lr``.
        weight_decay: Weight decay at step 0 (cosine, no warmup).
        weight_decay_end: Weight decay at the last step.
        teacher_momentum: EMA momentum of the teacher at step 0 (cosine, no warmup).
        teacher_momentum_end: EMA momentum at the last step.
        teacher_temp_start: Teacher temperature of the CLS term at step 0.
        teacher_temp: Teacher temperature of the CLS term after the warmup.
        teacher_patch_temp_start: Teacher temperature of the patch term at step 0.
        teacher_patch_temp: Teacher temperature of the patch term after the warmup.
        teacher_temp_warmup_steps: Length of the linear temperature warmups.
    """

    total_steps: int
    lr: float
    min_lr: float = 1e-6
    lr_warmup_steps: int = 0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    teacher_momentum: float = 0.996
    teacher_momentum_end: float = 1.0
    teacher_temp_start: float = 0.04
    teacher_temp: float = 0.07
    teacher_patch_temp_start: float = 0.04
    teacher_patch_temp: float = 0.07
    teacher_temp_warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be at least 1, got {self.total_steps}")
        if self.lr_warmup_steps < 0 or self.teacher_temp_warmup_steps < 0:
            raise ValueError("warmup lengths must be >= 0")

    @classmethod
    def from_epochs(
        cls,
        *,
        epochs: int,
        steps_per_epoch: int,
        lr: float,
        lr_warmup_epochs: float = 10,
        teacher_temp_warmup_epochs: float = 30,
        **values: float,
    ) -> Schedules:
        """Build schedules whose lengths are given in epochs.

        Args:
            epochs: Length of the run in epochs.
            steps_per_epoch: Optimizer steps per epoch.
            lr: Peak learning rate, already scaled for the global batch.
            lr_warmup_epochs: Learning-rate warmup in epochs (iBOT: 10).
            teacher_temp_warmup_epochs: Temperature warmup in epochs (iBOT: 30).
            **values: Any other field of ``Schedules`` except the step counts.

        Raises:
            ValueError: If ``epochs`` or ``steps_per_epoch`` is not positive.
        """
        if epochs < 1 or steps_per_epoch < 1:
            raise ValueError(
                f"epochs and steps_per_epoch must be positive, got {epochs} and {steps_per_epoch}"
            )
        return cls(
            total_steps=epochs * steps_per_epoch,
            lr=lr,
            lr_warmup_steps=round(lr_warmup_epochs * steps_per_epoch),
            teacher_temp_warmup_steps=round(teacher_temp_warmup_epochs * steps_per_epoch),
            **values,
        )

    def __call__(self, step: int) -> ScheduleValues:
        """Evaluate every schedule at the global optimizer ``step``."""
        last = self.total_steps
        return ScheduleValues(
            lr=cosine_schedule(step, last, self.lr, self.min_lr, self.lr_warmup_steps, 0.0),
            weight_decay=cosine_schedule(step, last, self.weight_decay, self.weight_decay_end),
            teacher_momentum=cosine_schedule(
                step, last, self.teacher_momentum, self.teacher_momentum_end
            ),
            teacher_temp=linear_warmup_then_constant(
                step, self.teacher_temp_warmup_steps, self.teacher_temp_start, self.teacher_temp
            ),
            teacher_patch_temp=linear_warmup_then_constant(
                step,
                self.teacher_temp_warmup_steps,
                self.teacher_patch_temp_start,
                self.teacher_patch_temp,
            ),
        )
