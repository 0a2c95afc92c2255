"""Student and teacher networks of iBOT: a ViT backbone plus a projection head.

Both networks compute outputs only for the tokens the loss uses: the CLS token of every crop
and the patch tokens at masked positions of the global crops. The head runs on those tokens
alone, and so does the second half of the backbone's last block (see
``forward_selected_tokens``). Global crops are stacked into one batch, and local crops of the
same size into another, so each size costs one backbone pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Attention, DropPath
from timm.models._manipulate import checkpoint_seq
from timm.models.vision_transformer import Block
from torch import nn

from cytofm.models.vit import CytoViT, build_vit
from cytofm.pretrain.config import HeadConfig, ModelConfig
from cytofm.pretrain.heads import IBOTHead


@dataclass
class NetworkOutput:
    """Head outputs of one network for one step.

    Attributes:
        cls_logits: ``[N, out_dim]`` for the CLS tokens, global crops first (crop-major: all
            images of crop 0, then crop 1, ...), then local crops for the student.
        patch_logits: ``[M, patch_out_dim]`` for the masked patches of the global crops, in
            the order of ``masks.nonzero()``.
        cls_embeddings: ``[n_global * B, D]`` backbone CLS embeddings of the global crops,
            detached, for collapse monitoring.
    """

    cls_logits: torch.Tensor
    patch_logits: torch.Tensor
    cls_embeddings: torch.Tensor


class IBOTNetwork(nn.Module):
    """Backbone plus iBOT head; used for the student and, without gradients, the teacher.

    Args:
        backbone: ViT with ``forward_tokens(x, masks)`` and ``num_prefix_tokens``.
        head: iBOT head applied to CLS and masked patch tokens in one pass.
    """

    def __init__(self, backbone: CytoViT, head: IBOTHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(
        self,
        global_crops: torch.Tensor,
        masks: torch.Tensor,
        local_crops: list[torch.Tensor] | None = None,
        mask_inputs: bool = True,
        mask_index: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> NetworkOutput:
        """Run the backbone on all crops and the head on CLS and masked patch tokens.

        Args:
            global_crops: ``[n_global * B, 3, H, W]``, crop-major.
            masks: bool ``[n_global * B, h * w]``; the tokens at True positions go through
                the patch head.
            local_crops: Batches of local crops, one tensor per crop size (student only).
            mask_inputs: Replace masked patches by the mask token before the backbone (the
                student). The teacher passes False because its input is the whole image, and
                ``masks`` only selects its target tokens.
            mask_index: ``masks.nonzero(as_tuple=True)`` if already known; passing it avoids
                a host-device synchronisation on GPU.

        Returns:
            The head outputs and the detached CLS embeddings of the global crops.
        """
        num_images = global_crops.shape[0]
        device = global_crops.device
        if mask_index is None:
            mask_index = masks.nonzero(as_tuple=True)
        image_index, patch_index = mask_index
        prefix = self.backbone.num_prefix_tokens
        rows = torch.cat([torch.arange(num_images, device=device), image_index])
        columns = torch.cat([torch.zeros_like(rows[:num_images]), patch_index + prefix])
        # [n_global * B + M, D]: CLS tokens first, then masked patches in masks.nonzero() order.
        selected = forward_selected_tokens(
            self.backbone, global_crops, masks if mask_inputs else None, rows, columns
        )
        cls_tokens = [selected[:num_images]]
        for crops in local_crops or []:
            cls_rows = torch.arange(crops.shape[0], device=device)
            cls_tokens.append(
                forward_selected_tokens(
                    self.backbone, crops, None, cls_rows, torch.zeros_like(cls_rows)
                )
            )
        cls_logits, patch_logits = self.head(torch.cat(cls_tokens), selected[num_images:])
        return NetworkOutput(cls_logits, patch_logits, selected[:num_images].detach())


def forward_selected_tokens(
    backbone: CytoViT,
    images: torch.Tensor,
    masks: torch.Tensor | None,
    rows: torch.Tensor,
    columns: torch.Tensor,
) -> torch.Tensor:
    """Compute the backbone's final tokens at positions ``(rows, columns)`` only.

    Equal to ``backbone.forward_tokens(images, masks)[rows, columns]``, but the last block
    runs its output projection and MLP only on the requested tokens, since no other token of
    the last block is read. Every token still enters the last block's attention as key and
    value. Training reads the CLS token of every crop and the masked tokens of the global
    crops, so this saves most of the last block's cost.

    Args:
        backbone: The ViT.
        images: ``[B, 3, H, W]``.
        masks: Optional bool ``[B, h * w]`` passed to the patch embedding (mask token).
        rows: ``[N]`` image index of each requested token.
        columns: ``[N]`` token index (0 is CLS, patches start at ``num_prefix_tokens``).

    Returns:
        ``[N, D]`` tokens after the final norm.
    """
    last = backbone.blocks[-1]
    if not _is_plain_block(last):
        return backbone.forward_tokens(images, masks)[rows, columns]

    # CytoViT._embed is the patch embedding, mask token and position embedding of
    # forward_tokens; calling it keeps both paths identical up to the last block.
    x = backbone._embed(images, masks)
    earlier = backbone.blocks[:-1]
    if backbone.grad_checkpointing and backbone.training and not torch.jit.is_scripting():
        x = checkpoint_seq(earlier, x)
    else:
        x = earlier(x)

    attention = last.attn
    batch, tokens, _ = x.shape
    qkv = attention.qkv(last.norm1(x))
    qkv = qkv.reshape(batch, tokens, 3, attention.num_heads, attention.head_dim)
    query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    query, key = attention.q_norm(query), attention.k_norm(key)
    dropout = attention.attn_drop.p if attention.training else 0.0
    # [B, heads, T, head_dim] -> [N, heads * head_dim] at the requested tokens
    attended = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout)
    attended = attended.transpose(1, 2)[rows, columns].flatten(1)
    attended = attention.proj_drop(attention.proj(attention.norm(attended)))

    selected = x[rows, columns]
    selected = selected + _drop_path_factor(last.drop_path1, batch, x, rows) * last.ls1(attended)
    update = last.ls2(last.mlp(last.norm2(selected)))
    selected = selected + _drop_path_factor(last.drop_path2, batch, x, rows) * update
    return backbone.norm(selected)


def _is_plain_block(block: nn.Module) -> bool:
    """True for timm's standard pre-norm ``Block`` with plain ``Attention`` (no gate)."""
    return (
        type(block) is Block
        and type(block.attn) is Attention
        and getattr(block.attn, "gate", None) is None
    )


