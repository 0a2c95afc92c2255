"""Student and teacher networks of iBOT: a ViT backbone plus a projection head.

Both networks run the head only on the tokens the loss uses: the CLS token of every crop and
the patch tokens at masked positions of the global crops. Global crops are stacked into one
batch, and local crops of the same size into another, so each size costs one backbone pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
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
    ) -> NetworkOutput:
        """Run the backbone on all crops and the head on CLS and masked patch tokens.

        Args:
            global_crops: ``[n_global * B, 3, H, W]``, crop-major.
            masks: bool ``[n_global * B, h * w]``; the tokens at True positions go through
                the patch head.
            local_crops: Batches of local crops, one tensor per crop size (student only).
            mask_inputs: Replace masked patches by the mask token before the backbone (the
                student). The teacher passes False: it sees whole images, and ``masks`` only
                selects its target tokens.

        Returns:
            The head outputs and the detached CLS embeddings of the global crops.
        """
        tokens = self.backbone.forward_tokens(global_crops, masks if mask_inputs else None)
        prefix = self.backbone.num_prefix_tokens
        cls_tokens = [tokens[:, 0]]
        masked_patches = tokens[:, prefix:][masks]  # [M, D]
        for crops in local_crops or []:
            cls_tokens.append(self.backbone.forward_tokens(crops)[:, 0])
        cls_logits, patch_logits = self.head(torch.cat(cls_tokens), masked_patches)
        return NetworkOutput(cls_logits, patch_logits, tokens[:, 0].detach())


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
