"""Labelled bags of instances for multiple-instance learning.

``build_bags(config)`` returns one ``BagSpec`` per bag; ``BagSpec.iter_instances()`` decodes
lazily and yields ``(RGB tile, (x0, y0, x1, y1))`` with the box in source-image pixels (level 0
for slides). Bag kinds (``BagConfig.kind``):

``image_tiles``
    Labels CSV ``bag_id,label[,group][,split][,path]``. Each bag is one image tiled on a grid.
    The image is ``root / path`` when a ``path`` column is present and non-empty, else
    ``root / bag_id``, or ``root / <bag_id>.<image extension>`` when ``bag_id`` has no
    extension and exactly one such file exists.
``tile_folder``
    Same CSV; each bag is a folder of tile images, ``root / path`` or ``root / bag_id``. A tile
    whose file name contains ``x<X>_y<Y>`` (e.g. ``slide3_x512_y1024.png``) gets its box at
    that position, other tiles get ``(0, 0, width, height)``.
``points``
    Points CSV ``image,x,y[,label]`` with ``image`` relative to ``root``. Each point yields a
    ``crop_size`` crop centred on it, padded with white where it leaves the image. Points are
    grouped into one bag per image (``bag_id`` = image) or, with ``point_bags="point"``, one bag
    per point (``bag_id`` = ``image#row``, label = the point's label). The optional labels CSV
    gives per-image bag labels, groups and splits; each bag keeps its points' labels in
    ``instance_labels``.
``class_folders``
    ``root/<class>/<image>``: one bag per image (``bag_id`` = ``<class>/<image name>``, label =
    class), tiled like ``image_tiles``.
``wsi``
    Labels CSV as for ``image_tiles`` but naming slides (a missing extension is looked up
    among OpenSlide's); tiled at ``magnification`` with OpenSlide (``pip install cytofm[wsi]``).

Tile sizes and strides are in pixels at the target scale; ``scale`` is output pixels per
source pixel. Tiles whose glass share is above ``background_threshold`` are dropped.
"""

from __future__ import annotations

import csv
import glob
import logging
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image

from cytofm.data.decode import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, load_rgb
from cytofm.data.listing import list_images
from cytofm.data.tiling import BackgroundFilter, Box, crop_padded, iter_grid_tiles, resize_to_scale

logger = logging.getLogger(__name__)

BagKind = Literal["image_tiles", "tile_folder", "points", "class_folders", "wsi"]
Instance = tuple[Image.Image, Box]

_TILE_POSITION = re.compile(r"(?:^|[^a-z0-9])x(\d+)[_-]y(\d+)(?![0-9])", re.IGNORECASE)


@dataclass
class BagConfig:
    """Settings for listing bags and cutting their instances.

    Attributes:
        kind: Bag layout, see the module docstring.
        root: Folder that image, tile-folder, point-image and slide paths are relative to (the
            class-folder tree itself for ``class_folders``).
        labels_csv: ``bag_id,label[,group][,split][,path]``; required except for
            ``class_folders`` and ``points``.
        points_csv: ``image,x,y[,label]``, for ``points``.
        tile_size: Tile (or point crop) side in pixels at the target scale.
        stride: Grid step at the target scale; ``None`` means ``tile_size`` (no overlap).
        scale: Target scale, output pixels per source pixel, for images and point crops.
        include_edge: Add a last row and column of tiles flush with the image edges.
        background_threshold: Drop tiles whose glass share is above this; 1.0 keeps all.
        glass_min_brightness: Brightest-channel value from which a grey pixel is glass.
        glass_max_saturation: Largest saturation of a glass pixel.
        crop_size: Point crop side in source pixels (then resized by ``scale``).
        point_bags: ``image``: one bag per image; ``point``: one bag per point.
        magnification: Target objective magnification for ``wsi``.
        base_magnification: Level-0 magnification for slides that do not record it.
        max_pixels: Pixel-count limit for ordinary images.
    """

    kind: BagKind = "image_tiles"
    root: Path = Path(".")
    labels_csv: Path | None = None
    points_csv: Path | None = None
    tile_size: int = 224
    stride: int | None = None
    scale: float = 1.0
    include_edge: bool = True
    background_threshold: float = 0.9
    glass_min_brightness: int = 210
    glass_max_saturation: float = 0.12
    crop_size: int = 64
    point_bags: Literal["image", "point"] = "image"
    magnification: float = 20.0
    base_magnification: float | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS

    def background_filter(self) -> BackgroundFilter:
        """Return the glass filter these settings describe."""
        return BackgroundFilter(
            max_glass_fraction=self.background_threshold,
            min_brightness=self.glass_min_brightness,
            max_saturation=self.glass_max_saturation,
        )


