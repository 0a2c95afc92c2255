"""Count cell crops that show no cell, per class of a class-per-folder tree.

A crop dataset whose crops missed their cells cannot be learned from, whatever the backbone.
For each class folder this reports two counts. A crop is mostly glass when more than
``--max-glass`` of its pixels pass CytoFM's glass filter. A crop has no nucleus when fewer than
``--min-dark-share`` of its pixels have a mean channel value below ``--dark-level``. Stained
nuclei are dark in both Papanicolaou and Romanowsky stains, so a crop centred on a nucleated
cell should contain some.

Usage::

    python scripts/audit_crops.py /data/cric/labeled
    python scripts/audit_crops.py /data/cric/labeled --list-empty > empty_crops.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from cytofm.data.decode import ImageDecodeError, load_rgb  # noqa: E402
from cytofm.data.listing import list_images  # noqa: E402
from cytofm.data.tiling import BackgroundFilter  # noqa: E402


def crop_measures(
    pixels: np.ndarray, glass: BackgroundFilter, dark_level: int
) -> tuple[float, float]:
    """Return the glass share and the dark-pixel share of an RGB crop."""
    dark = pixels[..., :3].mean(axis=2) < dark_level
    return glass.glass_fraction(pixels), float(dark.mean())


def _with_share(part: int, count: int) -> str:
    return f"{part} ({part / count:.0%})" if count else str(part)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="folder with one sub-folder of crops per class")
    parser.add_argument("--max-glass", type=float, default=0.9, help="glass share of an empty crop")
    parser.add_argument("--dark-level", type=int, default=110, help="mean value of a dark pixel")
    parser.add_argument(
        "--min-dark-share", type=float, default=0.01, help="dark share below which no nucleus"
    )
    parser.add_argument(
        "--list-empty", action="store_true", help="print the paths of crops without a nucleus"
    )
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"folder not found: {args.root}")
    classes = sorted(path for path in args.root.iterdir() if path.is_dir())
    if not classes:
        parser.error(f"no class folders in {args.root}")

    glass = BackgroundFilter(max_glass_fraction=args.max_glass)
    rows = []
    for folder in classes:
        count = mostly_glass = no_nucleus = 0
        for name in list_images(folder):
            path = folder / name
            try:
                pixels = np.asarray(load_rgb(path))
            except ImageDecodeError as error:
                print(f"unreadable: {path}: {error.reason}", file=sys.stderr)
                continue
            glass_share, dark_share = crop_measures(pixels, glass, args.dark_level)
            count += 1
            mostly_glass += glass_share > args.max_glass
            if dark_share < args.min_dark_share:
                no_nucleus += 1
                if args.list_empty:
                    print(path)
        rows.append((folder.name, count, mostly_glass, no_nucleus))

    if args.list_empty:
        return 0
    print("| class | crops | mostly glass | no dark nucleus |")
    print("|---|---|---|---|")
    for name, count, mostly_glass, no_nucleus in rows:
        print(
            f"| {name} | {count} | {_with_share(mostly_glass, count)} | "
            f"{_with_share(no_nucleus, count)} |"
        )
    total = sum(row[1] for row in rows)
    empty = sum(row[3] for row in rows)
    if total:
        print(f"\n{empty} of {total} crops ({empty / total:.0%}) contain no dark nucleus.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
