"""Bag-level heads over instance features: gated attention pooling (ABMIL) and mean pooling.

Both heads take a padded batch of bags, ``features`` ``[B, N, D]`` with a boolean ``mask``
``[B, N]`` (True = real instance), so many bags of different sizes go through one step.
Padded positions never influence the output: their attention weight is exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

HeadKind = Literal["abmil", "mean"]


@dataclass
class MILOutput:
    """Output of a bag-level head.

    Attributes:
        logits: ``[B, C]`` class scores before softmax.
        attention: ``[B, N]`` instance weights; each row sums to 1 over real instances and is
            0 on padding.
    """

    logits: Tensor
    attention: Tensor


def _check_mask(features: Tensor, mask: Tensor | None) -> Tensor:
    if features.ndim != 3:
        raise ValueError(f"features must be [B, N, D], got shape {tuple(features.shape)}")
    if mask is None:
        return torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
    if mask.shape != features.shape[:2]:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match features {tuple(features.shape[:2])}"
        )
    empty = ~mask.any(dim=1)
    if bool(empty.any()):
        positions = empty.nonzero().flatten().tolist()
        raise ValueError(f"bags at batch positions {positions} have no instances")
    return mask.bool()


class GatedAttentionMIL(nn.Module):
    """Gated attention MIL pooling (Ilse, Tomczak and Welling, ICML 2018, eq. 9).

    Each instance is embedded by ``Linear -> ReLU -> Dropout`` to ``hidden_dim``. Its score is
    ``w^T (tanh(V h) * sigmoid(U h))`` with ``V, U`` of size ``attention_dim``, softmax over
    the real instances of the bag gives the weights, and a linear classifier reads the
    weighted sum of the embeddings. Unlike the paper, dropout also acts on the gated
    attention features (as in CLAM), which regularises small cohorts.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        hidden_dim: int = 512,
        attention_dim: int = 256,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(hidden_dim, attention_dim)
        self.attention_u = nn.Linear(hidden_dim, attention_dim)
        self.attention_dropout = nn.Dropout(dropout)
        self.attention_w = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def forward(self, features: Tensor, mask: Tensor | None = None) -> MILOutput:
        """Pool each bag and classify it.

        Args:
            features: ``[B, N, D]`` instance features, padded along ``N``.
            mask: ``[B, N]`` bool, True for real instances; None means no padding.
        """
        mask = _check_mask(features, mask)
        hidden = self.embed(features)  # [B, N, H]
        gated = torch.tanh(self.attention_v(hidden)) * torch.sigmoid(self.attention_u(hidden))
        scores = self.attention_w(self.attention_dropout(gated)).squeeze(-1)  # [B, N]
        scores = scores.masked_fill(~mask, float("-inf"))
        attention = torch.softmax(scores, dim=1)

        # Zero the padded embeddings too, so that non-finite padding cannot leak in as 0 * nan.
        hidden = hidden.masked_fill(~mask.unsqueeze(-1), 0.0)
        pooled = torch.bmm(attention.unsqueeze(1), hidden).squeeze(1)  # [B, H]
        return MILOutput(logits=self.classifier(pooled), attention=attention)


class MeanPoolingMIL(nn.Module):
    """Baseline head: the mean of the instance features, then dropout and a linear classifier.

    Its ``attention`` is uniform (``1 / n`` on the real instances), so it has the same output
    format as :class:`GatedAttentionMIL` and shows what learned attention adds.
    """

    def __init__(self, in_dim: int, num_classes: int, *, dropout: float = 0.25) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_dim, num_classes)

    def forward(self, features: Tensor, mask: Tensor | None = None) -> MILOutput:
        """Average the real instances of each bag and classify the mean."""
        mask = _check_mask(features, mask)
        weights = mask.to(features.dtype)
        attention = weights / weights.sum(dim=1, keepdim=True)
        features = features.masked_fill(~mask.unsqueeze(-1), 0.0)
        pooled = torch.bmm(attention.unsqueeze(1), features).squeeze(1)  # [B, D]
        return MILOutput(logits=self.classifier(self.dropout(pooled)), attention=attention)


class StandardizedHead(nn.Module):
    """A head that first z-scores each feature with a fixed mean and standard deviation.

    The statistics are buffers, so they travel with the state dict. Padded positions become
    ``-mean / std`` instead of 0, which the heads ignore because they mask padding.
    """

    def __init__(self, head: nn.Module, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.head = head
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("std", std.float().clamp_min(1e-6).clone())

    def forward(self, features: Tensor, mask: Tensor | None = None) -> MILOutput:
        """Standardise ``features [B, N, D]`` and apply the wrapped head."""
        return self.head((features - self.mean) / self.std, mask)


def feature_statistics(bags: list[Tensor], positions: list[int]) -> tuple[Tensor, Tensor]:
    """Per-feature mean and standard deviation ``[D]`` over all instances of some bags.

    Sums are accumulated bag by bag in float64, so no concatenated copy of the bags is made.
    """
    total, total_squares, count = None, None, 0
    for position in positions:
        bag = bags[position].double()
        bag_sum, bag_squares = bag.sum(dim=0), (bag * bag).sum(dim=0)
        total = bag_sum if total is None else total + bag_sum
        total_squares = bag_squares if total_squares is None else total_squares + bag_squares
        count += bag.shape[0]
    if total is None or total_squares is None or count == 0:
        raise ValueError("feature_statistics needs at least one instance")
    mean = total / count
    variance = (total_squares / count - mean * mean).clamp_min(0.0)
    return mean.float(), variance.sqrt().float()


def build_mil_head(
    kind: HeadKind,
    in_dim: int,
    num_classes: int,
    *,
    hidden_dim: int = 512,
    attention_dim: int = 256,
    dropout: float = 0.25,
) -> nn.Module:
    """Build a bag-level head by name: ``abmil`` (gated attention) or ``mean`` (mean pooling)."""
    if kind == "abmil":
        return GatedAttentionMIL(
            in_dim,
            num_classes,
            hidden_dim=hidden_dim,
            attention_dim=attention_dim,
            dropout=dropout,
        )
    if kind == "mean":
        return MeanPoolingMIL(in_dim, num_classes, dropout=dropout)
    raise ValueError(f"unknown MIL head {kind!r}, expected 'abmil' or 'mean'")


def pad_bags(bags: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack bags of different sizes into ``features [B, N_max, D]`` and ``mask [B, N_max]``.

    Padding is zeros and the mask is False there.
    """
    if not bags:
        raise ValueError("pad_bags needs at least one bag")
    lengths = torch.tensor([bag.shape[0] for bag in bags])
    features = nn.utils.rnn.pad_sequence(bags, batch_first=True)
    mask = torch.arange(features.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    return features, mask.to(features.device)
