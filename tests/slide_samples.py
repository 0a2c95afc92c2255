"""A writer of small tiled, pyramidal TIFF files that OpenSlide reads as generic TIFF slides.

Pillow cannot write tiled TIFFs, so the file is laid out here: one uncompressed, tiled RGB
image per pyramid level, each later level marked as a reduced-resolution image.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

_SHORT, _LONG, _RATIONAL = 3, 4, 5


def _tiles(level: np.ndarray, tile: int) -> list[bytes]:
    height, width, _ = level.shape
    rows, columns = -(-height // tile), -(-width // tile)
    padded = np.full((rows * tile, columns * tile, 3), 255, dtype=np.uint8)
    padded[:height, :width] = level
    return [
        padded[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile].tobytes()
        for r in range(rows)
        for c in range(columns)
    ]


def write_tiled_tiff(
    path: str | Path, levels: list[np.ndarray], tile: int = 64, microns_per_pixel: float = 0.25
) -> None:
    """Write ``levels`` (``[H, W, 3]`` uint8, largest first) as a tiled pyramidal TIFF.

    ``tile`` must be a multiple of 16. The resolution tags record ``microns_per_pixel`` at
    level 0, which OpenSlide reports as ``openslide.mpp-x``.
    """
    out = bytearray(b"II*\x00\x00\x00\x00\x00")  # first IFD offset is patched below
    previous_link = 4
    for number, level in enumerate(levels):
        tiles = _tiles(level, tile)
        tile_offsets = []
        for data in tiles:
            tile_offsets.append(len(out))
            out += data
        bits_offset = len(out)
        out += struct.pack("<3H", 8, 8, 8)
        offsets_offset = len(out)
        out += struct.pack(f"<{len(tiles)}I", *tile_offsets)
        counts_offset = len(out)
        out += struct.pack(f"<{len(tiles)}I", *(len(data) for data in tiles))
        resolution_offset = len(out)
        pixels_per_cm = round(10_000 / (microns_per_pixel * 2**number))
        out += struct.pack("<II", pixels_per_cm, 1)

        height, width, _ = level.shape
        entries = [
            (254, _LONG, 1, 0 if number == 0 else 1),  # reduced-resolution image after level 0
            (256, _LONG, 1, width),
            (257, _LONG, 1, height),
            (258, _SHORT, 3, bits_offset),
            (259, _SHORT, 1, 1),  # no compression
            (262, _SHORT, 1, 2),  # RGB
            (277, _SHORT, 1, 3),
            (282, _RATIONAL, 1, resolution_offset),
            (283, _RATIONAL, 1, resolution_offset),
            (284, _SHORT, 1, 1),  # chunky planar configuration
            (296, _SHORT, 1, 3),  # resolution in pixels per centimetre
            (322, _SHORT, 1, tile),
            (323, _SHORT, 1, tile),
            (324, _LONG, len(tiles), offsets_offset if len(tiles) > 1 else tile_offsets[0]),
            (325, _LONG, len(tiles), counts_offset if len(tiles) > 1 else len(tiles[0])),
        ]
        if len(out) % 2:
            out += b"\x00"
        ifd_offset = len(out)
        struct.pack_into("<I", out, previous_link, ifd_offset)
        out += struct.pack("<H", len(entries))
        for tag, kind, count, value in entries:
            if kind == _SHORT and count == 1:
                field = struct.pack("<HH", value, 0)
            else:
                field = struct.pack("<I", value)
            out += struct.pack("<HHI", tag, kind, count) + field
        previous_link = len(out)
        out += struct.pack("<I", 0)
    Path(path).write_bytes(bytes(out))
