"""IBOTLoss.update_center across two gloo ranks with different masked-token counts."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cytofm.pretrain.loss import IBOTLoss

OUT_DIM, PATCH_DIM = 4, 3


def rank_inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(rank)
    teacher_cls = torch.randn(6, OUT_DIM, generator=generator)
    # Rank 0 has five masked tokens, rank 1 has one.
    teacher_patch = torch.randn(5 if rank == 0 else 1, PATCH_DIM, generator=generator)
    return teacher_cls, teacher_patch


def run_rank(rank: int, world_size: int, init_file: str, result_file: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        loss = IBOTLoss(OUT_DIM, PATCH_DIM, num_global_crops=2, num_local_crops=1)
        loss.update_center(*rank_inputs(rank))
        if rank == 0:
            torch.save(loss.state_dict(), result_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_update_center_weights_ranks_by_count(tmp_path):
    result_file = tmp_path / "centers.pt"
    mp.spawn(
        run_rank,
        args=(2, str(tmp_path / "init"), str(result_file)),
        nprocs=2,
        join=True,
    )
    state = torch.load(result_file)

    inputs = [rank_inputs(rank) for rank in range(2)]
    all_cls = torch.cat([cls for cls, _ in inputs])
    all_patch = torch.cat([patch for _, patch in inputs])
    torch.testing.assert_close(state["center"], 0.1 * all_cls.mean(0, keepdim=True))
    torch.testing.assert_close(state["patch_center"], 0.1 * all_patch.mean(0, keepdim=True))
