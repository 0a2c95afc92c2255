"""Feature extraction: run an extractor over the tiles of every bag and store the features.

Worker processes decode and transform tiles and pack them into batches that may span bag
boundaries, so every batch is full except the last one of each worker.
The main process runs the model and writes each bag's file as soon as its last tile is
embedded. Bags whose file already exists are skipped, so an interrupted run resumes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from cytofm.config import to_dict
from cytofm.data.bags import BagConfig, build_bags
from cytofm.data.decode import ImageDecodeError
from cytofm.evaluation.extractors import (
    BackboneConfig,
    Extractor,
    Precision,
    build_extractor,
    default_feature_set_name,
)
from cytofm.evaluation.feature_store import (
    FEATURE_FORMAT,
    FEATURE_FORMAT_VERSION,
    IndexRow,
    load_bag_features,
    read_meta,
    safe_file_name,
    save_bag_features,
    write_index,
    write_meta,
)
from cytofm.evaluation.weights_identity import describe_identity, weights_differ

logger = logging.getLogger(__name__)


class Bag(Protocol):
    """Interface of a bag for extraction; ``cytofm.data.bags.BagSpec`` implements it."""

    bag_id: str
    label: str | None
    group: str | None
    split: str | None

    def iter_instances(self) -> Iterator[tuple[Any, tuple[int, int, int, int]]]: ...


def default_num_workers() -> int:
    """Return 4, or fewer when this process may use fewer CPUs (its affinity mask)."""
    if hasattr(os, "sched_getaffinity"):
        cpus = len(os.sched_getaffinity(0))
    else:
        cpus = os.cpu_count() or 1
    return max(0, min(4, cpus))


@dataclass
class ExtractConfig:
    """Config of ``cytofm-extract``.

    Attributes:
        bags: where the bags come from and how they are tiled.
        backbone: the model or descriptor that embeds the tiles.
        out: root folder; features go to ``out/<name>/``.
        name: feature set name; None derives it from the backbone (file stem, ``random-…``,
            ``handcrafted``).
        batch_size: tiles per forward pass; it does not change the features.
        num_workers: processes that decode and transform tiles (0 runs them in the main
            process); the default is 4, or the number of CPUs this process may use if lower.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: autocast on CUDA: ``auto`` (bf16 where supported, else fp16), ``bf16``,
            ``fp16`` or ``fp32``. CPU always runs in fp32.
        patch_tokens: also store every tile's patch tokens ``[N, h*w, D]`` (large: ``h*w``
            times the size of the embeddings).
        overwrite: delete the feature set's earlier feature files and index, then extract
            every bag again.
        num_threads: torch intra-op CPU threads of the main process; None keeps torch's
            default.
    """

    bags: BagConfig = field(default_factory=BagConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    out: Path = Path("outputs/features")
    name: str | None = None
    batch_size: int = 64
    num_workers: int = field(default_factory=default_num_workers)
    device: str = "auto"
    precision: Precision = "auto"
    patch_tokens: bool = False
    overwrite: bool = False
    num_threads: int | None = None


class _TileBatches(IterableDataset):
    """Transformed tiles of a list of bags, packed into batches by each worker.

    Yields dicts with ``images [b, 3, H, W]`` (or None), ``positions [b]`` (bag position of
    each tile), ``coords [b, 4]`` and ``finished``: ``(position, tile count)`` of the bags
    whose last tile is in this batch or an earlier one. Worker ``w`` of ``n`` takes the bags
    ``w::n``; tiles of one bag stay in order.

    A bag that cannot be read ends the worker with a dict ``{"error": message}`` after the
    bags finished before it. The main process raises it, so the message stays one line
    instead of the worker traceback that DataLoader would wrap around an exception.
    """

    def __init__(self, bags: Sequence[Bag], todo: list[int], transform: Any, batch_size: int):
        self.bags = bags
        self.todo = todo
        self.transform = transform
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        mine = self.todo if worker is None else self.todo[worker.id :: worker.num_workers]
        images: list[Tensor] = []
        positions: list[int] = []
        boxes: list[tuple[int, int, int, int]] = []
        finished: list[tuple[int, int]] = []

        def flush() -> dict[str, Any]:
            batch = {
                "images": torch.stack(images) if images else None,
                "positions": torch.tensor(positions, dtype=torch.long),
                "coords": torch.tensor(boxes, dtype=torch.long).reshape(-1, 4),
                "finished": list(finished),
            }
            for pending in (images, positions, boxes, finished):
                pending.clear()
            return batch

        for position in mine:
            bag = self.bags[position]
            count = 0
            try:
                for image, box in bag.iter_instances():
                    tensor = self.transform(image)
                    if images and tensor.shape != images[0].shape:
                        yield flush()  # tiles of another size start a new batch
                    images.append(tensor)
                    positions.append(position)
                    boxes.append(tuple(int(value) for value in box))
                    count += 1
                    if len(images) == self.batch_size:
                        yield flush()
            except (OSError, ValueError, ImageDecodeError) as error:
                # Drop the failed bag's pending tiles (the last ones) and deliver the bags
                # finished before it, so that they are written and a rerun skips them.
                while positions and positions[-1] == position:
                    for pending in (images, positions, boxes):
                        pending.pop()
                if images or finished:
                    yield flush()
                yield {"error": unreadable_bag_message(bag.bag_id, error)}
                return
            finished.append((position, count))
        if images or finished:
            yield flush()


def unreadable_bag_message(bag_id: str, error: BaseException) -> str:
    """Return the error message for a bag whose image or tile cannot be read."""
    return (
        f"reading bag {bag_id!r} failed: {error}. Fix or replace the file, or remove the bag "
        "from the labels CSV (bags.labels_csv) or the image from its folder; the evaluation "
        "needs every bag, so none is skipped. Bags already extracted are kept, and the same "
        "command resumes from the next bag"
    )


@dataclass
class _BagBuffer:
    embeddings: list[Tensor] = field(default_factory=list)
    coords: list[Tensor] = field(default_factory=list)
    tokens: list[Tensor] = field(default_factory=list)
    grids: set[tuple[int, int]] = field(default_factory=set)


def _write_bag(bag: Bag, buffer: _BagBuffer, path: Path, embed_dim: int) -> int:
    if not buffer.embeddings:
        # An empty bag is written and indexed, so the run completes and a resumed run does not
        # retry it; cytofm-eval-mil raises on it, naming the bag.
        logger.warning(
            "bag %r has no instances: every tile was background or the image is smaller than "
            "a tile. Raise bags.background_threshold or leave the bag out of the labels",
            bag.bag_id,
        )
        empty = torch.zeros(0, embed_dim)
        save_bag_features(path, empty, torch.zeros(0, 4, dtype=torch.long))
        return 0
    features = torch.cat(buffer.embeddings)
    if not bool(torch.isfinite(features).all()):
        bad = int((~torch.isfinite(features)).any(dim=1).sum())
        raise FloatingPointError(
            f"bag {bag.bag_id!r}: {bad} of {len(features)} tiles have non-finite features; "
            "check the checkpoint, or use precision=fp32"
        )
    tokens = None
    extra: dict[str, Tensor] = {}
    if buffer.tokens:
        if len(buffer.grids) != 1:
            raise ValueError(
                f"bag {bag.bag_id!r}: patch tokens need tiles of one size, got patch grids "
                f"{sorted(buffer.grids)}; set backbone.resize=true"
            )
        tokens = torch.cat(buffer.tokens)
        if not bool(torch.isfinite(tokens).all()):
            raise FloatingPointError(f"bag {bag.bag_id!r}: non-finite patch tokens")
        extra["patch_grid"] = torch.tensor(buffer.grids.pop(), dtype=torch.long)
    save_bag_features(path, features, torch.cat(buffer.coords), tokens, extra=extra)
    return len(features)


HANDCRAFTED_BACKBONE_KEYS = ("source", "img_size")
"""Backbone settings that the handcrafted descriptor reads. The others configure a ViT."""

_NOT_RECORDED = object()


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    """Flatten nested dicts into ``{"a.b": value}``, keeping other values as leaves."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def feature_settings(meta: dict[str, Any]) -> dict[str, Any]:
    """Return the settings of ``meta.json`` that change the features, under dotted keys.

    For ``backbone.source=handcrafted`` only the backbone keys of
    ``HANDCRAFTED_BACKBONE_KEYS`` count, and ``precision`` does not, because the descriptor
    runs without autocast.
    """
    backbone = dict(meta.get("backbone") or {})
    settings: dict[str, Any] = {
        "bags": meta.get("bags"),
        "patch_tokens": meta.get("patch_tokens"),
        "precision": meta.get("precision"),
    }
    if backbone.get("source") == "handcrafted":
        backbone = {key: backbone[key] for key in HANDCRAFTED_BACKBONE_KEYS if key in backbone}
        del settings["precision"]
    settings["backbone"] = backbone
    # A JSON round trip gives the types that meta.json stores (lists for tuples, str for Path).
    return _flatten(json.loads(json.dumps(settings, default=str)), "")


