"""Matplotlib helpers shared by the figures: figures, blending and saving.

Figures are built with ``matplotlib.figure.Figure`` and rendered by the Agg canvas, so nothing
here touches pyplot's global state or needs a display, and the library never switches the
backend of a notebook that imports it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

logger = logging.getLogger(__name__)


def new_figure(
    rows: int, columns: int, *, panel_size: tuple[float, float] = (2.4, 2.4)
) -> tuple[Figure, np.ndarray]:
    """Create a figure with a ``rows x columns`` grid of axes; returns it and the 2-D axes array.

    Every axis starts with ticks and frame hidden, as the panels show images.
    """
    figure = Figure(figsize=(panel_size[0] * columns, panel_size[1] * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis in axes.flat:
        hide_axis(axis)
    return figure, axes


def hide_axis(axis: Axes) -> None:
    """Hide ticks, tick labels and the frame of an image panel."""
    axis.set_xticks([])
    axis.set_yticks([])
    for spine in axis.spines.values():
        spine.set_visible(False)


def save_figure(figure: Figure, path: str | Path, *, dpi: int = 100) -> Path:
    """Write ``figure`` as PNG to ``path`` (parent folders are created) and log the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, format="png")
    logger.info("wrote %s", path)
    return path


def blend_heatmap(
    image: np.ndarray,
    heat: np.ndarray,
    *,
    cmap: str = "inferno",
    alpha: float = 0.55,
    vmin: float | None = None,
    vmax: float | None = None,
) -> np.ndarray:
    """Blend a colour-mapped heatmap over an RGB image.

    Args:
        image: uint8 ``[H, W, 3]``.
        heat: float ``[H, W]``; NaN pixels keep the plain image.
        cmap: Matplotlib colour map name.
        alpha: Weight of the heatmap colour in the blend.
        vmin, vmax: Colour range; default the finite minimum and maximum of ``heat``.

    Returns:
        uint8 ``[H, W, 3]`` of the same size as ``image``.
    """
    image = np.asarray(image)
    heat = np.asarray(heat, dtype=np.float64)
    if image.shape[:2] != heat.shape:
        raise ValueError(f"heatmap {heat.shape} does not match image {image.shape[:2]}")
    finite = np.isfinite(heat)
    low, high = _colour_range(heat[finite], vmin, vmax)
    scaled = np.clip((np.where(finite, heat, low) - low) / (high - low), 0.0, 1.0)
    colours = matplotlib.colormaps[cmap](scaled)[..., :3] * 255.0
    weight = np.where(finite, alpha, 0.0)[..., None]
    blended = (1.0 - weight) * image.astype(np.float64) + weight * colours
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def dim_outside_mask(image: np.ndarray, mask: np.ndarray, *, keep: float = 0.2) -> np.ndarray:
    """Darken the pixels of an RGB image where ``mask`` is False to ``keep`` of their value."""
    image = np.asarray(image)
    mask = np.asarray(mask, dtype=bool)
    if image.shape[:2] != mask.shape:
        raise ValueError(f"mask {mask.shape} does not match image {image.shape[:2]}")
    factor = np.where(mask, 1.0, keep)[..., None]
    return np.clip(np.rint(image.astype(np.float64) * factor), 0, 255).astype(np.uint8)


def _colour_range(
    values: np.ndarray, vmin: float | None, vmax: float | None
) -> tuple[float, float]:
    if vmin is None:
        vmin = float(values.min()) if values.size else 0.0
    if vmax is None:
        vmax = float(values.max()) if values.size else 1.0
    if vmax <= vmin:
        vmax = vmin + 1e-12
    return vmin, vmax
