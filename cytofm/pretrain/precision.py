"""Mixed-precision policy: autocast dtype and gradient scaler for a run."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Literal

import torch

logger = logging.getLogger(__name__)

PrecisionName = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class PrecisionPolicy:
    """Resolved precision of a run.

    Attributes:
        name: ``fp32``, ``bf16`` or ``fp16`` (``auto`` already resolved).
        device_type: ``cuda`` or ``cpu``, as ``torch.autocast`` expects.
    """

    name: Literal["fp32", "bf16", "fp16"]
    device_type: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype matrix products run in under autocast, or None for fp32."""
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.name]

    def autocast(self) -> contextlib.AbstractContextManager:
        """Return the autocast context for forward passes (a no-op context for fp32)."""
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=dtype)

    def make_grad_scaler(self) -> torch.amp.GradScaler:
        """Return a gradient scaler, enabled only for fp16 (bf16 and fp32 need no scaling)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")


def resolve_precision(name: PrecisionName, device: torch.device) -> PrecisionPolicy:
    """Resolve ``auto`` and check that the requested precision suits the device.

    ``auto`` is bf16 on CUDA devices that support it, fp16 on older CUDA devices, and fp32 on
    CPU.

    Raises:
        ValueError: ``name`` is unknown, or fp16 was requested on CPU (CPU autocast has no
            fp16 gradient scaling path worth using).
    """
    if name not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"invalid precision {name!r}: expected auto, fp32, bf16 or fp16")
    device_type = device.type
    if name == "auto":
        if device_type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            name = "fp32"
    if name == "fp16" and device_type != "cuda":
        raise ValueError("run.precision fp16 needs a CUDA device; use fp32 or bf16 on CPU")
    logger.info("precision: %s on %s", name, device_type)
    return PrecisionPolicy(name=name, device_type=device_type)
