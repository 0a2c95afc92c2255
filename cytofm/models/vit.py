"""Vision Transformer backbone on top of timm's ``VisionTransformer``.

``CytoViT`` keeps timm's module tree and parameter names, so a state dict moves between
``CytoViT``, ``timm.create_model("vit_base_patch16_224", num_classes=0)`` and UNI without key
surgery. It adds what iBOT's student needs and what feature extraction needs:

- a learnable ``mask_token`` that replaces the embeddings of masked patches before position
  embeddings are added (the only parameter timm does not have);
- any input size that is a multiple of the patch size, square or not, with the position
  embedding resampled bicubically from the trained grid on every forward
  (timm's ``dynamic_img_size``);
- the CLS embedding from ``forward`` and all tokens (CLS, registers, patches) from
  ``forward_tokens``; the last block's attention from ``forward_with_attention``.

Without masks, ``forward_tokens`` runs exactly the operations of timm's ``forward_features``,
so outputs match timm bit for bit.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models._manipulate import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

logger = logging.getLogger(__name__)

# Width, depth and heads of the standard ViT sizes (Dosovitskiy et al. 2021, DeiT for tiny).
ARCHITECTURES: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}


@dataclass
class ViTSpec:
    """Everything needed to rebuild a backbone's architecture; stored in our checkpoints."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int = 16
    img_size: int | tuple[int, int] = 224
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_norm: bool = False
    init_values: float | None = None
    reg_tokens: int = 0
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        check_num_heads(self.num_heads, self.embed_dim)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if isinstance(self.img_size, tuple):
            data["img_size"] = list(self.img_size)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViTSpec:
        data = dict(data)
        if isinstance(data.get("img_size"), list):
            data["img_size"] = tuple(data["img_size"])
        return cls(**data)


def check_num_heads(num_heads: int, embed_dim: int) -> None:
    """Raise a ValueError unless ``num_heads`` is positive and divides the width ``embed_dim``.

    timm splits the width evenly across heads and otherwise fails with a bare assertion.
    """
    if num_heads >= 1 and embed_dim % num_heads == 0:
        return
    valid = [count for count in range(1, embed_dim + 1) if embed_dim % count == 0]
    raise ValueError(
        f"num_heads={num_heads} does not divide the width embed_dim={embed_dim}; each head "
        f"gets embed_dim / num_heads dimensions, so choose one of {valid}"
    )


class ImageSizeError(ValueError):
    """An image size that is not a positive multiple of the patch size."""

    def __init__(self, message: str, img_size: int | tuple[int, int], patch_size: int) -> None:
        super().__init__(message)
        self.img_size = img_size
        self.patch_size = patch_size


