"""Writers of 16-bit-per-channel PNG and TIFF files, which Pillow cannot save itself.

The PNG writer applies the chosen scanline filter (0 none, 1 sub, 2 up, 4 Paeth), so tests
exercise the decoder's unfiltering. The TIFF writer stores one uncompressed strip.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

_PNG_COLOUR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> gray, gray+alpha, RGB, RGBA


def _paeth(left: int, up: int, up_left: int) -> int:
    estimate = left + up - up_left
    distances = (abs(estimate - left), abs(estimate - up), abs(estimate - up_left))
    return (left, up, up_left)[distances.index(min(distances))]


def _filter_row(raw: bytes, previous: bytes, kind: int, step: int) -> bytes:
    out = bytearray(len(raw))
    for i, value in enumerate(raw):
        left = raw[i - step] if i >= step else 0
        up = previous[i]
        up_left = previous[i - step] if i >= step else 0
        predictor = {0: 0, 1: left, 2: up, 4: _paeth(left, up, up_left)}[kind]
        out[i] = (value - predictor) % 256
    return bytes(out)


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png16(values: np.ndarray, filter_kind: int = 4) -> bytes:
    """Encode ``values`` (``[H, W, C]`` integers below 65536) as a 16-bit PNG."""
    height, width, channels = values.shape
    big_endian = values.astype(">u2")
    step = 2 * channels
    previous = bytes(width * step)
    body = bytearray()
    for row in big_endian:
        raw = row.tobytes()
        body += bytes([filter_kind]) + _filter_row(raw, previous, filter_kind, step)
        previous = raw
    header = struct.pack(">IIBBBBB", width, height, 16, _PNG_COLOUR_TYPE[channels], 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(bytes(body)))
        + _chunk(b"IEND", b"")
    )


def tiff16(values: np.ndarray, byte_order: str = "<") -> bytes:
    """Encode ``values`` (``[H, W, 3 or 4]``) as an uncompressed 16-bit RGB(A) TIFF."""
    height, width, channels = values.shape
    pixels = values.astype(f"{byte_order}u2").tobytes()
    bits = struct.pack(f"{byte_order}{channels}H", *([16] * channels))
    data_offset = 8
    bits_offset = data_offset + len(pixels)
    ifd_offset = bits_offset + len(bits)

    # (tag, type, count, value): type 3 is SHORT, 4 is LONG.
    entries = [
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, channels, bits_offset),
        (259, 3, 1, 1),  # no compression
        (262, 3, 1, 2),  # RGB
        (273, 4, 1, data_offset),
        (277, 3, 1, channels),
        (278, 4, 1, height),
        (279, 4, 1, len(pixels)),
        (284, 3, 1, 1),  # chunky planar configuration
    ]
    if channels == 4:
        entries.append((338, 3, 1, 2))  # unassociated alpha

    marker = b"II" if byte_order == "<" else b"MM"
    out = bytearray(marker + struct.pack(f"{byte_order}HI", 42, ifd_offset) + pixels + bits)
    out += struct.pack(f"{byte_order}H", len(entries))
    for tag, kind, count, value in entries:
        if kind == 3 and count == 1:
            field = struct.pack(f"{byte_order}HH", value, 0)
        else:
            field = struct.pack(f"{byte_order}I", value)
        out += struct.pack(f"{byte_order}HHI", tag, kind, count) + field
    out += struct.pack(f"{byte_order}I", 0)
    return bytes(out)
