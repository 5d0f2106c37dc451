"""Compressed request bodies for tests: a gzip "bomb" built in a fraction of a second."""

from __future__ import annotations

import struct
import zlib

GiB = 1024**3
_SEGMENT = 16 * 1024 * 1024


def gzip_bomb(inflated_bytes: int = GiB) -> bytes:
    """A valid gzip member of `inflated_bytes` zero bytes (a multiple of 16 MiB), about 1000 times smaller.

    A full flush resets deflate's window, so the compressed 16 MiB segment is self-contained and can be
    repeated: no need to push a gigabyte through the compressor (the crc32 is still computed)."""
    assert inflated_bytes % _SEGMENT == 0
    zeros = bytes(_SEGMENT)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    segment = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    end = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS).flush()  # an empty final block
    n = inflated_bytes // _SEGMENT
    crc = 0
    chunk_crc = zlib.crc32(zeros)
    for _ in range(n):
        crc = zlib.crc32(zeros, crc) if crc else chunk_crc
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    return header + segment * n + end + struct.pack("<II", crc, inflated_bytes & 0xFFFFFFFF)
