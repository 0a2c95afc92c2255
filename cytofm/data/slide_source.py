"""Whole-slide images as a pretraining source: an index of foreground tiles over many slides.

``SlideTileTable`` opens every slide once when it is built. It selects the grid tiles at the
target magnification that are not empty glass (``cytofm.data.wsi.foreground_tile_boxes``) and
keeps their level-0 corners in numpy arrays. A dataset item is therefore one tile, and a
collection of slides weighs in by its tissue area. Tiles are read on demand through a small
cache of open slide handles per process.

Building the index reads a thumbnail of every slide, which takes seconds per slide. With
``cache_dir`` the index is saved as ``slide-tiles-<key>.npz``, where the key covers the slide
paths, sizes, modification times and the tiling settings, so a resumed run reuses it.

A slide that OpenSlide cannot open is skipped with a warning and reported through
``on_bad_slide``. A tile that fails to read raises ``ImageDecodeError``, which the pretraining
dataset handles like an unreadable image file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cytofm.data.decode import ImageDecodeError
from cytofm.data.tiling import BackgroundFilter
from cytofm.data.wsi import (
    LevelPlan,
    foreground_tile_boxes,
    open_slide,
    plan_level,
    read_slide_tile,
)

logger = logging.getLogger(__name__)

OPEN_SLIDES_PER_PROCESS = 16
"""Slide handles a process keeps open; older ones are closed first."""


@dataclass(frozen=True)
class SlideTiling:
    """Settings that decide which tiles of a slide are pretraining items.

    Attributes:
        tile_size: Tile side in pixels at the target magnification.
        magnification: Target objective magnification; ``None`` reads level 0.
        base_magnification: Level-0 magnification for slides that record neither objective
            power nor microns per pixel.
        background: Glass filter applied to the slide's thumbnail.
    """

    tile_size: int
    magnification: float | None = None
    base_magnification: float | None = None
    background: BackgroundFilter = field(default_factory=BackgroundFilter)

    def __post_init__(self) -> None:
        if self.tile_size < 1:
            raise ValueError(f"slide tile_size must be positive, got {self.tile_size}")
        if self.magnification is not None and not self.magnification > 0:
            raise ValueError(f"magnification must be positive or None, got {self.magnification}")


class SlideTileTable:
    """Foreground tiles of a list of slides, read lazily.

    Args:
        root: Folder that relative slide paths are joined to.
        entries: Slide paths, relative to ``root`` or absolute.
        tiling: Tile size, magnification and glass filter.
        cache_dir: Folder for the saved tile index; ``None`` builds it every time.
        on_bad_slide: Called with ``(path, reason)`` for a slide that cannot be opened or
            tiled.
        opener: Function that opens a slide path; ``None`` uses ``cytofm.data.wsi.open_slide``.

    Raises:
        ValueError: No slide yields a tile.
    """

    def __init__(
        self,
        root: str | Path,
        entries: Sequence[str],
        tiling: SlideTiling,
        *,
        cache_dir: str | Path | None = None,
        on_bad_slide: Callable[[Path, str], None] | None = None,
        opener: Callable[[Path], Any] | None = None,
    ) -> None:
        self.root = Path(root)
        self.slides = [self.root / entry for entry in entries]
        self.tiling = tiling
        self.opener = opener if opener is not None else open_slide
        # Open slides with their read plans, least recently used first.
        self._handles: OrderedDict[int, tuple[Any, LevelPlan]] = OrderedDict()
        self._owner_pid = os.getpid()

        cache_path = None
        if cache_dir is not None:
            cache_path = Path(cache_dir) / f"slide-tiles-{self._index_key()}.npz"
        if cache_path is not None and cache_path.is_file() and self._load_index(cache_path):
            logger.info("reused slide tile index %s: %d tiles", cache_path, len(self))
        else:
            self._build_index(on_bad_slide)
            if cache_path is not None:
                self._save_index(cache_path)
        if len(self) == 0:
            raise ValueError(
                f"no foreground tile found in {len(self.slides)} slide(s) under {self.root}; "
                "check the skipped-files manifest, or raise max_glass_fraction if the tissue "
                "is sparse"
            )

    def _load_index(self, cache_path: Path) -> bool:
        """Read a saved index; return False, with a warning, when the file is unreadable."""
        try:
            with np.load(cache_path) as arrays:
                self.slide_ids, self.xs, self.ys = (
                    arrays["slide_ids"],
                    arrays["xs"],
                    arrays["ys"],
                )
                self.spans, self.levels = arrays["spans"], arrays["levels"]
                self.level_downsamples = arrays["level_downsamples"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            logger.warning(
                "saved slide tile index %s is unreadable (%s); building it again",
                cache_path,
                error,
            )
            return False
        return True

    def _index_key(self) -> str:
        stats = []
        for path in self.slides:
            try:
                info = path.stat()
                stats.append([str(path), info.st_size, info.st_mtime_ns])
            except OSError:
                stats.append([str(path), None, None])
        settings = asdict(self.tiling)
        payload = json.dumps([stats, settings], sort_keys=True, default=str)
        return hashlib.sha1(payload.encode("utf-8")).hexdigest()[:16]

    def _build_index(self, on_bad_slide: Callable[[Path, str], None] | None) -> None:
        tiling = self.tiling
        slide_ids, xs, ys = [], [], []
        spans = np.zeros(len(self.slides), dtype=np.int64)
        levels = np.zeros(len(self.slides), dtype=np.int64)
        level_downsamples = np.ones(len(self.slides), dtype=np.float64)
        for number, path in enumerate(self.slides):
            try:
                slide = self.opener(path)
            except ImportError:
                raise
            except Exception as error:  # OpenSlide raises several types for unreadable files
                self._report_bad(path, f"cannot open slide: {error}", on_bad_slide)
                continue
            try:
                plan = plan_level(slide, tiling.magnification, tiling.base_magnification)
            except ValueError as error:  # a setting that does not fit the slide stops the run
                slide.close()
                raise ValueError(f"slide {path}: {error}") from error
            try:
                boxes = foreground_tile_boxes(
                    slide,
                    tiling.tile_size,
                    magnification=tiling.magnification,
                    base=tiling.base_magnification,
                    background=tiling.background,
                )
            except Exception as error:  # a corrupt pyramid fails on its first read
                self._report_bad(path, f"cannot tile slide: {error}", on_bad_slide)
                continue
            finally:
                slide.close()
            logger.info("slide %s: %d foreground tiles", path, len(boxes))
            if boxes:
                spans[number] = boxes[0][2] - boxes[0][0]
            levels[number] = plan.level
            level_downsamples[number] = plan.level_downsample
            slide_ids.extend([number] * len(boxes))
            xs.extend(box[0] for box in boxes)
            ys.extend(box[1] for box in boxes)
        self.slide_ids = np.asarray(slide_ids, dtype=np.int32)
        self.xs = np.asarray(xs, dtype=np.int64)
        self.ys = np.asarray(ys, dtype=np.int64)
        self.spans, self.levels, self.level_downsamples = spans, levels, level_downsamples

    @staticmethod
    def _report_bad(
        path: Path, reason: str, on_bad_slide: Callable[[Path, str], None] | None
    ) -> None:
        logger.warning("skipping slide %s: %s", path, reason)
        if on_bad_slide is not None:
            on_bad_slide(path, reason)

    def _save_index(self, cache_path: Path) -> None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        # Written under a temporary name and renamed, so ranks building the same index at
        # once never leave a half-written file behind.
        partial = cache_path.with_name(f"{cache_path.stem}.{os.getpid()}.partial.npz")
        np.savez(
            partial,
            slide_ids=self.slide_ids,
            xs=self.xs,
            ys=self.ys,
            spans=self.spans,
            levels=self.levels,
            level_downsamples=self.level_downsamples,
        )
        os.replace(partial, cache_path)

    def __len__(self) -> int:
        return len(self.slide_ids)

    def path(self, position: int) -> Path:
        """Return the slide file that tile ``position`` comes from."""
        return self.slides[int(self.slide_ids[position])]

    def box(self, position: int) -> tuple[int, int, int, int]:
        """Return the level-0 box ``(x0, y0, x1, y1)`` of tile ``position``."""
        span = int(self.spans[self.slide_ids[position]])
        x, y = int(self.xs[position]), int(self.ys[position])
        return (x, y, x + span, y + span)

    def tiles_per_slide(self) -> np.ndarray:
        """Return the number of indexed tiles of each slide, in slide order."""
        return np.bincount(self.slide_ids, minlength=len(self.slides))

    def load(self, position: int) -> Image.Image:
        """Read tile ``position`` as an RGB image of ``tile_size`` pixels.

        Raises:
            ImageDecodeError: The slide cannot be opened or the region cannot be read.
        """
        number = int(self.slide_ids[position])
        path = self.slides[number]
        box = self.box(position)
        try:
            slide, plan = self._handle(number)
            return read_slide_tile(slide, box, self.tiling.tile_size, plan)
        except ImportError:
            raise
        except Exception as error:  # OpenSlide's errors have no common base class
            self._forget(number)
            raise ImageDecodeError(path, f"tile at {box[:2]}: {error}") from error

    def _handle(self, number: int) -> tuple[Any, LevelPlan]:
        """Return the open slide ``number`` and its read plan, opening it on first use."""
        if os.getpid() != self._owner_pid:  # a forked DataLoader worker opens its own handles
            self._handles = OrderedDict()
            self._owner_pid = os.getpid()
        entry = self._handles.get(number)
        if entry is not None:
            self._handles.move_to_end(number)
            return entry
        handle = self.opener(self.slides[number])
        try:
            plan = plan_level(handle, self.tiling.magnification, self.tiling.base_magnification)
            if plan.level != self.levels[number]:
                raise ValueError(f"pyramid changed since indexing (level {plan.level})")
        except Exception:
            handle.close()
            raise
        self._handles[number] = (handle, plan)
        if len(self._handles) > OPEN_SLIDES_PER_PROCESS:
            _, (oldest, _) = self._handles.popitem(last=False)
            oldest.close()
        return handle, plan

    def _forget(self, number: int) -> None:
        entry = self._handles.pop(number, None)
        if entry is not None:
            try:
                entry[0].close()
            except Exception:  # closing a broken handle must not hide the read error
                logger.debug("closing slide %s failed", self.slides[number], exc_info=True)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()  # open handles do not pickle; workers reopen
        return state
