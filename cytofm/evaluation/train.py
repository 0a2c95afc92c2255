"""Training and inference of a bag-level head on padded batches of bags."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from cytofm.evaluation.abmil import pad_bags
from cytofm.evaluation.config import TrainConfig

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """Outcome of :func:`train_head`.

    Attributes:
        best_epoch: 1-based epoch with the lowest validation loss (its weights are loaded).
        best_val_loss: that loss.
        epochs_run: epochs trained before early stopping or the epoch limit.
        history: per epoch, ``{"train_loss", "val_loss"}``.
    """

    best_epoch: int
    best_val_loss: float
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)


def class_weights(labels: np.ndarray, num_classes: int) -> Tensor:
    """Inverse-frequency class weights ``n / (C * n_c)``; a class absent from ``labels`` gets 0."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.zeros(num_classes)
    present = counts > 0
    weights[present] = len(labels) / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


# Bags are sorted by size within windows of this many batches, so that a batch contains bags of
# similar size and padding wastes little compute.
BUCKET_BATCHES = 8


def _bucketed(
    positions: np.ndarray,
    lengths: np.ndarray,
    batch_size: int,
    generator: torch.Generator | None,
) -> list[np.ndarray]:
    """Split ``positions`` into batches of bags of similar size.

    With a generator the positions are shuffled first, each window of ``BUCKET_BATCHES``
    batches is sorted by size, and the batch order is shuffled again. Without one, all
    positions are sorted by size, for inference, where order does not matter.
    """
    if generator is None:
        order = np.argsort(lengths[positions], kind="stable")
        ordered = positions[order]
        return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    shuffled = positions[torch.randperm(len(positions), generator=generator).numpy()]
    window = batch_size * BUCKET_BATCHES
    batches = []
    for start in range(0, len(shuffled), window):
        chunk = shuffled[start : start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]


def iterate_batches(
    bags: Sequence[Tensor],
    positions: np.ndarray,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    max_instances: int | None = None,
) -> Iterator[tuple[np.ndarray, Tensor, Tensor]]:
    """Yield ``(positions, features [B, N, D], mask [B, N])`` batches of bags of similar size.

    With a ``generator`` the batches come in random order and bags larger than
    ``max_instances`` are randomly subsampled. Without one, every instance is used and each
    position appears once, in batches ordered by bag size.
    """
    lengths = np.array([len(bag) for bag in bags])
    for batch_positions in _bucketed(np.asarray(positions), lengths, batch_size, generator):
        batch = []
        for position in batch_positions:
            bag = bags[position]
            if generator is not None and max_instances is not None and len(bag) > max_instances:
                keep = torch.randperm(len(bag), generator=generator)[:max_instances]
                bag = bag[keep.to(bag.device)]
            batch.append(bag)
        features, mask = pad_bags(batch)
        yield batch_positions, features, mask


def _mean_loss(
    model: nn.Module,
    bags: Sequence[Tensor],
    labels: Tensor,
    positions: np.ndarray,
    criterion: nn.Module,
    batch_size: int,
    device: torch.device,
) -> float:
    """Loss over ``positions`` with every instance, weighted like the training loss."""
    model.eval()
    logits, order = [], []
    with torch.inference_mode():
        for batch_positions, features, mask in iterate_batches(bags, positions, batch_size):
            logits.append(model(features.to(device), mask.to(device)).logits.float())
            order.append(batch_positions)
        targets = labels[np.concatenate(order)].to(device)
        return float(criterion(torch.cat(logits), targets))


def train_head(
    model: nn.Module,
    bags: Sequence[Tensor],
    labels: np.ndarray,
    train_positions: np.ndarray,
    val_positions: np.ndarray,
    config: TrainConfig,
    *,
    num_classes: int,
    seed: int,
    device: torch.device,
    description: str = "",
) -> TrainResult:
    """Train ``model`` in place with AdamW and early stopping on the validation loss.

    The weights of the epoch with the lowest validation loss are loaded at the end. With
    ``config.class_weighted`` both losses weight each class by its inverse frequency in the
    training split. The batch order, the instance subsampling and dropout follow ``seed``.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout draws from the global generator of the device
    label_tensor = torch.as_tensor(labels, dtype=torch.long)
    weights = None
    if config.class_weighted:
        weights = class_weights(labels[train_positions], num_classes).to(device)
    criterion = nn.CrossEntropyLoss(weight=weights)
    model.to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )

    best_loss = math.inf
    best_state = copy.deepcopy(model.state_dict())
    best_epoch = 0
    history: list[dict[str, float]] = []
    progress = tqdm(range(config.epochs), desc=description or "epochs", leave=False, disable=None)
    for epoch in progress:
        model.train()
        total, count = 0.0, 0
        for batch_positions, features, mask in iterate_batches(
            bags,
            train_positions,
            config.batch_size,
            generator=generator,
            max_instances=config.max_instances,
        ):
            targets = label_tensor[batch_positions].to(device)
            output = model(features.to(device), mask.to(device))
            loss = criterion(output.logits.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch_positions)
            count += len(batch_positions)

        val_loss = _mean_loss(
            model, bags, label_tensor, val_positions, criterion, config.batch_size, device
        )
        history.append({"train_loss": total / count, "val_loss": val_loss})
        progress.set_postfix(train=f"{total / count:.3f}", val=f"{val_loss:.3f}")
        if val_loss < best_loss:
            best_loss, best_epoch = val_loss, epoch + 1
            best_state = copy.deepcopy(model.state_dict())
        elif epoch + 1 - best_epoch >= config.patience:
            break
    if not math.isfinite(best_loss):
        raise FloatingPointError(f"{description}: validation loss was never finite")

    model.load_state_dict(best_state)
    return TrainResult(best_epoch, best_loss, len(history), history)


def predict(
    model: nn.Module,
    bags: Sequence[Tensor],
    positions: np.ndarray,
    *,
    batch_size: int,
    device: torch.device,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Class probabilities ``[n, C]`` and per-bag attention weights for ``positions``.

    Every instance of every bag is used. Attention arrays have one weight per instance, in the
    order of the feature file.
    """
    model.eval()
    row_of = {int(position): row for row, position in enumerate(positions)}
    probabilities: list[np.ndarray] = [np.empty(0)] * len(positions)
    attention: list[np.ndarray] = [np.empty(0)] * len(positions)
    with torch.inference_mode():
        for batch_positions, features, mask in iterate_batches(bags, positions, batch_size):
            output = model(features.to(device), mask.to(device))
            batch_probabilities = torch.softmax(output.logits.float(), dim=1).cpu().numpy()
            weights = output.attention.float().cpu()
            for row, position in enumerate(batch_positions):
                row_of_bag = row_of[int(position)]
                probabilities[row_of_bag] = batch_probabilities[row]
                attention[row_of_bag] = weights[row, : len(bags[position])].numpy()
    return np.stack(probabilities), attention