def check_img_size(img_size: int | tuple[int, int], patch_size: int, key: str = "img_size") -> None:
    """Raise an ImageSizeError unless every side of ``img_size`` is a multiple of the patch.

    Args:
        img_size: Side, or (height, width), in pixels.
        patch_size: Patch side in pixels.
        key: Name of the setting in the message, e.g. ``backbone.img_size``.
    """
    sides = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    bad = [side for side in sides if side < patch_size or side % patch_size]
    if not bad:
        return
    lower = max(patch_size, bad[0] // patch_size * patch_size)
    upper = lower + patch_size if bad[0] > lower else lower
    nearest = f"{lower} or {upper}" if upper != lower else str(lower)
    raise ImageSizeError(
        f"{key}={img_size} is not a multiple of the patch size {patch_size}; the image is cut "
        f"into {patch_size}x{patch_size} patches, so use e.g. {key}={nearest}",
        img_size,
        patch_size,
    )


class CytoViT(VisionTransformer):
    """timm Vision Transformer with a mask token and any-size inputs; see the module docstring."""

    def __init__(self, spec: ViTSpec, **timm_kwargs: Any) -> None:
        super().__init__(
            img_size=spec.img_size,
            patch_size=spec.patch_size,
            embed_dim=spec.embed_dim,
            depth=spec.depth,
            num_heads=spec.num_heads,
            mlp_ratio=spec.mlp_ratio,
            qkv_bias=spec.qkv_bias,
            qk_norm=spec.qk_norm,
            init_values=spec.init_values,
            reg_tokens=spec.reg_tokens,
            drop_path_rate=spec.drop_path_rate,
            num_classes=0,
            global_pool="token",
            dynamic_img_size=True,
            **timm_kwargs,
        )
        self.spec = spec
        self.patch_size = spec.patch_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, spec.embed_dim))

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, columns) of the trained position embedding."""
        return tuple(self.patch_embed.grid_size)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"expected images of shape [B, C, H, W], got {tuple(x.shape)}")
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size "
                f"{self.patch_size}; resize or crop the input first"
            )

    def _embed(self, x: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        self._check_input(x)
        x = self.patch_embed(x)  # [B, h, w, D] because dynamic_img_size is on
        if masks is not None:
            batch, rows, cols, _ = x.shape
            masks = masks.reshape(batch, rows, cols)
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x)

    def forward_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Embed images into all output tokens after the final norm.

        Args:
            x: Images ``[B, 3, H, W]`` with H and W multiples of the patch size.
            masks: Optional bool ``[B, h*w]`` or ``[B, h, w]``; True patches are replaced by
                ``mask_token`` before position embeddings are added.

        Returns:
            Tokens ``[B, num_prefix_tokens + h*w, D]``: CLS, registers, then patches in
            row-major order.
        """
        x = self._embed(x, masks)
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Return the CLS embedding ``[B, D]``."""
        return self.forward_tokens(x, masks)[:, 0]

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return all tokens and the last block's attention probabilities ``[B, heads, T, T]``."""
        x = self._embed(x, None)
        for block in self.blocks[:-1]:
            x = block(x)
        last = self.blocks[-1]
        attention = attention_probabilities(last.attn, last.norm1(x))
        x = last(x)
        return self.norm(x), attention


def attention_probabilities(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Compute a timm ``Attention`` layer's softmax attention ``[B, heads, T, T]`` for input x."""
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    return logits.float().softmax(dim=-1)


def build_vit(
    arch: str = "vit_small",
    *,
    patch_size: int = 16,
    img_size: int | tuple[int, int] = 224,
    drop_path_rate: float = 0.0,
    init_values: float | None = None,
    reg_tokens: int = 0,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    **spec_kwargs: Any,
) -> CytoViT:
    """Build a backbone from a preset name, optionally overriding its width, depth or heads.

    Args:
        arch: One of ``vit_tiny``, ``vit_small``, ``vit_base``, ``vit_large``.
        patch_size: Patch side in pixels (16 or 8 are usual).
        img_size: Training image size; it fixes the stored position-embedding grid.
        drop_path_rate: Stochastic depth rate of the last block (linear in depth).
        init_values: Layer-scale initial value (UNI uses 1e-5); None disables layer scale.
        reg_tokens: Number of register tokens.
        embed_dim, depth, num_heads: Override the preset.
        **spec_kwargs: Further ``ViTSpec`` fields (mlp_ratio, qkv_bias, qk_norm).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    preset_dim, preset_depth, preset_heads = ARCHITECTURES[arch]
    spec = ViTSpec(
        embed_dim=embed_dim or preset_dim,
        depth=depth or preset_depth,
        num_heads=num_heads or preset_heads,
        patch_size=patch_size,
        img_size=img_size,
        init_values=init_values,
        reg_tokens=reg_tokens,
        drop_path_rate=drop_path_rate,
        **spec_kwargs,
    )
    return CytoViT(spec)


def resample_pos_embed(
    pos_embed: torch.Tensor,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    num_prefix_tokens: int,
) -> torch.Tensor:
    """Resample a position embedding ``[1, prefix + h*w, D]`` to a new grid, bicubically."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    return resample_abs_pos_embed(
        pos_embed,
        new_size=list(new_grid),
        old_size=list(old_grid),
        num_prefix_tokens=num_prefix_tokens,
        interpolation="bicubic",
        antialias=True,
    )


def patch_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Return the patch grid (rows, columns) of an input of the given size."""
    return height // patch_size, width // patch_size


def pad_to_patch_multiple(x: torch.Tensor, patch_size: int, value: float = 0.0) -> torch.Tensor:
    """Pad images ``[B, C, H, W]`` on the right and bottom up to multiples of the patch size."""
    height, width = x.shape[-2:]
    pad_h = (-height) % patch_size
    pad_w = (-width) % patch_size
    if not pad_h and not pad_w:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h), value=value)