def describe_setting_changes(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """List ``key: old -> new`` for each feature setting that differs between two meta.json."""
    old, new = feature_settings(previous), feature_settings(current)
    changes = []
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key, _NOT_RECORDED), new.get(key, _NOT_RECORDED)
        if before != after:
            changes.append(f"{key}: {_show_setting(before)} -> {_show_setting(after)}")
    return changes


def _show_setting(value: Any) -> str:
    if value is _NOT_RECORDED:
        return "(not recorded)"
    return json.dumps(value, default=str)


def check_feature_settings(folder: str | Path, meta: dict[str, Any]) -> None:
    """Raise a ValueError naming each setting in which ``meta`` differs from ``meta.json``.

    Does nothing when ``folder`` has no ``meta.json`` yet.
    """
    path = Path(folder) / "meta.json"
    if not path.is_file():
        return
    changes = describe_setting_changes(read_meta(path), meta)
    if changes:
        listed = "; ".join(changes[:8])
        more = f"; and {len(changes) - 8} more" if len(changes) > 8 else ""
        raise ValueError(
            f"{folder} contains features of another configuration ({path} records other "
            f"values: {listed}{more}); choose another name= or out=, or pass overwrite=true "
            "to extract again"
        )


def _check_meta(folder: Path, meta: dict[str, Any], overwrite: bool) -> None:
    path = folder / "meta.json"
    if overwrite or not path.is_file():
        return
    check_feature_settings(folder, meta)
    previous = read_meta(path)
    old, new = previous.get("weights"), meta.get("weights")
    if old is None or new is None:
        logger.warning(
            "%s does not record the identity of its weights, so resuming cannot check that "
            "the bags already extracted used the same weights; pass overwrite=true if unsure",
            path,
        )
        return
    if weights_differ(old, new):
        raise ValueError(
            f"{folder} contains features of other weights: they were extracted with "
            f"{describe_identity(old)}, but the backbone is now {describe_identity(new)}. "
            "Resuming would mix features of two models; choose a new name= or out=, or pass "
            "overwrite=true to extract every bag again"
        )


