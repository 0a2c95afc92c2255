"""``mil`` figures: ABMIL attention of one bag drawn over its source image.

Two figures per bag. The first paints the attention weight of each tile or cell at its box
over the source image, with a colour bar and the bag's label and prediction in the title. The
second is a page of the highest- and lowest-attention tiles cropped from the image.

The run folder is read by ``read_mil_bag``, the only function that reads the layout written by
``cytofm-eval-mil``::

    <run>/<feature set>/<head>/seed<s>/fold<k>/predictions.csv
        bag_id,group,label,predicted,prob_<class>...   (the fold's test bags)
    <run>/<feature set>/<head>/seed<s>/fold<k>/attention.pt
        {bag_id: {"attention": float32 [N], "coords": int64 [N, 4] x0,y0,x1,y1}}
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import matplotlib
import numpy as np
import torch
import yaml
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image

from cytofm.data.bags import files_with_stem, read_labels_csv
from cytofm.data.decode import load_rgb
from cytofm.visualize.drawing import blend_heatmap, new_figure, save_figure
from cytofm.visualize.images import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)

Scale = Literal["raw", "percentile"]
# Blue to red keeps the image visible at both ends; inferno's black low end hides the tissue.
HEATMAP_CMAP = "coolwarm"


class BagNotFoundError(LookupError):
    """A bag id that is not among the test bags of an evaluation run."""


@dataclass
class MilBagResult:
    """One bag's prediction and instance attention from one (seed, fold) of a run.

    Attributes:
        bag_id: Bag id as in the feature index.
        label: True class name.
        predicted: Predicted class name.
        probabilities: Class name to predicted probability.
        attention: float ``[N]`` attention weight of each instance (sums to 1 for ABMIL).
        coords: int ``[N, 4]`` boxes ``x0, y0, x1, y1`` in source-image pixels.
        fold_dir: Folder the result was read from.
    """

    bag_id: str
    label: str
    predicted: str
    probabilities: dict[str, float]
    attention: np.ndarray
    coords: np.ndarray
    fold_dir: Path

    @property
    def run_name(self) -> str:
        """``<feature set>/<head>/seed<s>/fold<k>``, the fold folder relative to the run."""
        return "/".join(self.fold_dir.parts[-4:])


def find_fold_dirs(
    run_dir: Path, *, feature_set: str | None = None, head: str = "abmil", seed: int | None = None
) -> list[Path]:
    """List the fold folders of a run that hold predictions, sorted by path."""
    pattern = f"{feature_set or '*'}/{head}/seed{'*' if seed is None else seed}/fold*"
    return sorted(path for path in run_dir.glob(pattern) if (path / "predictions.csv").is_file())


def _available_runs(run_dir: Path) -> str:
    """Return the feature set, head and seed combinations with predictions, for messages."""
    found = sorted(
        "/".join(path.parts[-4:-1])
        for path in run_dir.glob("*/*/seed*/fold*")
        if (path / "predictions.csv").is_file()
    )
    return ", ".join(dict.fromkeys(found))  # one entry per feature set/head/seed, in order


def read_mil_bag(
    run_dir: str | Path,
    bag_id: str,
    *,
    feature_set: str | None = None,
    head: str = "abmil",
    seed: int | None = None,
) -> MilBagResult:
    """Find a bag among the test bags of an evaluation run and read its attention.

    A bag is a test bag in exactly one fold per (feature set, seed). If it is found in more
    than one fold folder, the first in sorted order is used and the count is logged. Pick
    another with ``feature_set`` and ``seed``.

    Raises:
        FileNotFoundError: ``run_dir`` is missing or contains no fold folders for ``head``.
        BagNotFoundError: No fold lists ``bag_id`` among its test bags.
        ValueError: The fold has no attention for the bag (e.g. a ``mean`` pooling head).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"evaluation run folder not found: {run_dir}")
    fold_dirs = find_fold_dirs(run_dir, feature_set=feature_set, head=head, seed=seed)
    if not fold_dirs:
        available = _available_runs(run_dir)
        hint = (
            f"the run contains {available}; pick from these with --feature-set, --head and --seed"
            if available
            else "pass the 'out' folder of cytofm-eval-mil"
        )
        raise FileNotFoundError(
            f"no fold folders with predictions.csv under {run_dir} for feature set "
            f"{feature_set or 'any'}, head {head!r}, seed {'any' if seed is None else seed}; "
            f"{hint}"
        )

    matches: list[tuple[Path, dict[str, str]]] = []
    known_ids: set[str] = set()
    for fold_dir in fold_dirs:
        for row in _read_predictions(fold_dir / "predictions.csv"):
            known_ids.add(row["bag_id"])
            if row["bag_id"] == bag_id:
                matches.append((fold_dir, row))
    if not matches:
        examples = ", ".join(sorted(known_ids)[:5])
        raise BagNotFoundError(
            f"bag {bag_id!r} not found in the predictions of {len(fold_dirs)} fold folder(s) "
            f"under {run_dir} ({len(known_ids)} bags, e.g. {examples})"
        )
    if len(matches) > 1:
        logger.info(
            "bag %r is in %d fold folders; showing %s (choose with --feature-set/--seed)",
            bag_id,
            len(matches),
            matches[0][0],
        )

    fold_dir, row = matches[0]
    attention_path = fold_dir / "attention.pt"
    if not attention_path.is_file():
        raise ValueError(f"{fold_dir} has no attention.pt; only attention heads (abmil) write it")
    record = torch.load(attention_path, map_location="cpu", weights_only=True)
    if bag_id not in record:
        raise ValueError(f"{attention_path} has no attention for bag {bag_id!r}")
    attention = np.asarray(record[bag_id]["attention"], dtype=np.float64).reshape(-1)
    coords = np.asarray(record[bag_id]["coords"], dtype=np.int64).reshape(-1, 4)
    if len(attention) != len(coords):
        raise ValueError(
            f"{attention_path}: bag {bag_id!r} has {len(attention)} attention weights "
            f"but {len(coords)} boxes"
        )
    probabilities = {
        key[len("prob_") :]: float(value) for key, value in row.items() if key.startswith("prob_")
    }
    return MilBagResult(
        bag_id=bag_id,
        label=row["label"],
        predicted=row["predicted"],
        probabilities=probabilities,
        attention=attention,
        coords=coords,
        fold_dir=fold_dir,
    )


