"""Sinkhorn-Knopp centring of teacher outputs, the alternative to EMA centring used by DINOv2.

EMA centring subtracts a running mean from the teacher logits before the softmax. Sinkhorn-Knopp
instead turns the logits of a whole batch into targets by alternately normalising the
prototype sums and the sample sums of ``exp(logits / temperature)``. Every row is then a
distribution over prototypes, and every prototype receives about the same total mass over the
batch. A teacher whose outputs are equal for all images therefore gets uniform targets, so the
student cannot lower the loss by collapsing to one prototype.

Under torch.distributed the batch is the global one: the sums run over the rows of every rank
through all-reduces, so every rank must call ``sinkhorn_knopp`` at the same step, also when it
has no rows (possible for masked patch tokens).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=op)
    return tensor


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temperature: float, iterations: int = 3) -> torch.Tensor:
    """Return Sinkhorn-Knopp targets for ``[N, K]`` teacher logits, in float32.

    Each output row sums to 1. Each prototype's total over the rows of all ranks is close to
    ``N_total / K``, where ``N_total`` counts those rows; more iterations bring it closer.

    Args:
        logits: ``[N, K]`` raw teacher logits (no centring).
        temperature: Teacher temperature; the logits are divided by it before ``exp``.
        iterations: Number of prototype-then-sample normalisation rounds (DINOv2 uses 3).

    Raises:
        ValueError: ``logits`` is not two-dimensional, or ``iterations`` is below 1.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, K], got shape {tuple(logits.shape)}")
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    scaled = logits.detach().float() / temperature
    num_prototypes = scaled.shape[1]

    # Subtracting the global maximum keeps exp() finite and cancels in the normalisation.
    local_max = scaled.max() if scaled.numel() else scaled.new_tensor(float("-inf"))
    global_max = _all_reduce(local_max.reshape(1).clone(), dist.ReduceOp.MAX)
    weights = torch.exp(scaled - global_max).t()  # [K, N]
    total_rows = _all_reduce(scaled.new_tensor([float(scaled.shape[0])])).clamp(min=1.0)

    weights /= _all_reduce(weights.sum().reshape(1)).clamp(min=1e-30)
    for _ in range(iterations):
        prototype_sums = _all_reduce(weights.sum(dim=1, keepdim=True))
        weights /= prototype_sums.clamp(min=1e-30) * num_prototypes
        weights /= weights.sum(dim=0, keepdim=True).clamp(min=1e-30) * total_rows
    return (weights * total_rows).t()