def _remove_previous_features(folder: Path, feature_dir: Path) -> None:
    """Delete the feature files and index of an earlier extraction into ``folder``.

    Without this, an overwrite that stops early would leave old files that a later resume
    takes as done.
    """
    old_files = sorted(feature_dir.glob("*.pt")) if feature_dir.is_dir() else []
    for path in old_files:
        path.unlink()
    (folder / "index.csv").unlink(missing_ok=True)
    if old_files:
        logger.info("overwrite: deleted %d earlier feature files in %s", len(old_files), folder)


def extract_bags(
    bags: Sequence[Bag],
    extractor: Extractor,
    folder: str | Path,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    overwrite: bool = False,
    meta: dict[str, Any] | None = None,
) -> list[IndexRow]:
    """Extract features of ``bags`` into the feature set ``folder``.

    Writes ``meta.json``, one file per bag, then ``index.csv`` in the order of ``bags``.
    Bags whose file exists are skipped, after checking that ``meta.json`` records the same
    configuration and weights (``extractor.weights``). ``overwrite`` first deletes the
    folder's feature files and index.

    A bag without instances gets an empty file and a warning; the evaluation raises on it.
    When every bag is empty the files and index are still written, then a ValueError is
    raised.

    Raises:
        ValueError: the folder contains features of another configuration or other weights,
            every bag is empty, or an existing feature file cannot be read.
        FloatingPointError: non-finite features, naming the bag.
        RuntimeError: a tile could not be read, naming the bag.
    """
    folder = Path(folder)
    feature_dir = folder / "features"
    ids = [bag.bag_id for bag in bags]
    if len(set(ids)) != len(ids):
        raise ValueError("bag ids are not unique")
    files = [safe_file_name(bag_id) for bag_id in ids]
    meta = {
        "format": FEATURE_FORMAT,
        "version": FEATURE_FORMAT_VERSION,
        "embed_dim": extractor.embed_dim,
        "extractor": extractor.description,
        "weights": getattr(extractor, "weights", None),
        **(meta or {}),
    }
    _check_meta(folder, meta, overwrite)
    if overwrite:
        _remove_previous_features(folder, feature_dir)
    write_meta(meta, folder / "meta.json")

    todo = [i for i, file in enumerate(files) if overwrite or not (feature_dir / file).is_file()]
    counts: dict[int, int] = {}
    if len(todo) < len(bags):
        logger.info(
            "%d of %d bags already extracted in %s", len(bags) - len(todo), len(bags), folder
        )
    if todo:
        counts.update(_run(bags, todo, files, extractor, feature_dir, batch_size, num_workers))
    for position in set(range(len(bags))) - set(todo):
        record = load_bag_features(feature_dir / files[position], mmap=True)
        counts[position] = int(record["features"].shape[0])

    rows = [
        IndexRow(bag.bag_id, bag.label, bag.group, bag.split, counts[i], files[i])
        for i, bag in enumerate(bags)
    ]
    write_index(rows, folder / "index.csv")
    logger.info("%d bags, %d instances in %s", len(rows), sum(counts.values()), folder)
    empty = [row.bag_id for row in rows if row.num_instances == 0]
    if empty and len(empty) == len(rows):
        raise ValueError(
            f"all {len(rows)} bags have no instances because every tile was dropped as "
            "background: bags.tile_size is probably larger than the images (the white padding "
            "counts as glass), or bags.background_threshold is too low. Use a smaller "
            "tile_size or a higher background_threshold (1.0 keeps every tile), then extract "
            "again with overwrite=true"
        )
    if empty:
        logger.warning("%d bag(s) have no instances: %s", len(empty), ", ".join(empty[:20]))
    return rows