def _read_predictions(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"bag_id", "label", "predicted"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}")
        return list(reader)


def find_source_image(bag_id: str, image_root: str | Path) -> Path:
    """Find a bag's source image under ``image_root``.

    Tries ``<root>/<bag_id>`` (bag ids that are relative image paths, as for class folders)
    and then ``<root>/<bag_id><suffix>`` for the usual image suffixes.

    Raises:
        FileNotFoundError: None of the candidates exists; the message lists them.
    """
    root = Path(image_root)
    candidates = [root / bag_id] + [root / f"{bag_id}{suffix}" for suffix in IMAGE_SUFFIXES]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"source image of bag {bag_id!r} not found under {root} (tried {candidates[0]} and "
        f"{bag_id}.png/.jpg/...); pass the file with --image"
    )


def locate_source_image(run_dir: str | Path, fold_dir: Path, bag_id: str) -> Path:
    """Find a bag's source image from the run's config and its feature set's ``meta.json``.

    The run's ``config.yaml`` names the feature set folder; its ``meta.json`` records the bag
    settings of ``cytofm-extract`` (kind, root, labels CSV). Relative paths in both are
    resolved against the working directory first, then against the run folder's parent.

    Raises:
        FileNotFoundError: A file on that chain is missing, the bag kind has no single source
            image (``tile_folder``), or the image does not exist. The message names which.
    """
    run_dir = Path(run_dir)
    feature_set_name = fold_dir.relative_to(run_dir).parts[0]
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"run config not found: {config_path}; pass --image")
    config = yaml.safe_load(config_path.read_text()) or {}
    entries = [e for e in config.get("feature_sets", []) if e.get("name") == feature_set_name]
    if not entries:
        raise FileNotFoundError(f"{config_path} has no feature set named {feature_set_name!r}")
    feature_dir = _resolve(entries[0]["path"], run_dir)
    meta_path = feature_dir / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"feature metadata not found: {meta_path}; pass --image")
    bags = json.loads(meta_path.read_text()).get("bags") or {}

    kind = bags.get("kind")
    root = _resolve(bags.get("root", "."), run_dir)
    if kind == "wsi":
        # NOTE: slides are not drawn yet: it needs a thumbnail reader and boxes scaled from
        # level-0 pixels to it.
        raise FileNotFoundError(
            f"bag {bag_id!r} comes from a whole-slide image, which mil cannot draw yet; pass "
            "--image with a picture of the slide at level-0 resolution"
        )
    if kind == "image_tiles" and bags.get("labels_csv"):
        rows = read_labels_csv(_resolve(bags["labels_csv"], run_dir))
        paths = {row["bag_id"]: row["path"] or row["bag_id"] for row in rows}
        if bag_id not in paths:
            raise FileNotFoundError(f"bag {bag_id!r} is not in {bags['labels_csv']}")
        candidate = root / paths[bag_id]
    elif kind == "class_folders":
        candidate = root / bag_id
    elif kind == "points":
        # Point bags are named after their image, or "<image>#<point number>".
        image = bag_id.rsplit("#", 1)[0] if bags.get("point_bags") == "point" else bag_id
        candidate = root / image
    else:
        raise FileNotFoundError(
            f"bags of kind {kind!r} in {meta_path} have no single source image; pass --image"
        )
    if not candidate.is_file():
        # Bag ids may omit the extension; cytofm-extract then used the one image of that stem.
        matches = files_with_stem(candidate)
        if len(matches) == 1:
            return matches[0]
        raise FileNotFoundError(
            f"source image of bag {bag_id!r} not found at {candidate}; pass --image or --image-root"
        )
    return candidate


