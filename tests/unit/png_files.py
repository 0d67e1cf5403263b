"""PNG files written byte by byte, for what Pillow would not write: image data shorter than the header promises."""
from __future__ import annotations

import struct
import zlib


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_with_data(*, width: int, height: int, bit_depth: int, colour_type: int, interlaced: bool, data_bytes: int,
                  idat_pieces: int = 1) -> bytes:
    """A PNG whose image data inflates to `data_bytes` (filter byte 0 and zero pixels), in `idat_pieces` IDAT chunks."""
    compressed = zlib.compress(b"\0" * data_bytes)
    step = -(-len(compressed) // idat_pieces)
    palette = _chunk(b"PLTE", bytes(768)) if colour_type == 3 else b""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, int(interlaced)))
            + palette + b"".join(_chunk(b"IDAT", compressed[i:i + step]) for i in range(0, len(compressed), step)) + _chunk(b"IEND", b""))
