"""PNG files of 8-bit RGB arrays, encoded for speed (comparison images, tiles)."""
import struct
import zlib

import numpy as np

from core import atomic

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_bytes(rgb):
    """An H x W x 3 uint8 array as the bytes of an 8-bit RGB PNG file.

    Every row gets PNG's Up filter (each byte minus the one above it), and zlib compresses with its
    run-length strategy at level 1. Pillow's PNG writer tries four filters on every row and has no option to
    skip that; on H&E tiles that search costs more than the compression.
    """
    # Faster to write and to read back than Pillow's default PNGs, for slightly larger files
    # (docs/benchmarks.md, "Why the code is as it is").
    height, width, _ = rgb.shape
    rows = rgb.reshape(height, width * 3)
    filtered = np.empty((height, width * 3 + 1), dtype=np.uint8)
    filtered[:, 0] = 2  # the Up filter; above the first row PNG assumes zeros
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # uint8 wraps modulo 256, as PNG's filters do
    compressor = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    data = compressor.compress(filtered) + compressor.flush()

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB, deflate, filters, no interlace
    return _PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def write_png(path, rgb):
    """Write an H x W x 3 uint8 array to path as a PNG (png_bytes), atomically; not flushed to the disk
    one by one (a rerun recreates these), but never left half-written."""
    data = png_bytes(rgb)
    atomic.atomic_write(path, lambda tmp: atomic.write_bytes(tmp, data), durable=False)