def _run(
    bags: Sequence[Bag],
    todo: list[int],
    files: list[str],
    extractor: Extractor,
    feature_dir: Path,
    batch_size: int,
    num_workers: int,
) -> dict[int, int]:
    dataset = _TileBatches(bags, todo, extractor.transform, batch_size)
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=extractor.device.type == "cuda",
        persistent_workers=False,
    )
    buffers: dict[int, _BagBuffer] = {}
    counts: dict[int, int] = {}
    progress = tqdm(total=len(todo), desc="bags", unit="bag", disable=None)
    for batch in loader:
        if "error" in batch:
            raise RuntimeError(batch["error"])
        if batch["images"] is not None:
            embeddings, tokens = extractor(batch["images"])
            embeddings, tokens = embeddings.cpu(), None if tokens is None else tokens.cpu()
            grid = extractor.patch_grid(batch["images"]) if tokens is not None else None
            for row, position in enumerate(batch["positions"].tolist()):
                buffer = buffers.setdefault(position, _BagBuffer())
                buffer.embeddings.append(embeddings[row : row + 1])
                buffer.coords.append(batch["coords"][row : row + 1])
                if tokens is not None:
                    buffer.tokens.append(tokens[row : row + 1])
                    buffer.grids.add(grid)
        for position, count in batch["finished"]:
            buffer = buffers.pop(position, _BagBuffer())
            path = feature_dir / files[position]
            counts[position] = _write_bag(bags[position], buffer, path, extractor.embed_dim)
            if counts[position] != count:
                raise RuntimeError(f"bag {bags[position].bag_id!r}: lost tiles during extraction")
            progress.update(1)
    progress.close()
    return counts


def extraction_meta(config: ExtractConfig) -> dict[str, Any]:
    """Return the part of ``meta.json`` that ``config`` sets (without the extractor's part)."""
    return {
        "name": config.name or default_feature_set_name(config.backbone),
        "backbone": to_dict(config.backbone),
        "bags": to_dict(config.bags),
        "patch_tokens": config.patch_tokens,
        "precision": config.precision,
        "extraction": {"batch_size": config.batch_size, "num_workers": config.num_workers},
    }


def extract_features(config: ExtractConfig) -> Path:
    """Build the bags and the extractor of ``config`` and extract; returns the feature folder."""
    from cytofm.evaluation.cross_validation import resolve_device

    device = resolve_device(config.device)
    extractor = build_extractor(
        config.backbone, device=device, precision=config.precision, patch_tokens=config.patch_tokens
    )
    name = config.name or default_feature_set_name(config.backbone)
    folder = Path(config.out) / name
    bags = build_bags(config.bags)
    meta = extraction_meta(config)
    logger.info("extracting %d bags with %s into %s", len(bags), name, folder)
    extract_bags(
        bags,
        extractor,
        folder,
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        overwrite=config.overwrite,
        meta=meta,
    )
    return folder
