"""``embeddings`` figures: 2-D maps of extracted features coloured by label, one per backbone.

Each feature set (a folder written by ``cytofm-extract``) becomes one panel, so the separation
of classes can be compared across backbones side by side. Points are bags (the mean of their
instance features) or instances (coloured by their bag's label). The map is a t-SNE from
scikit-learn, or UMAP when ``umap-learn`` is installed, after a PCA to at most 50 dimensions.
Each panel's title carries the silhouette score of the labels in the full feature space
(cosine distance), a number that does not depend on the 2-D projection.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.metrics import silhouette_score
from threadpoolctl import threadpool_limits

from cytofm.evaluation.feature_store import FeatureSet
from cytofm.utils.io import atomic_write_text
from cytofm.visualize.drawing import new_figure, save_figure

logger = logging.getLogger(__name__)

Method = Literal["auto", "tsne", "umap", "pca"]
Level = Literal["bag", "instance"]
UNLABELLED = "(no label)"
PCA_DIMENSIONS = 50
METHOD_TITLES = {"tsne": "t-SNE", "umap": "UMAP", "pca": "PCA"}


@dataclass
class FeaturePoints:
    """Points of one feature set: one row per bag or per instance.

    Attributes:
        name: Panel title, by default the feature set's folder name.
        features: float32 ``[N, D]``.
        labels: Label of each point (its bag's label); ``UNLABELLED`` when the index has none.
        bag_ids: Bag of each point.
    """

    name: str
    features: np.ndarray
    labels: list[str]
    bag_ids: list[str]


def load_feature_points(
    folder: str | Path,
    *,
    level: Level = "bag",
    max_points: int | None = 5000,
    seed: int = 0,
    name: str | None = None,
) -> FeaturePoints:
    """Load a feature set as points for an embedding map.

    Args:
        folder: Feature set folder with ``index.csv`` and ``features/<file>``.
        level: ``bag`` averages each bag's instance features into one point; ``instance``
            keeps every instance.
        max_points: Random subsample (fixed by ``seed``) when there are more points.
        seed: Seed of the subsample.
        name: Panel title; default the folder name.
    """
    feature_set = FeatureSet(folder)
    if not feature_set.rows:
        raise ValueError(f"{feature_set.root / 'index.csv'} lists no bags")
    features, labels, bag_ids = [], [], []
    for row in feature_set.rows:
        bag_features = feature_set.load(row.bag_id)["features"].float().numpy()
        if bag_features.shape[0] == 0:
            logger.warning("bag %r in %s has no instances; left out", row.bag_id, folder)
            continue
        if level == "bag":
            bag_features = bag_features.mean(axis=0, keepdims=True)
        features.append(bag_features)
        labels.extend([row.label or UNLABELLED] * len(bag_features))
        bag_ids.extend([row.bag_id] * len(bag_features))

    if not features:
        raise ValueError(f"every bag in {folder} has zero instances; nothing to draw")
    stacked = np.concatenate(features).astype(np.float32)
    if max_points is not None and len(stacked) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(stacked), max_points, replace=False))
        stacked = stacked[keep]
        labels = [labels[i] for i in keep]
        bag_ids = [bag_ids[i] for i in keep]
    return FeaturePoints(name or feature_set.root.name, stacked, labels, bag_ids)


def resolve_method(method: Method) -> Literal["tsne", "umap", "pca"]:
    """Return ``umap`` for ``auto`` when umap-learn is installed, else ``tsne``.

    Raises:
        ImportError: ``umap`` was requested but umap-learn is not installed.
    """
    umap_installed = importlib.util.find_spec("umap") is not None
    if method == "auto":
        return "umap" if umap_installed else "tsne"
    if method == "umap" and not umap_installed:
        raise ImportError("method 'umap' needs umap-learn: pip install 'cytofm[umap]'")
    return method


def embed_2d(features: np.ndarray, *, method: Method = "auto", seed: int = 0) -> np.ndarray:
    """Project features ``[N, D]`` to 2-D; the same seed and input give the same map.

    The features are centred and reduced by PCA to at most 50 dimensions first, as
    scikit-learn's ``TSNE`` documentation recommends. t-SNE uses PCA initialisation and a
    perplexity of ``min(30, (N - 1) / 3)``. UMAP uses ``min(15, N - 1)`` neighbours.

    Raises:
        ValueError: Fewer than 3 points.
    """
    features = np.asarray(features, dtype=np.float64)
    count = features.shape[0]
    if count < 3:
        raise ValueError(f"an embedding map needs at least 3 points, got {count}")
    method = resolve_method(method)
    dimensions = min(PCA_DIMENSIONS, features.shape[1], count)
    reduced = PCA(n_components=dimensions, random_state=seed).fit_transform(
        features - features.mean(axis=0)
    )
    if method == "pca":
        return reduced[:, :2] if dimensions >= 2 else np.pad(reduced, ((0, 0), (0, 1)))
    if method == "umap":
        import umap

        reducer = umap.UMAP(n_components=2, n_neighbors=min(15, count - 1), random_state=seed)
        return np.asarray(reducer.fit_transform(reduced), dtype=np.float64)
    tsne = TSNE(
        n_components=2,
        perplexity=min(30.0, (count - 1) / 3),
        init="pca",
        random_state=seed,
    )
    return tsne.fit_transform(reduced)


def separation_score(features: np.ndarray, labels: Sequence[str]) -> float:
    """Silhouette score of the labels in feature space (cosine distance); NaN if undefined.

    It is defined for 2 to N-1 distinct labels, ignoring points without a label.
    """
    labels = np.asarray(labels)
    labelled = labels != UNLABELLED
    distinct = np.unique(labels[labelled])
    if not 2 <= len(distinct) <= labelled.sum() - 1:
        return float("nan")
    return float(silhouette_score(features[labelled], labels[labelled], metric="cosine"))


def label_colours(labels: Sequence[str]) -> dict[str, tuple[float, float, float, float]]:
    """Give each label a fixed colour (tab10, then tab20), with grey for missing labels."""
    names = sorted(set(labels) - {UNLABELLED})
    palette = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    colours = {name: palette(i % palette.N) for i, name in enumerate(names)}
    colours[UNLABELLED] = (0.6, 0.6, 0.6, 1.0)
    return colours


def draw_embedding_panels(
    panels: Sequence[tuple[FeaturePoints, np.ndarray, float]],
    *,
    method: str,
    max_columns: int = 3,
) -> Figure:
    """Draw one scatter panel per feature set, with one legend for all panels.

    Args:
        panels: ``(points, coordinates [N, 2], silhouette score)`` per feature set.
        method: Projection name for the axis labels.
        max_columns: Panels per row.
    """
    columns = min(len(panels), max_columns)
    rows = -(-len(panels) // columns)
    figure, axes = new_figure(rows, columns, panel_size=(4.2, 4.0))
    colours = label_colours([label for points, _, _ in panels for label in points.labels])
    marker_size = 18 if max(len(points.labels) for points, _, _ in panels) <= 500 else 4

    for axis, (points, coordinates, score) in zip(axes.flat, panels):
        labels = np.asarray(points.labels)
        for label, colour in colours.items():
            chosen = labels == label
            if chosen.any():
                axis.scatter(
                    coordinates[chosen, 0],
                    coordinates[chosen, 1],
                    s=marker_size,
                    color=colour,
                    label=label,
                    alpha=0.8,
                    linewidths=0,
                )
        score_text = "n/a" if np.isnan(score) else f"{score:.3f}"
        axis.set_title(f"{points.name}\nn={len(labels)}, silhouette={score_text}", fontsize=10)
        axis.set_xlabel(f"{method} 1", fontsize=8)
        axis.set_ylabel(f"{method} 2", fontsize=8)
        for spine in axis.spines.values():
            spine.set_visible(True)
            spine.set_color("0.7")
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)

    handles = [
        matplotlib.lines.Line2D([], [], marker="o", linestyle="", color=colour, label=label)
        for label, colour in colours.items()
        if any(label in points.labels for points, _, _ in panels)
    ]
    figure.legend(handles=handles, loc="outside right center", title="label", fontsize=9)
    return figure


def write_coordinates(
    panels: Sequence[tuple[FeaturePoints, np.ndarray, float]], path: Path
) -> Path:
    """Write ``feature_set,bag_id,label,x,y`` rows of every panel to a CSV file."""
    lines = ["feature_set,bag_id,label,x,y"]
    for points, coordinates, _ in panels:
        for bag_id, label, (x, y) in zip(points.bag_ids, points.labels, coordinates):
            fields = [points.name, bag_id, label, f"{x:.6g}", f"{y:.6g}"]
            lines.append(",".join(_csv_field(field) for field in fields))
    atomic_write_text("\n".join(lines) + "\n", path)
    logger.info("wrote %s", path)
    return path


def _csv_field(value: str) -> str:
    if any(character in value for character in ',"\n'):
        return '"' + value.replace('"', '""') + '"'
    return value


def run_embeddings(
    feature_sets: Sequence[str | Path],
    out_dir: str | Path,
    *,
    names: Sequence[str] | None = None,
    method: Method = "auto",
    level: Level = "bag",
    max_points: int | None = 5000,
    seed: int = 0,
    threads: int | None = None,
    dpi: int = 100,
) -> list[Path]:
    """Write ``embeddings_<level>_<method>.png`` and a CSV of the coordinates.

    Args:
        feature_sets: Feature set folders, one panel each.
        out_dir: Output folder.
        names: Panel titles, one per feature set; default the folder names.
        method: ``auto`` (UMAP if installed, else t-SNE), ``tsne``, ``umap`` or ``pca``.
        level: ``bag`` (mean of each bag's instances) or ``instance``.
        max_points: Random subsample per feature set when there are more points.
        seed: Seed of the subsample and the projection.
        threads: Limit of BLAS and OpenMP threads during the projection; None leaves the
            libraries' defaults. On a busy machine 1 can be much faster for t-SNE.
        dpi: Resolution of the PNG.

    Returns:
        Paths of the PNG and the CSV.
    """
    if names is not None and len(names) != len(feature_sets):
        raise ValueError(
            f"got {len(names)} name(s) for {len(feature_sets)} feature set(s); give one each"
        )
    resolved = resolve_method(method)
    panels = []
    for position, folder in enumerate(feature_sets):
        name = names[position] if names is not None else None
        points = load_feature_points(
            folder, level=level, max_points=max_points, seed=seed, name=name
        )
        logger.info(
            "%s: projecting %d %s points with %s", points.name, len(points.labels), level, resolved
        )
        with threadpool_limits(limits=threads):
            coordinates = embed_2d(points.features, method=resolved, seed=seed)
        panels.append((points, coordinates, separation_score(points.features, points.labels)))

    out_dir = Path(out_dir)
    title = METHOD_TITLES[resolved]
    figure = draw_embedding_panels(panels, method=title)
    figure.suptitle(f"{level}-level features, {title} (seed {seed})", fontsize=11)
    return [
        save_figure(figure, out_dir / f"embeddings_{level}_{resolved}.png", dpi=dpi),
        write_coordinates(panels, out_dir / f"embeddings_{level}_{resolved}.csv"),
    ]
