"""iBOT loss: self-distillation on CLS tokens plus masked image modelling on patch tokens.

The formula follows ``iBOTLoss`` in ``main_ibot.py`` of bytedance/ibot:

- CLS term: for every global view ``q`` of the teacher and every student view ``v != q``, the
  cross-entropy ``-sum_k p_t(q)_k log p_s(v)_k`` averaged over the batch. Here
  ``p_t = softmax((teacher - center) / teacher_temp)`` and
  ``p_s = softmax(student / student_temp)``. The pairs are then averaged.
- Patch term: for each global view and image, the cross-entropy at each masked token is
  summed and divided by the number of masked tokens of that image (clamped to at least 1).
  This is averaged over all images of the view, so an image without masked tokens contributes
  0 and still counts in the mean, as in iBOT. The views are then averaged.
- ``total = cls_weight * cls + patch_weight * patch`` (iBOT's ``lambda1`` and ``lambda2``).

Where this module differs from bytedance/ibot:

- Patch logits come only at masked positions, as ``[M, K']`` with an image index per row,
  instead of ``[B, N, K']`` for every token with a mask multiplied in. The sums are the same.
  lightly's ``IBOTPatchLoss`` (``lightly/loss/ibot_loss.py``) takes the same masked-only input
  and weights each token by one over its image's masked count, as here.
- The patch centre is the mean of the teacher's patch logits at masked positions, as in
  lightly, where iBOT averages over all patch tokens of the global crops. Both estimate the
  mean teacher output per token. Across ranks the mean is weighted by each rank's token count,
  and a step without masked tokens anywhere leaves the patch centre unchanged.
- The centre is updated by a separate ``update_center`` call, not inside ``forward``.
- The CLS sum over pairs is computed as (sum over teacher views) x (sum over student views)
  minus the same-view terms. That is algebraically equal to iBOT's double loop and avoids
  materialising every pair.
- Teacher temperatures are arguments of ``forward``, so the schedule lives outside the loss.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cytofm.pretrain.sinkhorn import sinkhorn_knopp


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class IBOTLoss(nn.Module):
    """iBOT loss with centring buffers for the teacher's CLS and patch outputs.

    Buffers (in the state dict, so a checkpoint restores them): ``center [1, out_dim]`` and
    ``patch_center [1, patch_out_dim]``, both starting at zero.

    Args:
        out_dim: Number of CLS prototypes.
        patch_out_dim: Number of patch prototypes.
        num_global_crops: Global crops per image (teacher views).
        num_local_crops: Local crops per image (seen by the student only).
        cls_weight: Weight of the CLS term.
        patch_weight: Weight of the patch term.
        center_momentum: EMA momentum of ``center``.
        patch_center_momentum: EMA momentum of ``patch_center``.
        centering: ``ema`` subtracts the running centres before the teacher softmax (iBOT);
            ``sinkhorn_knopp`` balances the teacher targets over the global batch instead
            (DINOv2, see ``cytofm.pretrain.sinkhorn``). The centres are updated either way,
            for monitoring.
        sinkhorn_iterations: Normalisation rounds of ``sinkhorn_knopp``.
    """

    center: torch.Tensor
    patch_center: torch.Tensor

    def __init__(
        self,
        out_dim: int,
        patch_out_dim: int,
        num_global_crops: int,
        num_local_crops: int,
        cls_weight: float = 1.0,
        patch_weight: float = 1.0,
        center_momentum: float = 0.9,
        patch_center_momentum: float = 0.9,
        centering: Literal["ema", "sinkhorn_knopp"] = "ema",
        sinkhorn_iterations: int = 3,
    ) -> None:
        super().__init__()
        if centering not in ("ema", "sinkhorn_knopp"):
            raise ValueError(f"centering must be 'ema' or 'sinkhorn_knopp', got {centering!r}")
        if num_global_crops < 1 or num_local_crops < 0:
            raise ValueError(
                f"need at least one global crop and no negative local crop count, got "
                f"num_global_crops={num_global_crops}, num_local_crops={num_local_crops}"
            )
        if num_global_crops + num_local_crops < 2:
            raise ValueError("the CLS term needs at least two crops per image")
        self.out_dim = out_dim
        self.patch_out_dim = patch_out_dim
        self.num_global_crops = num_global_crops
        self.num_local_crops = num_local_crops
        self.cls_weight = cls_weight
        self.patch_weight = patch_weight
        self.center_momentum = center_momentum
        self.patch_center_momentum = patch_center_momentum
        self.centering = centering
        self.sinkhorn_iterations = sinkhorn_iterations
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("patch_center", torch.zeros(1, patch_out_dim))

    @property
    def num_crops(self) -> int:
        """Crops per image seen by the student."""
        return self.num_global_crops + self.num_local_crops

    def teacher_probabilities(
        self, teacher_logits: torch.Tensor, teacher_temp: float, *, patch: bool = False
    ) -> torch.Tensor:
        """Centre and sharpen teacher logits into float32 probabilities.

        With Sinkhorn-Knopp centring this runs collectives, so under torch.distributed every
        rank must call it at the same step.

        Args:
            teacher_logits: ``[N, K]`` CLS logits, or ``[M, K']`` patch logits with
                ``patch=True``.
            teacher_temp: Teacher temperature.
            patch: Use ``patch_center`` instead of ``center``.

        Returns:
            ``softmax((teacher_logits - centre) / teacher_temp)`` in float32, detached, or the
            Sinkhorn-Knopp targets of ``teacher_logits`` (see ``centering``).
        """
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_logits, teacher_temp, self.sinkhorn_iterations)
        center = self.patch_center if patch else self.center
        logits = teacher_logits.detach().float()
        return F.softmax((logits - center) / teacher_temp, dim=-1)

    def forward(
        self,
        student_cls: torch.Tensor,
        student_patch: torch.Tensor,
        teacher_cls: torch.Tensor,
        teacher_patch: torch.Tensor,
        mask_image_index: torch.Tensor,
        num_masked_per_image: torch.Tensor,
        student_temp: float,
        teacher_temp: float,
        teacher_patch_temp: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """Compute the iBOT loss in float32, also under autocast.

        Args:
            student_cls: ``[num_crops * B, K]`` student CLS logits, crop-major (all images of
                crop 0, then crop 1, ...; global crops first).
            student_patch: ``[M, K']`` student patch logits at the masked positions of the
                global crops.
            teacher_cls: ``[num_global_crops * B, K]`` teacher CLS logits, crop-major.
            teacher_patch: ``[M, K']`` teacher patch logits at the same positions as
                ``student_patch``.
            mask_image_index: ``[M]`` index in ``[0, num_global_crops * B)`` of the global-crop
                image each masked token belongs to.
            num_masked_per_image: ``[num_global_crops * B]`` masked-token count per image.
            student_temp: Student temperature (iBOT: 0.1).
            teacher_temp: Teacher temperature of the CLS term.
            teacher_patch_temp: Teacher temperature of the patch term; ``teacher_temp`` when
                None.

        Returns:
            ``{"total", "cls", "patch"}``: scalar float32 tensors. Only ``total`` is meant for
            ``backward()``.

        Raises:
            ValueError: If the shapes do not match each other or the crop counts.
        """
        if teacher_patch_temp is None:
            teacher_patch_temp = teacher_temp
        batch_size = self._check_shapes(
            student_cls,
            student_patch,
            teacher_cls,
            teacher_patch,
            mask_image_index,
            num_masked_per_image,
        )

        with torch.autocast(device_type=student_cls.device.type, enabled=False):
            cls_loss = self._cls_term(
                student_cls.float(), teacher_cls.float(), batch_size, student_temp, teacher_temp
            )
            patch_loss = self._patch_term(
                student_patch.float(),
                teacher_patch.float(),
                mask_image_index,
                num_masked_per_image,
                student_temp,
                teacher_patch_temp,
            )
        total = self.cls_weight * cls_loss + self.patch_weight * patch_loss
        return {"total": total, "cls": cls_loss, "patch": patch_loss}

    def _cls_term(
        self,
        student_cls: torch.Tensor,
        teacher_cls: torch.Tensor,
        batch_size: int,
        student_temp: float,
        teacher_temp: float,
    ) -> torch.Tensor:
        num_global = self.num_global_crops
        # [views, B, K]
        student_log_probs = F.log_softmax(student_cls / student_temp, dim=-1)
        student_log_probs = student_log_probs.view(self.num_crops, batch_size, -1)
        teacher_probs = self.teacher_probabilities(teacher_cls, teacher_temp)
        teacher_probs = teacher_probs.view(num_global, batch_size, -1)

        # Sum over all (q, v) pairs of <p_t(q), log p_s(v)>, minus the pairs with v == q.
        # [B]
        all_pairs = (teacher_probs.sum(0) * student_log_probs.sum(0)).sum(-1)
        same_view = (teacher_probs * student_log_probs[:num_global]).sum(-1).sum(0)
        num_pairs = num_global * self.num_crops - num_global
        return -(all_pairs - same_view).mean() / num_pairs

    def _patch_term(
        self,
        student_patch: torch.Tensor,
        teacher_patch: torch.Tensor,
        mask_image_index: torch.Tensor,
        num_masked_per_image: torch.Tensor,
        student_temp: float,
        teacher_patch_temp: float,
    ) -> torch.Tensor:
        # [M]
        student_log_probs = F.log_softmax(student_patch / student_temp, dim=-1)
        teacher_probs = self.teacher_probabilities(teacher_patch, teacher_patch_temp, patch=True)
        token_loss = -(teacher_probs * student_log_probs).sum(-1)

        # [num_global * B]: per-image sum over masked tokens, divided by the image's count.
        num_images = num_masked_per_image.shape[0]
        per_image = token_loss.new_zeros(num_images).index_add(0, mask_image_index, token_loss)
        per_image = per_image / num_masked_per_image.to(per_image.dtype).clamp(min=1.0)
        # Every view has B images, so the mean over views of per-view means is this mean.
        return per_image.mean()

    def _check_shapes(
        self,
        student_cls: torch.Tensor,
        student_patch: torch.Tensor,
        teacher_cls: torch.Tensor,
        teacher_patch: torch.Tensor,
        mask_image_index: torch.Tensor,
        num_masked_per_image: torch.Tensor,
    ) -> int:
        if teacher_cls.ndim != 2 or teacher_cls.shape[0] % self.num_global_crops:
            raise ValueError(
                f"teacher_cls must be [num_global_crops * B, K] with num_global_crops="
                f"{self.num_global_crops}, got {tuple(teacher_cls.shape)}"
            )
        batch_size = teacher_cls.shape[0] // self.num_global_crops
        if student_cls.shape != (self.num_crops * batch_size, teacher_cls.shape[1]):
            raise ValueError(
                f"student_cls must be [{self.num_crops} crops * {batch_size} images, "
                f"{teacher_cls.shape[1]}], got {tuple(student_cls.shape)}"
            )
        if student_patch.ndim != 2 or student_patch.shape != teacher_patch.shape:
            raise ValueError(
                f"student_patch and teacher_patch must both be [M, K'], got "
                f"{tuple(student_patch.shape)} and {tuple(teacher_patch.shape)}"
            )
        if mask_image_index.shape != (student_patch.shape[0],):
            raise ValueError(
                f"mask_image_index must be [M] = [{student_patch.shape[0]}], got "
                f"{tuple(mask_image_index.shape)}"
            )
        if num_masked_per_image.shape != (teacher_cls.shape[0],):
            raise ValueError(
                f"num_masked_per_image must be [num_global_crops * B] = [{teacher_cls.shape[0]}], "
                f"got {tuple(num_masked_per_image.shape)}"
            )
        return batch_size

    @torch.no_grad()
    def update_center(self, teacher_cls: torch.Tensor, teacher_patch: torch.Tensor) -> None:
        """Update both centres with an EMA of the batch means of the teacher logits.

        ``center = m * center + (1 - m) * mean(teacher_cls)``, and the same for
        ``patch_center`` with the masked-token logits. Under torch.distributed the means are
        taken over all ranks with an all-reduce, weighted by each rank's row count. When no
        rank has a masked token, ``patch_center`` stays unchanged. Every rank must call this
        method at the same step because it runs collectives.

        Args:
            teacher_cls: ``[num_global_crops * B, K]`` raw teacher CLS logits.
            teacher_patch: ``[M, K']`` raw teacher patch logits at masked positions.
        """
        teacher_cls = teacher_cls.detach().float()
        teacher_patch = teacher_patch.detach().float()

        counts = torch.tensor(
            [teacher_cls.shape[0], teacher_patch.shape[0]],
            dtype=torch.float32,
            device=teacher_cls.device,
        )
        # One flat buffer, so a single all-reduce carries both sums and both counts.
        buffer = torch.cat([teacher_cls.sum(0), teacher_patch.sum(0), counts])
        if _distributed():
            dist.all_reduce(buffer)
        cls_sum, patch_sum, counts = buffer.split([self.out_dim, self.patch_out_dim, 2])
        cls_sum = cls_sum.unsqueeze(0)
        patch_sum = patch_sum.unsqueeze(0)

        cls_mean = cls_sum / counts[0]
        self.center.mul_(self.center_momentum).add_(cls_mean * (1.0 - self.center_momentum))

        patch_mean = patch_sum / counts[1].clamp(min=1.0)
        updated = self.patch_center * self.patch_center_momentum + patch_mean * (
            1.0 - self.patch_center_momentum
        )
        # torch.where rather than an if on counts[1], so no host-device sync happens on GPU.
        self.patch_center.copy_(torch.where(counts[1] > 0, updated, self.patch_center))