@dataclass
class ImageTiles:
    """Grid tiles of one image file."""

    path: Path
    config: BagConfig

    def iter_instances(self) -> Iterator[Instance]:
        config = self.config
        image = load_rgb(self.path, max_pixels=config.max_pixels)
        yield from iter_grid_tiles(
            image,
            config.tile_size,
            config.stride,
            scale=config.scale,
            include_edge=config.include_edge,
            background=config.background_filter(),
        )


@dataclass
class TileFolder:
    """Tile images stored as files in one folder (sorted by name)."""

    folder: Path
    config: BagConfig

    def iter_instances(self) -> Iterator[Instance]:
        background = self.config.background_filter()
        for name in list_images(self.folder, recursive=False):
            tile = load_rgb(self.folder / name, max_pixels=self.config.max_pixels)
            if background.is_background(tile):
                continue
            yield tile, tile_box_from_name(name, tile.size)


@dataclass
class PointCrops:
    """Crops centred on annotated points of one image."""

    path: Path
    points: list[tuple[float, float]]
    config: BagConfig

    def iter_instances(self) -> Iterator[Instance]:
        image = load_rgb(self.path, max_pixels=self.config.max_pixels)
        for x, y in self.points:
            box = point_box(x, y, self.config.crop_size)
            crop = resize_to_scale(crop_padded(image, box), self.config.scale)
            yield crop, box


@dataclass
class SlideTiles:
    """Grid tiles of one whole-slide image at a target magnification."""

    path: Path
    config: BagConfig

    def iter_instances(self) -> Iterator[Instance]:
        from cytofm.data.wsi import iter_slide_tiles, open_slide

        slide = open_slide(self.path)
        try:
            yield from iter_slide_tiles(
                slide,
                self.config.tile_size,
                self.config.stride,
                magnification=self.config.magnification,
                base=self.config.base_magnification,
                background=self.config.background_filter(),
            )
        finally:
            slide.close()


@dataclass
class BagSpec:
    """One bag: its identity, labels and a lazy reader of its instances.

    Attributes:
        bag_id: Unique id of the bag.
        label: Bag label, or ``None`` for unlabelled bags.
        group: Group for grouped splits (e.g. patient), or ``None``.
        split: Predefined split name (e.g. ``train``), or ``None``.
        reader: Object whose ``iter_instances()`` yields the instances.
        instance_labels: Per-instance labels in instance order (point bags only).
    """

    bag_id: str
    label: str | None
    group: str | None
    split: str | None
    reader: ImageTiles | TileFolder | PointCrops | SlideTiles
    instance_labels: list[str] | None = field(default=None)

    def iter_instances(self) -> Iterator[Instance]:
        """Yield ``(RGB image, (x0, y0, x1, y1))`` for each instance, decoding lazily."""
        return self.reader.iter_instances()


def point_box(x: float, y: float, crop_size: int) -> Box:
    """Return the ``crop_size`` box centred on ``(x, y)`` (it may extend past the image)."""
    x0 = int(round(x - crop_size / 2))
    y0 = int(round(y - crop_size / 2))
    return (x0, y0, x0 + crop_size, y0 + crop_size)


def tile_box_from_name(name: str, size: tuple[int, int]) -> Box:
    """Return a tile's box from an ``x<X>_y<Y>`` part of its file name, else from 0, 0."""
    match = _TILE_POSITION.search(Path(name).stem)
    x0, y0 = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    return (x0, y0, x0 + size[0], y0 + size[1])


def build_bags(config: BagConfig) -> list[BagSpec]:
    """List the bags described by ``config`` (no image is decoded).

    Raises:
        FileNotFoundError: The root, a CSV, or a bag's image, folder or slide is missing.
        ValueError: A CSV lacks required columns, repeats a bag id or contains invalid values.
    """
    root = Path(config.root)
    if not root.is_dir():
        raise FileNotFoundError(f"bag root folder not found: {root}")
    if config.kind == "class_folders":
        bags = _class_folder_bags(config, root)
    elif config.kind == "points":
        from cytofm.data.points import build_point_bags

        bags = build_point_bags(config, root)
    elif config.kind in ("image_tiles", "tile_folder", "wsi"):
        bags = _csv_bags(config, root)
    else:
        raise ValueError(
            f"unknown bag kind {config.kind!r}; expected image_tiles, tile_folder, points, "
            "class_folders or wsi"
        )
    logger.info("%d bags of kind %s under %s", len(bags), config.kind, root)
    return bags


