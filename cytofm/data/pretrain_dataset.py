"""Unlabelled image collections for pretraining, mixed from weighted sources.

Each ``ImageSource`` is a folder (listed once, recursively by default) or a manifest file (see
``cytofm.data.listing.read_manifest``) of either image files or whole-slide images.
``PretrainImageDataset`` concatenates the sources into one index space, and ``MixtureSampler``
(in ``cytofm.data.sampler``, re-exported here) draws ``(index, seed)`` pairs so that each
source's share of the samples follows its weight.

An item is a field of view: images larger than ``field_size`` on a side are cropped at a random
position to at most ``field_size`` x ``field_size`` instead of being resized, so the cell scale
of large fields is kept. In a slide source (``kind="slides"``) an item is one foreground tile of
``field_size`` pixels at the source's magnification (see ``cytofm.data.slide_source``).

The crop and the transform are seeded from the item's seed, which makes
``dataset[(index, seed)]`` a pure function of its key and lets a resumed run reproduce
its batches.

Bad files never stop a run by themselves. A file that fails to decode is logged with a warning
naming it, appended as ``path,reason`` to the skipped-files manifest, remembered for the rest
of the process, and replaced by another image of the same source chosen from ``(index, seed)``.
Each process (main or DataLoader worker) counts its draws; once at least
``min_attempts`` draws were made and the bad share exceeds ``max_bad_fraction``, or no readable
image is found in a source, ``DataLoadingError`` stops the run.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from cytofm.data.decode import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageDecodeError, load_rgb
from cytofm.data.listing import MANIFEST_SUFFIXES, PathTable, list_images, read_manifest
from cytofm.data.sampler import MixtureSampler
from cytofm.data.slide_source import SlideTileTable, SlideTiling
from cytofm.data.tiling import BackgroundFilter
from cytofm.data.wsi import SLIDE_EXTENSIONS

logger = logging.getLogger(__name__)

SKIPPED_MANIFEST_HEADER = ("path", "reason")


class DataLoadingError(RuntimeError):
    """Raised when too many files are unreadable or no readable image is left."""


SourceKind = Literal["images", "slides"]


@dataclass
class ImageSource:
    """One collection of pretraining images or whole-slide images.

    Attributes:
        path: A folder, or a manifest file (``.txt``/``.lst`` with one path per line, or
            ``.csv``/``.tsv`` with a ``path`` column; relative entries are relative to the
            manifest's folder).
        weight: Relative sampling weight. Sources are drawn in proportion to their weights,
            whatever their sizes.
        recursive: For folders, whether sub-folders are listed too.
        kind: ``images`` for image files, ``slides`` for whole-slide images read with
            OpenSlide (``pip install cytofm[wsi]``), tiled into foreground tiles.
        magnification: For slides, the objective magnification tiles are read at; ``None``
            reads level 0.
        base_magnification: For slides that record neither objective power nor microns per
            pixel, the level-0 magnification.
        max_glass_fraction: For slides, tiles with a larger share of empty glass are left out;
            1.0 keeps every tile.
    """

    path: Path
    weight: float = 1.0
    recursive: bool = True
    kind: SourceKind = "images"
    magnification: float | None = None
    base_magnification: float | None = None
    max_glass_fraction: float = 0.9

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if not (self.weight > 0 and np.isfinite(self.weight)):
            raise ValueError(
                f"source {self.path}: weight must be a positive number, got {self.weight}"
            )
        if self.kind not in ("images", "slides"):
            raise ValueError(
                f"source {self.path}: kind must be 'images' or 'slides', got {self.kind!r}"
            )
        if not 0.0 <= self.max_glass_fraction <= 1.0:
            raise ValueError(
                f"source {self.path}: max_glass_fraction must be in [0, 1], "
                f"got {self.max_glass_fraction}"
            )


class ImageFileTable:
    """The image files of one source, decoded on demand.

    Args:
        paths: The listed files.
        max_pixels: Files with more pixels are rejected (decompression-bomb guard).
    """

    def __init__(self, paths: PathTable, max_pixels: int | None) -> None:
        self.paths = paths
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, position: int) -> Path:
        """Return the file of item ``position``."""
        return self.paths[position]

    def load(self, position: int) -> Image.Image:
        """Decode item ``position`` to RGB; raises ``ImageDecodeError`` when it cannot."""
        return load_rgb(self.paths[position], max_pixels=self.max_pixels)


def list_source(source: ImageSource) -> PathTable:
    """List the files of one source (without opening them).

    Raises:
        FileNotFoundError: The folder or manifest does not exist.
        ValueError: The path is a file but not a manifest, or the source contains no file of
            its kind.
    """
    path = source.path
    suffixes = IMAGE_EXTENSIONS if source.kind == "images" else SLIDE_EXTENSIONS
    if path.is_dir():
        table = PathTable(path, list_images(path, recursive=source.recursive, suffixes=suffixes))
        where = "folder"
    elif path.is_file():
        if path.suffix.lower() not in MANIFEST_SUFFIXES:
            manifests = ", ".join(sorted(MANIFEST_SUFFIXES))
            raise ValueError(f"source {path} is a file but not a manifest (expected {manifests})")
        table = PathTable(path.parent, read_manifest(path))
        where = "manifest"
    else:
        noun = "image" if source.kind == "images" else "slide"
        raise FileNotFoundError(f"{noun} source not found: {path}")
    if len(table) == 0:
        noun = "image" if source.kind == "images" else "slide"
        raise ValueError(
            f"source {path} contains no {noun} files; supported suffixes are "
            f"{' '.join(sorted(suffixes))}"
        )
    logger.info(
        "source %s (%s of %s): %d files, weight %g",
        path,
        where,
        source.kind,
        len(table),
        source.weight,
    )
    return table


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed Python ``random``, numpy's global generator and torch's CPU generator, then restore.

    The previous states of all three are restored on exit, so callers' random streams are not
    disturbed.
    """
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def random_field_crop(image: Image.Image, field_size: int | None) -> Image.Image:
    """Crop ``image`` to at most ``field_size`` per side at a position drawn from ``random``."""
    if field_size is None:
        return image
    width, height = image.size
    crop_width, crop_height = min(width, field_size), min(height, field_size)
    if (crop_width, crop_height) == (width, height):
        return image
    left = random.randint(0, width - crop_width)
    top = random.randint(0, height - crop_height)
    return image.crop((left, top, left + crop_width, top + crop_height))


class PretrainImageDataset(torch.utils.data.Dataset):
    """Images from one or more weighted sources, keyed by ``(index, seed)``.

    Args:
        sources: Image sources; their images are concatenated in order into one index range.
        transform: Called on the cropped RGB field; its return value is the item.
        field_size: Largest side of the field handed to ``transform``; larger images are
            cropped at random, never resized. ``None`` passes whole images.
        max_pixels: Files with more pixels are rejected as bad (decompression-bomb guard).
        max_bad_fraction: Largest tolerated share of unreadable draws per process.
        skipped_manifest: CSV file that receives ``path,reason`` for every skipped file
            (appended, so several workers can share it). ``None`` only logs.
        min_attempts: Draws a process makes before ``max_bad_fraction`` is enforced.
        max_substitutes: Replacement draws tried for one item before the source is declared
            unreadable.
        slide_index_dir: Folder where the foreground-tile index of slide sources is saved and
            reused (see ``SlideTileTable``); ``None`` rebuilds it each time.

    Raises:
        ValueError: No source is given, a source is empty, or a slide source is used with
            ``field_size=None``.
        FileNotFoundError: A source path does not exist.
    """

    def __init__(
        self,
        sources: Sequence[ImageSource],
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        field_size: int | None = 512,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_bad_fraction: float = 0.01,
        skipped_manifest: str | Path | None = None,
        min_attempts: int = 200,
        max_substitutes: int = 100,
        slide_index_dir: str | Path | None = None,
    ) -> None:
        if not sources:
            raise ValueError("at least one image source is required")
        if field_size is not None and field_size < 1:
            raise ValueError(f"field_size must be positive or None, got {field_size}")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.sources = [
            source if isinstance(source, ImageSource) else ImageSource(**source)
            for source in sources
        ]
        self.skipped_manifest = Path(skipped_manifest) if skipped_manifest is not None else None
        if self.skipped_manifest is not None:
            _write_manifest_header(self.skipped_manifest)
        self.field_size = field_size
        self.max_pixels = max_pixels
        self.tables = [self._build_table(source, slide_index_dir) for source in self.sources]
        self.source_sizes = [len(table) for table in self.tables]
        self.source_weights = [source.weight for source in self.sources]
        self.source_offsets = np.concatenate([[0], np.cumsum(self.source_sizes)]).astype(np.int64)
        self.transform = transform
        self.max_bad_fraction = max_bad_fraction
        self.min_attempts = min_attempts
        self.max_substitutes = max_substitutes
        self.attempts = 0
        self.failures = 0
        self._known_bad: dict[int, str] = {}
        self._bad_per_source = [0] * len(self.sources)

    def _build_table(
        self, source: ImageSource, slide_index_dir: str | Path | None
    ) -> ImageFileTable | SlideTileTable:
        listing = list_source(source)
        if source.kind == "images":
            return ImageFileTable(listing, self.max_pixels)
        if self.field_size is None:
            raise ValueError(
                f"slide source {source.path} needs a tile size: set field_size (data.field_size)"
            )
        tiling = SlideTiling(
            tile_size=self.field_size,
            magnification=source.magnification,
            base_magnification=source.base_magnification,
            background=BackgroundFilter(max_glass_fraction=source.max_glass_fraction),
        )
        entries = [listing.relative(position) for position in range(len(listing))]
        return SlideTileTable(
            listing.root,
            entries,
            tiling,
            cache_dir=slide_index_dir,
            on_bad_slide=self._record_skipped,
        )

    def _record_skipped(self, path: Path, reason: str) -> None:
        if self.skipped_manifest is not None:
            _append_skipped(self.skipped_manifest, path, reason)

    def __len__(self) -> int:
        return int(self.source_offsets[-1])

    @property
    def num_bad_files(self) -> int:
        """Distinct files this process found unreadable so far."""
        return len(self._known_bad)

    def locate(self, index: int) -> tuple[int, int]:
        """Return ``(source number, position within that source)`` of a global index."""
        if not 0 <= index < len(self):
            raise IndexError(f"image index {index} out of range for {len(self)} images")
        source = int(np.searchsorted(self.source_offsets, index, side="right")) - 1
        return source, index - int(self.source_offsets[source])

    def path(self, index: int) -> Path:
        """Return the file of a global index (for a slide tile, its slide)."""
        source, position = self.locate(index)
        return self.tables[source].path(position)

    def __getitem__(self, key: tuple[int, int] | int) -> Any:
        index, seed = (key, key) if isinstance(key, (int, np.integer)) else key
        index, seed = int(index), int(seed)
        with seeded_rng(seed):
            image = self.load_field(index, seed)
            return self.transform(image) if self.transform is not None else image

    def load_field(self, index: int, seed: int) -> Image.Image:
        """Decode image ``index`` (or its deterministic substitute) and crop a field from it.

        Uses Python ``random`` for the crop position; ``__getitem__`` seeds it first.
        """
        image = self._load_or_substitute(index, seed)
        return random_field_crop(image, self.field_size)

    def _load_or_substitute(self, index: int, seed: int) -> Image.Image:
        source, _ = self.locate(index)
        start, size = int(self.source_offsets[source]), self.source_sizes[source]
        generator = None
        candidate = index
        for attempt in range(self.max_substitutes + 1):
            if attempt > 0:
                if generator is None:
                    generator = np.random.default_rng([seed % 2**63, index])
                candidate = start + int(generator.integers(size))
            image = self._try_load(candidate, source)
            if image is not None:
                return image
            if self._bad_per_source[source] >= size:
                break
        raise DataLoadingError(
            f"no readable image found in source {self.sources[source].path} after "
            f"{attempt + 1} draws ({self._bad_per_source[source]} of {size} files known bad"
            f"{self._manifest_hint()}); check that the source contains readable images"
        )

    def _try_load(self, index: int, source: int) -> Image.Image | None:
        self.attempts += 1
        if index in self._known_bad:
            self.failures += 1
            self._check_bad_share()
            return None
        _, position = self.locate(index)
        try:
            image = self.tables[source].load(position)
        except ImageDecodeError as error:
            self.failures += 1
            self._known_bad[index] = error.reason
            self._bad_per_source[source] += 1
            logger.warning("skipping unreadable image %s: %s", error.path, error.reason)
            self._record_skipped(error.path, error.reason)
            self._check_bad_share()
            return None
        return image

    def _check_bad_share(self) -> None:
        if self.attempts < self.min_attempts:
            return
        share = self.failures / self.attempts
        if share > self.max_bad_fraction:
            raise DataLoadingError(
                f"{self.failures} of {self.attempts} image reads failed ({share:.1%}), over "
                f"max_bad_fraction={self.max_bad_fraction:.1%}{self._manifest_hint()}; fix or "
                "remove the listed files, or raise max_bad_fraction"
            )

    def _manifest_hint(self) -> str:
        if self.skipped_manifest is None:
            return ""
        return f"; skipped files are listed in {self.skipped_manifest}"


def _write_manifest_header(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.stat().st_size == 0:
        with path.open("a", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerow(SKIPPED_MANIFEST_HEADER)


def _append_skipped(manifest: Path, path: Path, reason: str) -> None:
    # One write call per line with the file opened in append mode, so lines from several
    # DataLoader workers do not interleave.
    buffer = io.StringIO()
    csv.writer(buffer).writerow((str(path), reason))
    with manifest.open("a", newline="", encoding="utf-8") as handle:
        handle.write(buffer.getvalue())


def read_skipped_manifest(path: str | Path) -> list[tuple[str, str]]:
    """Read a skipped-files manifest back as ``(path, reason)`` pairs."""
    with Path(path).open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    return [(row[0], row[1]) for row in rows[1:] if row]


__all__ = [
    "DataLoadingError",
    "ImageSource",
    "MixtureSampler",
    "PretrainImageDataset",
    "list_source",
    "read_skipped_manifest",
    "seeded_rng",
]
