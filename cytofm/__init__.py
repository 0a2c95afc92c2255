"""CytoFM: pretrain, load and evaluate Vision Transformer foundation models for cytology."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["load_backbone", "build_vit", "__version__"]

if TYPE_CHECKING:
    from cytofm.models.loading import load_backbone
    from cytofm.models.vit import build_vit


def __getattr__(name: str) -> Any:
    # Imported lazily so that `import cytofm` stays cheap and the command-line tools start fast.
    if name == "load_backbone":
        from cytofm.models.loading import load_backbone

        return load_backbone
    if name == "build_vit":
        from cytofm.models.vit import build_vit

        return build_vit
    raise AttributeError(f"module 'cytofm' has no attribute {name!r}")
