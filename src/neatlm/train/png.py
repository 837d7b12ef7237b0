"""Write an RGB image as a PNG with numpy and the standard library (zlib, struct).

Pillow and matplotlib are not dependencies of neatlm (matplotlib is an optional extra), and the
visual thoughts of ``neat generate`` must be viewable without them: a PNG of 8-bit RGB rows is a
signature and three chunks, which this writes directly.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(image: np.ndarray) -> bytes:
    """The PNG file of ``image``: uint8 (H, W, 3)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    h, w, _ = image.shape
    rows = b"".join(b"\x00" + image[r].tobytes() for r in range(h))     # filter type 0 on every row
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)                 # 8-bit truecolour
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows, 9))
            + _chunk(b"IEND", b""))


def write_png(path: str | Path, image: np.ndarray) -> Path:
    path = Path(path)
    path.write_bytes(png_bytes(image))
    return path


def read_png(path: str | Path) -> np.ndarray:
    """Read back a PNG written by :func:`write_png` (8-bit RGB, filter 0 rows only): for tests."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, w, h = 8, b"", 0, 0
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(h, 1 + 3 * w)
    return raw[:, 1:].reshape(h, w, 3).copy()
