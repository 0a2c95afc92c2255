"""Sinkhorn-Knopp centring: against a direct formula, its balance, and across gloo ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cytofm.config import ConfigError
from cytofm.pretrain.config import load_pretrain_config
from cytofm.pretrain.loss import IBOTLoss
from cytofm.pretrain.sinkhorn import sinkhorn_knopp


def _reference(logits: np.ndarray, temperature: float, iterations: int) -> np.ndarray:
    """Sinkhorn-Knopp written out as in the DINOv2 paper, in float64 without stabilisation."""
    q = np.exp(logits / temperature).T  # [K, N]
    num_prototypes, num_rows = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(axis=1, keepdims=True) / num_prototypes
        q = q / q.sum(axis=0, keepdims=True) / num_rows
    return (q * num_rows).T


@pytest.mark.parametrize("iterations", [1, 3])
def test_sinkhorn_matches_direct_formula(iterations):
    logits = torch.randn(12, 5, generator=torch.Generator().manual_seed(0))
    result = sinkhorn_knopp(logits, temperature=0.1, iterations=iterations)
    expected = _reference(logits.double().numpy(), 0.1, iterations)
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_sinkhorn_rows_sum_to_one_and_prototypes_balance():
    # A teacher that prefers prototype 0 for every image.
    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    logits[:, 0] += 2.0
    result = sinkhorn_knopp(logits, temperature=0.5, iterations=50)
    torch.testing.assert_close(result.sum(1), torch.ones(64))
    torch.testing.assert_close(result.sum(0), torch.full((8,), 64 / 8), rtol=1e-3, atol=1e-3)
    assert torch.softmax(logits / 0.5, dim=1)[:, 0].mean() > 0.5  # softmax alone keeps the bias


def test_sinkhorn_equal_outputs_give_uniform_targets():
    # A collapsed teacher: every image has the same logits.
    logits = torch.randn(1, 6, generator=torch.Generator().manual_seed(2)).repeat(10, 1)
    result = sinkhorn_knopp(logits, temperature=0.04)
    torch.testing.assert_close(result, torch.full((10, 6), 1 / 6))


def test_sinkhorn_survives_large_logits():
    logits = torch.tensor([[300.0, 0.0], [0.0, 300.0]])
    result = sinkhorn_knopp(logits, temperature=0.04)
    assert torch.isfinite(result).all()
    torch.testing.assert_close(result, torch.eye(2))


def test_sinkhorn_wide_logit_range_keeps_every_row():
    # A logit range of about 20 / 0.04 = 500 underflows exp() in float32 for whole rows.
    logits = 3 * torch.randn(32, 16, generator=torch.Generator().manual_seed(4))
    result = sinkhorn_knopp(logits, temperature=0.04)
    torch.testing.assert_close(result.sum(1), torch.ones(32))
    expected = _reference(logits.double().numpy(), 0.04, 3)
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-4, atol=1e-6)


def test_sinkhorn_rejects_bad_input():
    with pytest.raises(ValueError, match=r"logits must be \[N, K\]"):
        sinkhorn_knopp(torch.zeros(3), 0.1)
    with pytest.raises(ValueError, match="iterations must be at least 1"):
        sinkhorn_knopp(torch.zeros(2, 2), 0.1, iterations=0)


def _rank_logits(rank: int) -> torch.Tensor:
    # Rank 0 has five rows, rank 1 none, rank 2 three: ranks may hold no masked token.
    rows = {0: 5, 1: 0, 2: 3}[rank]
    return torch.randn(rows, 4, generator=torch.Generator().manual_seed(10 + rank))


def _run_rank(rank: int, world_size: int, init_file: str, result_prefix: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        torch.save(sinkhorn_knopp(_rank_logits(rank), 0.2), f"{result_prefix}{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sinkhorn_across_ranks_equals_global_batch(tmp_path):
    prefix = str(tmp_path / "rank")
    mp.spawn(_run_rank, args=(3, str(tmp_path / "init"), prefix), nprocs=3, join=True)
    gathered = torch.cat([torch.load(f"{prefix}{rank}.pt") for rank in range(3)])
    full = sinkhorn_knopp(torch.cat([_rank_logits(rank) for rank in range(3)]), 0.2)
    assert gathered.shape == (8, 4)
    torch.testing.assert_close(gathered, full)


def test_loss_with_sinkhorn_uses_balanced_targets():
    generator = torch.Generator().manual_seed(3)
    teacher_cls = torch.randn(4, 6, generator=generator)  # 2 global crops x 2 images
    teacher_patch = torch.randn(5, 6, generator=generator)
    loss = IBOTLoss(6, 6, num_global_crops=2, num_local_crops=1, centering="sinkhorn_knopp")
    torch.testing.assert_close(
        loss.teacher_probabilities(teacher_cls, 0.07), sinkhorn_knopp(teacher_cls, 0.07)
    )
    torch.testing.assert_close(
        loss.teacher_probabilities(teacher_patch, 0.07, patch=True),
        sinkhorn_knopp(teacher_patch, 0.07),
    )
    with pytest.raises(ValueError, match="centering must be 'ema' or 'sinkhorn_knopp'"):
        IBOTLoss(6, 6, num_global_crops=2, num_local_crops=1, centering="kmeans")


def test_config_selects_sinkhorn(tmp_path):
    config = load_pretrain_config(None, ["loss.centering=sinkhorn_knopp"])
    assert config.loss.centering == "sinkhorn_knopp"
    with pytest.raises(ConfigError, match="loss.sinkhorn_iterations must be at least 1, got 0"):
        load_pretrain_config(None, ["loss.sinkhorn_iterations=0"])
