"""Projection heads of DINO and iBOT: an MLP, an L2-normalised bottleneck, a prototype layer.

State-dict keys, stable across versions:

- ``mlp.<i>.weight`` and ``mlp.<i>.bias``: the ``nn.Sequential`` trunk. With ``use_bn=False``
  and ``nlayers=3`` the linear layers sit at indices 0, 2 and 4 (GELU between them). With
  ``use_bn=True`` a ``BatchNorm1d`` follows each hidden linear layer, so they sit at 0, 3, 6.
- ``last_layer.weight_g`` ``[out_dim, 1]`` and ``last_layer.weight_v`` ``[out_dim,
  bottleneck_dim]``: the weight-normalised prototype layer, ``weight = weight_g * weight_v /
  ||weight_v||`` with the norm taken per output row. These are the names DINO and iBOT
  checkpoints use (``torch.nn.utils.weight_norm``).
- ``patch_last_layer.weight_g`` and ``patch_last_layer.weight_v``: the patch prototype layer of
  an ``IBOTHead`` built with ``shared=False``. iBOT calls it ``last_layer2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """Linear layer without bias whose rows are ``weight_g * weight_v / ||weight_v||``.

    Written by hand rather than with ``torch.nn.utils.parametrizations.weight_norm``, whose
    state-dict keys (``parametrizations.weight.original0``) differ from DINO and iBOT
    checkpoints.

    Args:
        in_features: Input size.
        out_features: Output size (number of prototypes).
        fix_norm: Keep ``weight_g`` at 1 and out of training (``requires_grad=False``), so every
            prototype has unit norm.
    """

    def __init__(self, in_features: int, out_features: int, fix_norm: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=not fix_norm)
        nn.init.trunc_normal_(self.weight_v, std=0.02)

    @property
    def weight(self) -> torch.Tensor:
        """Effective weight ``[out_features, in_features]``."""
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        fixed = not self.weight_g.requires_grad
        return f"in_features={self.in_features}, out_features={self.out_features}, fix_norm={fixed}"


def _build_mlp(
    in_dim: int, hidden_dim: int, bottleneck_dim: int, nlayers: int, use_bn: bool
) -> nn.Sequential:
    if nlayers < 1:
        raise ValueError(f"nlayers must be at least 1, got {nlayers}")
    if nlayers == 1:
        return nn.Sequential(nn.Linear(in_dim, bottleneck_dim))

    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(nlayers - 1):
        layers.append(nn.Linear(width, hidden_dim))
        if use_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.GELU())
        width = hidden_dim
    layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    return nn.Sequential(*layers)


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ProjectionHead(nn.Module):
    """DINO projection head: MLP with GELU, L2-normalised bottleneck, weight-normalised layer.

    Args:
        in_dim: Input size (the backbone's embed_dim).
        out_dim: Number of prototypes (output logits).
        hidden_dim: Width of the hidden layers.
        bottleneck_dim: Width of the L2-normalised bottleneck.
        nlayers: Number of linear layers in the MLP, the bottleneck layer included.
        norm_last_layer: Fix the norm of every prototype to 1 (``weight_g`` not trained).
            iBOT recommends True for ViT-B and larger and False for ViT-S.
        use_bn: Add ``BatchNorm1d`` after each hidden linear layer.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
        use_bn: bool = False,
    ) -> None:
        super().__init__()
        if min(in_dim, out_dim, hidden_dim, bottleneck_dim) < 1:
            raise ValueError(
                f"head sizes must be positive, got in_dim={in_dim}, out_dim={out_dim}, "
                f"hidden_dim={hidden_dim}, bottleneck_dim={bottleneck_dim}"
            )
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.bottleneck_dim = bottleneck_dim
        self.mlp = _build_mlp(in_dim, hidden_dim, bottleneck_dim, nlayers, use_bn)
        self.mlp.apply(_init_linear)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_norm=norm_last_layer)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[N, in_dim]`` tokens to L2-normalised bottleneck features ``[N, bottleneck]``."""
        x = self.mlp(x)
        # Normalise in float32: under fp16 autocast the squared norm of a 256-d vector can
        # overflow or underflow. The next linear layer casts back to the autocast dtype.
        return F.normalize(x.float(), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[N, in_dim]`` tokens to ``[N, out_dim]`` logits."""
        return self.last_layer(self.bottleneck(x))


