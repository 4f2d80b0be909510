"""PNG files of 8-bit RGB arrays, encoded for speed (comparison images, tiles), and the mark that tells
the pictures this project draws from tiles."""
import struct
import zlib

import numpy as np

from core import atomic

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The PNG text chunk that marks a picture this project drew (comparison image, loss curve, PCA plot), so that
# the tile reader never takes one for a tile. Tiles cut by Prepare_Tiles.py are inputs and carry no mark.
OUTPUT_MARK_KEY = "ae-output"
PNG_MARK = {OUTPUT_MARK_KEY: "a picture drawn by AE_CRC, not a tile"}  # savefig(..., metadata=PNG_MARK)


def _png_chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))


def mark_png(data):
    """The bytes of a PNG file with the OUTPUT_MARK_KEY text chunk added after its header: how a picture the
    project draws is marked as an output (Pillow: save to bytes, then mark_png; matplotlib: metadata=PNG_MARK)."""
    if not data.startswith(_PNG_SIGNATURE):
        raise ValueError("not a PNG file")
    end_of_header = len(_PNG_SIGNATURE) + 8 + struct.unpack(">I", data[8:12])[0] + 4
    body = OUTPUT_MARK_KEY.encode("latin-1") + b"\0" + PNG_MARK[OUTPUT_MARK_KEY].encode("latin-1")
    return data[:end_of_header] + _png_chunk(b"tEXt", body) + data[end_of_header:]


def is_marked_png(head):
    """Whether head (the first bytes of a file) is a PNG with the output mark in a text chunk before its
    pixel data; None when its chunks run past head undecided. Only chunk headers are read: no pixel is decoded."""
    if not head.startswith(_PNG_SIGNATURE):
        return False
    key = OUTPUT_MARK_KEY.encode("latin-1") + b"\0"
    offset = len(_PNG_SIGNATURE)
    while offset + 8 <= len(head):
        length, kind = struct.unpack(">I4s", head[offset:offset + 8])
        if kind in (b"IDAT", b"IEND"):
            return False
        if kind in (b"tEXt", b"iTXt", b"zTXt") and head[offset + 8:offset + 8 + len(key)] == key:
            return True
        offset += 12 + length
    return None


def png_bytes(rgb, mark=False):
    """An H x W x 3 uint8 array as the bytes of an 8-bit RGB PNG file; mark: with the output mark (mark_png).

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
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB, deflate, filters, no interlace
    png = _PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")
    return mark_png(png) if mark else png


def write_png(path, rgb, mark=False):
    """Write an H x W x 3 uint8 array to path as a PNG (png_bytes; mark: as a picture of ours, not a tile),
    atomically; not flushed to the disk one by one (a rerun recreates these), but never left half-written."""
    data = png_bytes(rgb, mark)
    atomic.atomic_write(path, lambda tmp: atomic.write_bytes(tmp, data), durable=False)