def _resolve(path: str | Path, run_dir: Path) -> Path:
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    beside_run = run_dir.parent / path
    return beside_run if beside_run.exists() else path


def tile_heatmap(values: np.ndarray, coords: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Paint one value per box onto an image-sized map.

    Args:
        values: ``[N]`` value of each box.
        coords: ``[N, 4]`` boxes ``x0, y0, x1, y1`` in pixels, ``x1`` and ``y1`` exclusive;
            parts outside the image are clipped.
        image_size: (height, width) of the map.

    Returns:
        float64 ``[H, W]``: the mean value of the boxes covering each pixel, NaN where none.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    coords = np.asarray(coords).reshape(-1, 4)
    if len(values) != len(coords):
        raise ValueError(f"{len(values)} values but {len(coords)} boxes")
    height, width = image_size
    total = np.zeros((height, width), dtype=np.float64)
    count = np.zeros((height, width), dtype=np.int64)
    for value, (x0, y0, x1, y1) in zip(values, coords):
        x0, x1 = max(int(x0), 0), min(int(x1), width)
        y0, y1 = max(int(y0), 0), min(int(y1), height)
        if x1 <= x0 or y1 <= y0:
            continue
        total[y0:y1, x0:x1] += value
        count[y0:y1, x0:x1] += 1
    heatmap = np.full((height, width), np.nan)
    covered = count > 0
    heatmap[covered] = total[covered] / count[covered]
    return heatmap


def scale_attention(attention: np.ndarray, scale: Scale) -> np.ndarray:
    """Return the weights themselves (``raw``) or their percentile rank in the bag, 0 to 100.

    Percentile ranks spread the colours evenly over a bag whatever its size. Raw weights keep
    how peaked the attention is, because a uniform bag of N instances has weights 1/N.
    """
    attention = np.asarray(attention, dtype=np.float64)
    if scale == "raw":
        return attention
    if scale != "percentile":
        raise ValueError(f"scale must be 'raw' or 'percentile', got {scale!r}")
    if len(attention) == 1:
        return np.full(1, 100.0)
    ranks = np.argsort(np.argsort(attention, kind="stable"), kind="stable")
    return 100.0 * ranks / (len(attention) - 1)


def rank_tiles(attention: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the indices of the ``count`` highest (descending) and lowest (ascending) weights.

    With fewer than ``2 * count`` instances, ``count`` shrinks to half of them so that the two
    lists do not overlap; a single instance is in both.
    """
    order = np.argsort(-np.asarray(attention), kind="stable")
    count = max(1, min(count, len(order) // 2))
    return order[:count], order[::-1][:count]


def downscale_for_display(
    image: Image.Image, coords: np.ndarray, max_size: int | None
) -> tuple[Image.Image, np.ndarray]:
    """Scale an image so its longer side is at most ``max_size``, with the boxes scaled along."""
    longer = max(image.width, image.height)
    if max_size is None or longer <= max_size:
        return image, np.asarray(coords)
    factor = max_size / longer
    size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    scaled = np.rint(np.asarray(coords, dtype=np.float64) * factor).astype(np.int64)
    return image.resize(size, Image.Resampling.LANCZOS), scaled


def describe_prediction(result: MilBagResult) -> str:
    """Return ``label: x, predicted: y (p=0.93)`` for a figure title."""
    probability = result.probabilities.get(result.predicted)
    suffix = "" if probability is None else f" (p={probability:.2f})"
    return f"label: {result.label}, predicted: {result.predicted}{suffix}"


def draw_bag_heatmap(
    image: Image.Image,
    result: MilBagResult,
    coords: np.ndarray,
    *,
    scale: Scale = "raw",
) -> Figure:
    """Draw the source image and the attention heatmap over it, with a colour bar.

    Args:
        image: Source image (possibly downscaled for display).
        result: The bag's attention and prediction.
        coords: Boxes in the pixels of ``image``.
        scale: Colour scale, see ``scale_attention``.
    """
    values = scale_attention(result.attention, scale)
    heatmap = tile_heatmap(values, coords, (image.height, image.width))
    low, high = float(values.min()), float(values.max())
    if high <= low:
        high = low + 1e-12
    pixels = np.asarray(image)

    aspect = image.width / image.height
    figure, axes = new_figure(1, 2, panel_size=(4.5 * min(max(aspect, 0.6), 2.0), 4.5))
    axes[0, 0].imshow(pixels)
    axes[0, 0].set_title("source image", fontsize=9)
    axes[0, 1].imshow(
        blend_heatmap(pixels, heatmap, cmap=HEATMAP_CMAP, alpha=0.5, vmin=low, vmax=high)
    )
    count = len(values)
    axes[0, 1].set_title(
        f"ABMIL attention, {count} instances (uniform weight {1 / count:.3g})", fontsize=9
    )
    mappable = ScalarMappable(Normalize(low, high), matplotlib.colormaps[HEATMAP_CMAP])
    label = "attention weight" if scale == "raw" else "attention percentile in bag"
    figure.colorbar(mappable, ax=axes[0, 1], label=label, shrink=0.85)
    figure.suptitle(
        f"bag {result.bag_id}: {describe_prediction(result)}\n{result.run_name}", fontsize=10
    )
    return figure


def draw_tile_ranking(
    image: Image.Image, result: MilBagResult, coords: np.ndarray, *, count: int = 8
) -> Figure:
    """Draw the ``count`` highest- and lowest-attention tiles cropped from the image."""
    top, bottom = rank_tiles(result.attention, count)
    columns = len(top)
    figure, axes = new_figure(2, columns, panel_size=(1.8, 2.0))
    for row, (indices, name) in enumerate(((top, "highest"), (bottom, "lowest"))):
        axes[row, 0].set_ylabel(f"{name} attention", fontsize=9)
        for column, index in enumerate(indices):
            x0, y0, x1, y1 = (int(value) for value in coords[index])
            axes[row, column].imshow(np.asarray(image.crop((x0, y0, x1, y1))))
            axes[row, column].set_title(f"#{index}: {result.attention[index]:.3g}", fontsize=8)
    figure.suptitle(
        f"bag {result.bag_id}: {describe_prediction(result)}\n"
        f"top row: highest attention, bottom row: lowest (instance #: weight)",
        fontsize=10,
    )
    return figure


def run_mil(
    run_dir: str | Path,
    bag_id: str,
    out_dir: str | Path,
    *,
    image: str | Path | None = None,
    image_root: str | Path | None = None,
    feature_set: str | None = None,
    head: str = "abmil",
    seed: int | None = None,
    scale: Scale = "raw",
    tiles: int = 8,
    max_size: int | None = 2048,
    dpi: int = 100,
) -> list[Path]:
    """Write the heatmap and the tile ranking of one bag; returns the written paths.

    Args:
        run_dir: Output folder of ``cytofm-eval-mil``.
        bag_id: Bag to draw.
        out_dir: Output folder.
        image: Source image of the bag.
        image_root: Folder searched by ``find_source_image`` when ``image`` is not given.
            With neither, ``locate_source_image`` follows the run's records.
        feature_set, head, seed: Select the run when the bag appears in several.
        scale: ``raw`` weights or ``percentile`` ranks for the heatmap colours.
        tiles: Number of highest and of lowest tiles on the ranking page.
        max_size: Longer side the image is scaled down to for drawing, if larger.
        dpi: Resolution of the PNGs.

    Raises:
        BagNotFoundError: The bag is not in the run.
        FileNotFoundError: The source image cannot be found.
        ImageDecodeError: The source image cannot be read.
    """
    result = read_mil_bag(run_dir, bag_id, feature_set=feature_set, head=head, seed=seed)
    if image is not None:
        image_path = Path(image)
    elif image_root is not None:
        image_path = find_source_image(bag_id, image_root)
    else:
        image_path = locate_source_image(run_dir, result.fold_dir, bag_id)
    logger.info("bag %r: %s, source image %s", bag_id, result.run_name, image_path)
    source = load_rgb(image_path)
    _warn_outside(result.coords, source, image_path)
    display, coords = downscale_for_display(source, result.coords, max_size)

    out_dir = Path(out_dir)
    stem = _safe_stem(bag_id)
    heatmap = draw_bag_heatmap(display, result, coords, scale=scale)
    ranking = draw_tile_ranking(display, result, coords, count=tiles)
    return [
        save_figure(heatmap, out_dir / f"{stem}_mil_heatmap.png", dpi=dpi),
        save_figure(ranking, out_dir / f"{stem}_mil_tiles.png", dpi=dpi),
    ]


def _warn_outside(coords: np.ndarray, image: Image.Image, path: Path) -> None:
    outside = (coords[:, 2] > image.width) | (coords[:, 3] > image.height)
    if outside.any():
        logger.warning(
            "%d of %d boxes reach past the %dx%d image %s; is it the bag's source image at the "
            "resolution the tiles were cut from?",
            int(outside.sum()),
            len(coords),
            image.width,
            image.height,
            path,
        )


def _safe_stem(bag_id: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in bag_id).strip("._")
    return cleaned or "bag"
