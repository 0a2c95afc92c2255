"""Writers of 16-bit-per-channel PNG and TIFF files, which Pillow cannot save itself.

The PNG writer applies the chosen scanline filter (0 none, 1 sub, 2 up, 4 Paeth), so tests
exercise the decoder's unfiltering. The TIFF writer stores one strip per plane, raw or
deflate-compressed.
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


def tiff16(
    values: np.ndarray, byte_order: str = "<", *, deflate: bool = False, planar: bool = False
) -> bytes:
    """Encode ``values`` (``[H, W, 3 or 4]``) as a 16-bit RGB(A) TIFF with one strip per plane.

    ``deflate`` compresses the strips with zlib (compression 8); ``planar`` stores each channel
    as its own plane (planar configuration 2) instead of interleaved samples.
    """
    height, width, channels = values.shape
    typed = values.astype(f"{byte_order}u2")
    planes = [typed[..., c] for c in range(channels)] if planar else [typed]
    strips = [plane.tobytes() for plane in planes]
    if deflate:
        strips = [zlib.compress(strip) for strip in strips]

    out = bytearray(b"II" if byte_order == "<" else b"MM")
    out += struct.pack(f"{byte_order}HI", 42, 0)  # the IFD offset is patched below
    strip_offsets = []
    for strip in strips:
        strip_offsets.append(len(out))
        out += strip

    def array(kind: int, items: list[int]) -> int:
        offset = len(out)
        out.extend(struct.pack(f"{byte_order}{len(items)}{'H' if kind == 3 else 'I'}", *items))
        return offset

    # (tag, type, values): type 3 is SHORT, 4 is LONG.
    entries = [
        (256, 4, [width]),
        (257, 4, [height]),
        (258, 3, [16] * channels),
        (259, 3, [8 if deflate else 1]),
        (262, 3, [2]),  # RGB
        (273, 4, strip_offsets),
        (277, 3, [channels]),
        (278, 4, [height]),
        (279, 4, [len(strip) for strip in strips]),
        (284, 3, [2 if planar else 1]),
    ]
    if channels == 4:
        entries.append((338, 3, [2]))  # unassociated alpha

    fields = []
    for tag, kind, items in entries:
        size = 2 if kind == 3 else 4
        if len(items) * size <= 4:
            packed = struct.pack(f"{byte_order}{len(items)}{'H' if kind == 3 else 'I'}", *items)
            fields.append((tag, kind, len(items), packed.ljust(4, b"\x00")))
        else:
            fields.append(
                (tag, kind, len(items), struct.pack(f"{byte_order}I", array(kind, items)))
            )
    if len(out) % 2:
        out += b"\x00"
    struct.pack_into(f"{byte_order}I", out, 4, len(out))
    out += struct.pack(f"{byte_order}H", len(fields))
    for tag, kind, count, field in fields:
        out += struct.pack(f"{byte_order}HHI", tag, kind, count) + field
    out += struct.pack(f"{byte_order}I", 0)
    return bytes(out)