def _drop_path_factor(
    drop_path: nn.Module, batch: int, like: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor | float:
    """Per-token factor of timm's ``DropPath`` (one draw per image), gathered by ``rows``."""
    if not isinstance(drop_path, DropPath) or not drop_path.training or not drop_path.drop_prob:
        return 1.0
    keep = 1.0 - drop_path.drop_prob
    factor = like.new_empty(batch, 1).bernoulli_(keep)
    if drop_path.scale_by_keep:
        factor.div_(keep)
    return factor[rows]


def build_backbone(config: ModelConfig, *, drop_path_rate: float | None = None) -> CytoViT:
    """Build the ViT backbone of ``config`` (``drop_path_rate`` overrides the config's)."""
    return build_vit(
        config.arch,
        patch_size=config.patch_size,
        img_size=config.img_size,
        drop_path_rate=config.drop_path_rate if drop_path_rate is None else drop_path_rate,
        init_values=config.init_values,
        reg_tokens=config.reg_tokens,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
    )


def build_head(config: HeadConfig, embed_dim: int) -> IBOTHead:
    """Build the iBOT projection head for a backbone of width ``embed_dim``."""
    return IBOTHead(
        embed_dim,
        config.out_dim,
        config.patch_out_dim,
        shared=config.shared,
        hidden_dim=config.hidden_dim,
        bottleneck_dim=config.bottleneck_dim,
        nlayers=config.num_layers,
        norm_last_layer=config.norm_last_layer,
        use_bn=config.use_bn,
    )


def build_student_teacher(
    model_config: ModelConfig, head_config: HeadConfig
) -> tuple[IBOTNetwork, IBOTNetwork]:
    """Build the student and a teacher that starts as its exact copy and takes no gradients.

    The teacher has no stochastic depth; it only runs forward passes and follows the student
    by EMA.
    """
    student_backbone = build_backbone(model_config)
    student = IBOTNetwork(student_backbone, build_head(head_config, student_backbone.embed_dim))
    teacher_backbone = build_backbone(model_config, drop_path_rate=0.0)
    teacher = IBOTNetwork(teacher_backbone, build_head(head_config, teacher_backbone.embed_dim))
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return student, teacher


def backbone_arguments(model_config: ModelConfig, backbone: CytoViT) -> dict[str, Any]:
    """Return the ``build_vit`` arguments that rebuild ``backbone`` (stored in checkpoints)."""
    spec = backbone.spec
    return {
        "arch": model_config.arch,
        "patch_size": spec.patch_size,
        "img_size": spec.img_size if isinstance(spec.img_size, int) else list(spec.img_size),
        "embed_dim": spec.embed_dim,
        "depth": spec.depth,
        "num_heads": spec.num_heads,
        "init_values": spec.init_values,
        "reg_tokens": spec.reg_tokens,
        "mlp_ratio": spec.mlp_ratio,
        "qkv_bias": spec.qkv_bias,
        "qk_norm": spec.qk_norm,
    }
