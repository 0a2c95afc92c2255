"""Teacher EMA update, optimizer parameter groups and the frozen last layer of the head."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Parameters whose last name component is one of these get no weight decay, whatever their
# shape: the learned tokens and position embeddings of a timm ViT, and the norm scale of a
# weight-normalised layer.
NO_DECAY_NAMES = ("cls_token", "reg_token", "mask_token", "pos_embed", "weight_g")

# Upper bound on the temporary buffer of ``update_teacher`` in elements (64 Mi floats, 256 MiB
# in float32), so that the update never doubles the memory of a large model.
_EMA_CHUNK_ELEMENTS = 1 << 26


@torch.no_grad()
def update_teacher(
    student_params: Iterable[torch.Tensor],
    teacher_params: Iterable[torch.Tensor],
    momentum: float,
) -> None:
    """Update the teacher in place: ``teacher = momentum * teacher + (1 - momentum) * student``.

    The result is bitwise equal to evaluating that formula with two multiplications and one
    addition per element. A fused ``add_(student, alpha=1 - momentum)`` would round differently
    because CPU and CUDA kernels use fused multiply-add. With ``momentum == 1`` the teacher
    stays exactly unchanged. The student terms are multiplied into temporary chunks of at most
    64 Mi elements, so extra memory stays bounded.

    Args:
        student_params: Student tensors, in the same order as ``teacher_params``.
        teacher_params: Teacher tensors, updated in place.
        momentum: EMA momentum in [0, 1].

    Raises:
        ValueError: If the momentum is outside [0, 1] or the lists differ in length or shape.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"teacher momentum must be in [0, 1], got {momentum}")
    students = [param.detach() for param in student_params]
    teachers = [param.detach() for param in teacher_params]
    if len(students) != len(teachers):
        raise ValueError(
            f"student has {len(students)} parameters but teacher has {len(teachers)}; "
            "build both from the same architecture"
        )
    for index, (student, teacher) in enumerate(zip(students, teachers)):
        if student.shape != teacher.shape:
            raise ValueError(
                f"parameter {index}: student shape {tuple(student.shape)} differs from teacher "
                f"shape {tuple(teacher.shape)}"
            )

    for start, stop in _chunks(teachers):
        teacher_chunk = teachers[start:stop]
        student_terms = torch._foreach_mul(students[start:stop], 1.0 - momentum)
        torch._foreach_mul_(teacher_chunk, momentum)
        torch._foreach_add_(teacher_chunk, student_terms)


def _chunks(tensors: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """Split a list of tensors into index ranges of at most ``_EMA_CHUNK_ELEMENTS`` elements."""
    ranges = []
    start = 0
    elements = 0
    for index, tensor in enumerate(tensors):
        if elements and elements + tensor.numel() > _EMA_CHUNK_ELEMENTS:
            ranges.append((start, index))
            start, elements = index, 0
        elements += tensor.numel()
    if start < len(tensors):
        ranges.append((start, len(tensors)))
    return ranges


def is_no_decay_parameter(name: str, param: torch.Tensor) -> bool:
    """Tell whether a parameter is excluded from weight decay.

    Biases, norm weights and any other 1-d parameter are excluded, and so are the names in
    ``NO_DECAY_NAMES`` (cls/register/mask tokens, position embeddings, weight-norm scales).
    """
    return param.ndim <= 1 or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split the trainable parameters of ``model`` into a decay and a no-decay group.

    Each group carries ``param_names`` (accepted by torch optimizers since 2.5 and kept in their
    state dict) and ``apply_weight_decay``, so a training loop that schedules weight decay sets
    ``group["weight_decay"]`` only where ``apply_weight_decay`` is true. Parameters with
    ``requires_grad=False`` (such as a fixed ``weight_g``) are left out. Empty groups are
    dropped.

    Args:
        model: Module whose ``named_parameters()`` are grouped, e.g. an ``nn.ModuleDict`` of the
            student backbone and head.
        weight_decay: Initial weight decay of the decay group.

    Returns:
        A list of param-group dicts for a torch optimizer.
    """
    decay: dict[str, list] = {"params": [], "param_names": []}
    no_decay: dict[str, list] = {"params": [], "param_names": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = no_decay if is_no_decay_parameter(name, param) else decay
        group["params"].append(param)
        group["param_names"].append(name)

    groups = [
        {**decay, "weight_decay": weight_decay, "apply_weight_decay": True},
        {**no_decay, "weight_decay": 0.0, "apply_weight_decay": False},
    ]
    return [group for group in groups if group["params"]]


def cancel_last_layer_gradients(head: nn.Module, epoch: int, freeze_last_layer_epochs: int) -> None:
    """Drop the gradients of the head's last layers during the first epochs.

    DINO and iBOT keep the output layer fixed for the first epoch (``--freeze_last_layer 1``),
    which helps the loss start to decrease. Call this between ``backward()`` and the optimizer
    step. Setting gradients to None makes AdamW skip the parameter entirely, so weight decay
    does not shrink it either.

    Args:
        head: Projection head; every parameter whose name contains ``last_layer`` (which also
            matches ``patch_last_layer``) is affected.
        epoch: Current epoch, counted from 0.
        freeze_last_layer_epochs: Number of epochs during which the last layers stay fixed.
    """
    if epoch >= freeze_last_layer_epochs:
        return
    for name, param in head.named_parameters():
        if "last_layer" in name:
            param.grad = None
