"""Process-group set-up for single-process, ``torchrun`` and multi-node runs.

``torchrun`` (single node or multi-node through its rendezvous) sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; without them the run is one process. NCCL is used when
the run is on CUDA, gloo otherwise.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the run.

    Attributes:
        rank: global rank of this process.
        world_size: number of processes in the run.
        local_rank: rank on this node; selects the CUDA device.
        device: device this process trains on.
        initialized_here: True when ``init_distributed`` created the process group, so
            ``shutdown`` should destroy it.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        """True on rank 0, which writes checkpoints, logs and TensorBoard events."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when more than one process trains."""
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistributedContext:
    """Initialise the process group from the ``torchrun`` environment, if there is one.

    Args:
        device: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``.

    Returns:
        The context of this process.

    Raises:
        ValueError: ``device`` is unknown, or ``cuda`` was requested on a machine without CUDA.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"invalid device {device!r}: expected auto, cpu or cuda")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("run.device is cuda but no CUDA device is available; use auto or cpu")

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    if use_cuda:
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")

    initialized_here = False
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        init_kwargs = {"device_id": torch_device} if use_cuda else {}
        dist.init_process_group(backend=backend, **init_kwargs)
        initialized_here = True
        logger.info("process group ready: backend %s, rank %d of %d", backend, rank, world_size)
    return DistributedContext(rank, world_size, local_rank, torch_device, initialized_here)


def shutdown(context: DistributedContext) -> None:
    """Destroy the process group if ``init_distributed`` created it."""
    if context.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistributedContext) -> None:
    """Wait until every process reaches this point (no-op for one process)."""
    if context.is_distributed:
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Return the element-wise mean of ``tensor`` over all processes (a new tensor)."""
    result = tensor.detach().clone()
    if context.is_distributed:
        dist.all_reduce(result, op=dist.ReduceOp.SUM)
        result /= context.world_size
    return result


def any_rank(flag: bool, context: DistributedContext) -> bool:
    """Return True on every process if ``flag`` is True on at least one of them."""
    if not context.is_distributed:
        return flag
    tensor = torch.tensor([float(flag)], device=context.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)
