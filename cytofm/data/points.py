"""Bags of cell-centred crops from point annotations (``image,x,y[,label]``)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from cytofm.data.bags import BagConfig, BagSpec, PointCrops, read_labels_csv

logger = logging.getLogger(__name__)

PointRow = tuple[float, float, str | None]


def read_points_csv(path: str | Path) -> dict[str, list[PointRow]]:
    """Read ``image,x,y[,label]`` rows grouped by image, in file order.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: A required column is missing or a coordinate is not a number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"points CSV not found: {path}")
    grouped: dict[str, list[PointRow]] = {}
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = {"image", "x", "y"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(
                f"points CSV {path} lacks column(s) {sorted(missing)}; "
                f"header is {reader.fieldnames}"
            )
        for line, row in enumerate(reader, start=2):
            try:
                x, y = float(row["x"]), float(row["y"])
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"{path} line {line}: x and y must be numbers, got {row['x']!r}, {row['y']!r}"
                ) from error
            label = (row.get("label") or "").strip() or None
            grouped.setdefault(row["image"].strip(), []).append((x, y, label))
    return grouped


def build_point_bags(config: BagConfig, root: Path) -> list[BagSpec]:
    """Build point-crop bags (see ``cytofm.data.bags`` for the layout).

    Raises:
        ValueError: ``points_csv`` is not set.
        FileNotFoundError: An annotated image is missing under ``root``.
    """
    if config.points_csv is None:
        raise ValueError("bag kind points needs points_csv (image,x,y[,label])")
    grouped = read_points_csv(config.points_csv)
    labels = None
    if config.labels_csv is not None:
        labels = {row["bag_id"]: row for row in read_labels_csv(config.labels_csv)}

    bags = []
    for image, rows in grouped.items():
        path = root / image
        if not path.is_file():
            raise FileNotFoundError(f"annotated image not found: {path} (from {config.points_csv})")
        point_labels = [label for _, _, label in rows]
        has_labels = any(label is not None for label in point_labels)
        if config.point_bags == "point":
            for number, (x, y, label) in enumerate(rows):
                reader = PointCrops(path, [(x, y)], config)
                bag_id = f"{image}#{number}"
                bags.append(BagSpec(bag_id, label, image, None, reader, [label or ""]))
            continue
        group = split = label = None
        if labels is not None:
            if image not in labels:
                logger.warning("image %s has points but no row in %s", image, config.labels_csv)
                continue
            row = labels[image]
            label, group, split = row["label"], row["group"], row["split"]
        reader = PointCrops(path, [(x, y) for x, y, _ in rows], config)
        instance_labels = [item or "" for item in point_labels] if has_labels else None
        bags.append(BagSpec(image, label, group, split, reader, instance_labels))
    return bags
