"""Procedural synthetic cytology fields: a demo set that needs no downloads.

Each image is a field of stained cells on glass, drawn in a Papanicolaou-like palette
(blue-green or pink cytoplasm, blue-purple nuclei on pale grey glass) or a Romanowsky-like one
(lilac and pink cytoplasm, purple nuclei on pale pink glass). Cells are irregular ellipses with
a soft rim. Colours combine by adding optical densities (Beer-Lambert), so overlapping cells
darken as in a real smear, and each field gets its own focus blur and sensor noise.

An abnormal cell has an enlarged, darker, irregular nucleus with coarse chromatin. A bag
(image) is ``positive`` when it contains at least one abnormal cell; a positive 256 px field has
one to three abnormal cells among 12 to 30, a small share as in screening. The cell count
scales with the image area. Files written:

- ``images/<bag_id>.png``
- ``labels.csv``: ``bag_id,label,path`` with labels ``negative``/``positive`` and ``path``
  relative to the output folder (so ``BagConfig(kind="image_tiles", root=out_dir,
  labels_csv=out_dir / "labels.csv")`` reads the set as bags).
- ``cells.csv``: ``bag_id,x0,y0,x1,y1,abnormal``, one row per cell, boxes in pixels clipped
  to the image, ``abnormal`` 0 or 1.

Image ``i`` depends only on ``(seed, i, image_size)``, so a larger set starts with the same
images as a smaller one.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from tqdm import tqdm

logger = logging.getLogger(__name__)

LABEL_NEGATIVE = "negative"
LABEL_POSITIVE = "positive"

# RGB transmitted colours (0-255) per stain. Optical density is -log(colour / 255).
_PALETTES = {
    "papanicolaou": {
        "glass": (242, 241, 238),
        "cytoplasm": ((120, 190, 200), (235, 150, 165), (165, 205, 175)),
        "nucleus": (70, 60, 130),
    },
    "romanowsky": {
        "glass": (240, 230, 232),
        "cytoplasm": ((185, 175, 225), (230, 160, 175), (210, 190, 225)),
        "nucleus": (95, 45, 125),
    },
}


@dataclass
class DemoCell:
    """One drawn cell: centre, radii, shape terms and whether it is abnormal."""

    x: float
    y: float
    radius: float
    nucleus_radius: float
    aspect: float
    angle: float
    harmonics: np.ndarray  # [3, 2]: amplitude and phase for contour orders 2, 3 and 4
    nucleus_harmonics: np.ndarray
    cytoplasm_colour: int
    abnormal: bool


@dataclass
class DemoSet:
    """Summary of a written demo set."""

    out_dir: Path
    num_images: int
    num_positive: int
    num_cells: int
    num_abnormal_cells: int


_DEMO_NAME = re.compile(r"demo_\d{5}\.png")


def generate_demo_set(
    out_dir: str | Path,
    *,
    num_images: int = 200,
    image_size: int = 256,
    seed: int = 0,
    positive_fraction: float = 0.5,
) -> DemoSet:
    """Write a synthetic cytology demo set (see the module docstring for the files).

    Args:
        out_dir: Output folder; created if missing. Existing files of the same names are
            overwritten, and demo images of an earlier set (``images/demo_<5 digits>.png``)
            that this set does not write are removed.
        num_images: Number of images (bags).
        image_size: Side of the square images in pixels; cell sizes do not scale with it.
        seed: Seed; the same seed gives byte-identical files.
        positive_fraction: Expected share of positive bags.

    Returns:
        Counts of what was written.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if image_size < 64:
        raise ValueError(f"image_size must be at least 64 px, got {image_size}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)

    label_rows, cell_rows = [], []
    num_positive = num_abnormal = 0
    for index in tqdm(range(num_images), desc="demo images", unit="img", leave=False):
        generator = np.random.default_rng([seed, index])
        positive = bool(generator.random() < positive_fraction)
        image, cells = render_field(generator, image_size, positive)
        bag_id = f"demo_{index:05d}"
        image.save(image_dir / f"{bag_id}.png", compress_level=1)
        label = LABEL_POSITIVE if positive else LABEL_NEGATIVE
        label_rows.append((bag_id, label, f"images/{bag_id}.png"))
        for cell in cells:
            cell_rows.append((bag_id, *cell_box(cell, image_size), int(cell.abnormal)))
        num_positive += positive
        num_abnormal += sum(cell.abnormal for cell in cells)

    # Images of an earlier, larger demo set in the same folder would join any pretraining run
    # that reads images/, so they are removed. Only names this generator writes are touched.
    written = {f"{row[0]}.png" for row in label_rows}
    stale = [
        path
        for path in image_dir.glob("demo_*.png")
        if _DEMO_NAME.fullmatch(path.name) and path.name not in written
    ]
    for path in stale:
        path.unlink()
    if stale:
        logger.info("removed %d demo images of an earlier demo set from %s", len(stale), image_dir)

    _write_csv(out_dir / "labels.csv", ("bag_id", "label", "path"), label_rows)
    _write_csv(out_dir / "cells.csv", ("bag_id", "x0", "y0", "x1", "y1", "abnormal"), cell_rows)
    logger.info(
        "wrote %d demo images (%d positive, %d cells, %d abnormal) to %s",
        num_images,
        num_positive,
        len(cell_rows),
        num_abnormal,
        out_dir,
    )
    return DemoSet(out_dir, num_images, num_positive, len(cell_rows), num_abnormal)


def _write_csv(path: Path, header: tuple[str, ...], rows: list[tuple]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def sample_cells(generator: np.random.Generator, image_size: int, positive: bool) -> list[DemoCell]:
    """Draw the cells of one field; a positive field gets one to three abnormal cells."""
    scale = (image_size / 256.0) ** 2
    count = max(4, int(round(generator.integers(12, 31) * scale)))
    # About one abnormal cell per ten cells at most: 1 to 3 in a 256 px field.
    num_abnormal = int(generator.integers(1, max(1, count // 10) + 1)) if positive else 0
    abnormal_slots = set(generator.choice(count, size=min(num_abnormal, count), replace=False))
    margin = 18.0
    cells = []
    for number in range(count):
        abnormal = number in abnormal_slots
        radius = float(generator.uniform(11.0, 19.0))
        if abnormal:
            nucleus_ratio = generator.uniform(0.55, 0.72)
            nucleus_amplitude = 0.10
        else:
            nucleus_ratio = generator.uniform(0.24, 0.36)
            nucleus_amplitude = 0.03
        low, high = (margin, image_size - margin) if abnormal else (-4.0, image_size + 4.0)
        cells.append(
            DemoCell(
                x=float(generator.uniform(low, high)),
                y=float(generator.uniform(low, high)),
                radius=radius,
                nucleus_radius=radius * float(nucleus_ratio),
                aspect=float(generator.uniform(0.75, 1.0)),
                angle=float(generator.uniform(0, math.pi)),
                harmonics=_harmonics(generator, 0.06),
                nucleus_harmonics=_harmonics(generator, nucleus_amplitude),
                cytoplasm_colour=int(generator.integers(3)),
                abnormal=abnormal,
            )
        )
    return cells


def _harmonics(generator: np.random.Generator, amplitude: float) -> np.ndarray:
    amplitudes = generator.uniform(0.3, 1.0, size=3) * amplitude
    phases = generator.uniform(0, 2 * math.pi, size=3)
    return np.stack([amplitudes, phases], axis=1)


def cell_box(cell: DemoCell, image_size: int) -> tuple[int, int, int, int]:
    """Return the cell's bounding box, clipped to the image."""
    extent = cell.radius * (1.0 + float(cell.harmonics[:, 0].sum()))
    x0 = max(0, int(math.floor(cell.x - extent)))
    y0 = max(0, int(math.floor(cell.y - extent)))
    x1 = min(image_size, int(math.ceil(cell.x + extent)))
    y1 = min(image_size, int(math.ceil(cell.y + extent)))
    return x0, y0, x1, y1


def render_field(
    generator: np.random.Generator, image_size: int, positive: bool
) -> tuple[Image.Image, list[DemoCell]]:
    """Draw one field of view; return the RGB image and its cells."""
    stain = "papanicolaou" if generator.random() < 0.5 else "romanowsky"
    palette = _PALETTES[stain]
    jitter = generator.uniform(0.85, 1.15, size=3)  # per-field stain intensity per channel
    cytoplasm_density = [_density(colour) * jitter for colour in palette["cytoplasm"]]
    nucleus_density = _density(palette["nucleus"]) * jitter

    cytoplasm = np.zeros((image_size, image_size, 3), dtype=np.float32)
    nuclei = np.zeros((image_size, image_size, 3), dtype=np.float32)
    cells = sample_cells(generator, image_size, positive)
    for cell in cells:
        opacity = float(generator.uniform(0.5, 0.8))
        darkness = float(generator.uniform(1.5, 1.9)) if cell.abnormal else 1.0
        _draw_cell(
            cytoplasm,
            nuclei,
            cell,
            cytoplasm_density[cell.cytoplasm_colour] * opacity,
            nucleus_density * darkness,
        )

    chromatin = _smooth_noise(generator, image_size, cells=8)
    density = _density(palette["glass"]) + cytoplasm + nuclei * (0.75 + 0.5 * chromatin[..., None])
    rgb = 255.0 * np.exp(-density)
    rgb += generator.normal(0.0, 2.5, size=rgb.shape)
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    blur = float(generator.uniform(0.4, 1.2))
    return image.filter(ImageFilter.GaussianBlur(blur)), cells


def _density(colour: tuple[int, int, int]) -> np.ndarray:
    return -np.log(np.asarray(colour, dtype=np.float32) / 255.0)


def _smooth_noise(generator: np.random.Generator, image_size: int, cells: int) -> np.ndarray:
    # Coarse random grid upsampled bilinearly: blotchy texture in [0, 1] for chromatin.
    coarse = generator.random((image_size // cells + 2, image_size // cells + 2)).astype(np.float32)
    upsampled = Image.fromarray(coarse, mode="F").resize(
        ((image_size // cells + 2) * cells,) * 2, Image.Resampling.BILINEAR
    )
    return np.asarray(upsampled)[:image_size, :image_size]


def _draw_cell(
    cytoplasm: np.ndarray,
    nuclei: np.ndarray,
    cell: DemoCell,
    cytoplasm_density: np.ndarray,
    nucleus_density: np.ndarray,
) -> None:
    size = cytoplasm.shape[0]
    extent = cell.radius * 1.4 + 2
    x0, x1 = max(0, int(cell.x - extent)), min(size, int(cell.x + extent) + 1)
    y0, y1 = max(0, int(cell.y - extent)), min(size, int(cell.y + extent) + 1)
    if x0 >= x1 or y0 >= y1:
        return
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xs - cell.x, ys - cell.y
    # Rotate into the cell frame and stretch the minor axis to make an ellipse.
    cos, sin = math.cos(cell.angle), math.sin(cell.angle)
    u = dx * cos + dy * sin
    v = (-dx * sin + dy * cos) / cell.aspect
    distance = np.hypot(u, v)
    theta = np.arctan2(v, u)

    cell_alpha = _soft_disc(distance, theta, cell.radius, cell.harmonics, softness=1.5)
    nucleus_alpha = _soft_disc(distance, theta, cell.nucleus_radius, cell.nucleus_harmonics, 1.0)
    cytoplasm[y0:y1, x0:x1] += cell_alpha[..., None] * cytoplasm_density
    nuclei[y0:y1, x0:x1] += nucleus_alpha[..., None] * nucleus_density


def _soft_disc(
    distance: np.ndarray, theta: np.ndarray, radius: float, harmonics: np.ndarray, softness: float
) -> np.ndarray:
    contour = np.full_like(theta, radius)
    for order, (amplitude, phase) in zip((2, 3, 4), harmonics):
        contour += radius * amplitude * np.cos(order * theta + phase)
    return np.clip((contour - distance) / softness + 0.5, 0.0, 1.0)