class IBOTHead(ProjectionHead):
    """iBOT head: one MLP trunk for CLS and patch tokens, with one or two prototype layers.

    As in iBOT, the MLP is always shared. ``shared=True`` also shares the prototype layer
    (``patch_out_dim`` must equal ``out_dim``), and ``shared=False`` adds a separate
    ``patch_last_layer``. The head is meant to run only on the tokens the loss uses: the CLS
    tokens of all crops and the patch tokens at masked positions of the global crops. The
    reference iBOT code runs its 8192-way head on every patch token of every crop instead.
    ``forward`` takes both kinds of tokens and runs the trunk once on their concatenation.

    Args:
        in_dim: Input size (the backbone's embed_dim).
        out_dim: Number of CLS prototypes.
        patch_out_dim: Number of patch prototypes.
        shared: Share the prototype layer between CLS and patch tokens.
        hidden_dim, bottleneck_dim, nlayers, norm_last_layer, use_bn: As in
            ``ProjectionHead``.

    Raises:
        ValueError: If ``shared`` is True and ``patch_out_dim != out_dim``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        patch_out_dim: int,
        shared: bool = True,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
        use_bn: bool = False,
    ) -> None:
        super().__init__(
            in_dim, out_dim, hidden_dim, bottleneck_dim, nlayers, norm_last_layer, use_bn
        )
        if shared and patch_out_dim != out_dim:
            raise ValueError(
                f"a shared head needs patch_out_dim == out_dim, got {patch_out_dim} and "
                f"{out_dim}; set shared=False for separate patch prototypes"
            )
        self.patch_out_dim = patch_out_dim
        self.shared = shared
        self.patch_last_layer: WeightNormLinear | None = None
        if not shared:
            self.patch_last_layer = WeightNormLinear(
                bottleneck_dim, patch_out_dim, fix_norm=norm_last_layer
            )

    def _patch_prototypes(self) -> WeightNormLinear:
        return self.last_layer if self.patch_last_layer is None else self.patch_last_layer

    def forward_cls(self, x: torch.Tensor) -> torch.Tensor:
        """Map CLS tokens ``[N, in_dim]`` to ``[N, out_dim]`` logits."""
        return self.last_layer(self.bottleneck(x))

    def forward_patch(self, x: torch.Tensor) -> torch.Tensor:
        """Map patch tokens ``[M, in_dim]`` to ``[M, patch_out_dim]`` logits."""
        return self._patch_prototypes()(self.bottleneck(x))

    def forward(
        self, cls_tokens: torch.Tensor, patch_tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Map CLS tokens ``[N, D]`` and patch tokens ``[M, D]`` with one pass through the trunk.

        With BatchNorm in the trunk (``use_bn=True``) the statistics then mix both kinds of
        tokens, which iBOT also does when it applies the head to all tokens together.

        Returns:
            ``(cls_logits [N, out_dim], patch_logits [M, patch_out_dim])``, with
            ``patch_logits`` None when ``patch_tokens`` is None.
        """
        if patch_tokens is None:
            return self.forward_cls(cls_tokens), None

        num_cls = cls_tokens.shape[0]
        features = self.bottleneck(torch.cat([cls_tokens, patch_tokens], dim=0))
        if self.patch_last_layer is None:
            logits = self.last_layer(features)
            return logits[:num_cls], logits[num_cls:]
        cls_logits = self.last_layer(features[:num_cls])
        patch_logits = self.patch_last_layer(features[num_cls:])
        return cls_logits, patch_logits
