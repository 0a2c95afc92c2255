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

import math

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
    # The normalisations run on logarithms: in the linear domain exp() of a large logit range
    # underflows whole rows to zero, and those images would silently drop out of the loss.
    log_weights = logits.detach().float() / temperature
    num_prototypes = log_weights.shape[1]
    total_rows = _all_reduce(log_weights.new_tensor([float(log_weights.shape[0])]))
    log_total_rows = torch.log(total_rows.clamp(min=1.0))
    log_prototypes = math.log(num_prototypes)
    for _ in range(iterations):
        log_weights = log_weights - (_global_logsumexp_over_rows(log_weights) + log_prototypes)
        log_weights = log_weights - (
            torch.logsumexp(log_weights, dim=1, keepdim=True) + log_total_rows
        )
    return torch.exp(log_weights + log_total_rows)


def _global_logsumexp_over_rows(log_weights: torch.Tensor) -> torch.Tensor:
    """Return ``[1, K]``: the log of each prototype's summed weight over the rows of all ranks."""
    if log_weights.shape[0]:
        local_max = log_weights.max(dim=0, keepdim=True).values
    else:
        local_max = log_weights.new_full((1, log_weights.shape[1]), float("-inf"))
    global_max = _all_reduce(local_max.clone(), dist.ReduceOp.MAX)
    # The maxima are -inf only when no rank has a row; zero keeps the arithmetic finite then.
    global_max = torch.where(torch.isfinite(global_max), global_max, torch.zeros_like(global_max))
    sums = _all_reduce(torch.exp(log_weights - global_max).sum(dim=0, keepdim=True))
    return global_max + torch.log(sums.clamp(min=1e-30))