def _csv_bags(config: BagConfig, root: Path) -> list[BagSpec]:
    if config.labels_csv is None:
        raise ValueError(
            f"bag kind {config.kind} needs a labels CSV: set bags.labels_csv to a file with "
            "columns bag_id,label[,group][,split][,path]"
        )
    bags = []
    for row in read_labels_csv(config.labels_csv):
        target = root / (row["path"] or row["bag_id"])
        if config.kind == "tile_folder":
            if not target.is_dir():
                raise FileNotFoundError(f"tile folder of bag {row['bag_id']!r} not found: {target}")
            reader = TileFolder(target, config)
        else:
            if not target.is_file() and not row["path"]:
                target = _file_with_extension(target, row["bag_id"], config)
            if not target.is_file():
                raise FileNotFoundError(f"file of bag {row['bag_id']!r} not found: {target}")
            reader_class = SlideTiles if config.kind == "wsi" else ImageTiles
            reader = reader_class(target, config)
        bags.append(BagSpec(row["bag_id"], row["label"], row["group"], row["split"], reader))
    return bags


def files_with_stem(target: Path, suffixes: Collection[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Return the files ``<target>.<suffix>`` that exist, for any of ``suffixes``, sorted."""
    if not target.parent.is_dir():
        return []
    return sorted(
        path
        for path in target.parent.glob(glob.escape(target.name) + ".*")
        if path.suffix.lower() in suffixes and path.stem == target.name and path.is_file()
    )


def _file_with_extension(target: Path, bag_id: str, config: BagConfig) -> Path:
    """Find ``<bag_id>.<extension>`` for a bag id given without its file extension.

    Returns ``target`` unchanged when no such file exists, so the caller reports it missing.

    Raises:
        ValueError: several files share the stem (e.g. ``a.png`` and ``a.jpg``).
    """
    from cytofm.data.wsi import SLIDE_EXTENSIONS

    suffixes = SLIDE_EXTENSIONS if config.kind == "wsi" else IMAGE_EXTENSIONS
    matches = files_with_stem(target, suffixes)
    if len(matches) > 1:
        names = ", ".join(path.name for path in matches)
        raise ValueError(
            f"bag {bag_id!r} has no file extension and several files match it: {names}; add "
            f"a path column to {config.labels_csv} naming the file of each bag"
        )
    return matches[0] if matches else target


def _class_folder_bags(config: BagConfig, root: Path) -> list[BagSpec]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"no class folders under {root}; expected root/<class>/<image>")
    bags = []
    for name in classes:
        for relative in list_images(root / name, recursive=False):
            reader = ImageTiles(root / name / relative, config)
            bags.append(BagSpec(f"{name}/{relative}", name, None, None, reader))
    if not bags:
        raise ValueError(f"class folders under {root} contain no images")
    return bags


def read_labels_csv(path: str | Path) -> list[dict[str, str | None]]:
    """Read ``bag_id,label[,group][,split][,path]`` rows; missing optional fields are ``None``.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: ``bag_id`` or ``label`` column missing, an empty value, or a repeated id.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels CSV not found: {path}")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = {"bag_id", "label"} - set(columns)
        if missing:
            raise ValueError(
                f"labels CSV {path} lacks column(s) {sorted(missing)}; header is {columns}"
            )
        rows, seen = [], set()
        for line, raw in enumerate(reader, start=2):
            row = {key: (raw.get(key) or "").strip() or None for key in _LABEL_COLUMNS}
            if row["bag_id"] is None or row["label"] is None:
                raise ValueError(f"{path} line {line}: empty bag_id or label")
            if row["bag_id"] in seen:
                raise ValueError(f"{path} line {line}: bag_id {row['bag_id']!r} repeated")
            seen.add(row["bag_id"])
            rows.append(row)
    if not rows:
        raise ValueError(f"labels CSV {path} has no rows")
    return rows


_LABEL_COLUMNS = ("bag_id", "label", "group", "split", "path")
