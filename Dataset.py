"""Finding tiles in a folder tree and decoding them to RGB uint8 tensors of one size.

Training, evaluation, the notebook and feature extraction all use this module, so every tool sees
the same files in the same order, decoded the same way.
"""
import io
import os
import struct
import warnings
import zlib

import numpy as np
import torch
import torchvision.io
from PIL import Image, ImageFile, ImageOps

from cli import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tiff", ".tif", ".webp")
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a half-grey tile


def find_images(folder):
    """Every image file under folder, at any depth, as sorted paths. Symbolic links are followed,
    each directory once, so a link loop ends and no file is listed twice. A folder whose name looks
    like an image (x.png/) is an ordinary folder: searched, never reported as a bad file."""
    if not os.path.exists(folder):
        raise UserError(f"image folder {folder!r} does not exist: set the folder path in Config.py "
                        f"or pass --folder_path_...=PATH to a folder of images "
                        f"(accepted extensions: {' '.join(IMAGE_EXTENSIONS)})")
    if not os.path.isdir(folder):
        raise UserError(f"{folder!r} is a file, not a folder: point the folder path at the folder that holds the tiles")
    found = []
    seen_dirs = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        stat = os.stat(root)
        if (stat.st_dev, stat.st_ino) in seen_dirs:
            dirs[:] = []
            continue
        seen_dirs.add((stat.st_dev, stat.st_ino))
        dirs.sort()  # which of two links to one folder is kept must not depend on directory order
        found.extend(os.path.join(root, name) for name in files if name.lower().endswith(IMAGE_EXTENSIONS))
    found.sort(key=lambda path: os.path.relpath(path, folder).split(os.sep))
    if not found:
        raise UserError(f"no images found in {folder!r} or its subfolders "
                        f"(accepted extensions: {' '.join(IMAGE_EXTENSIONS)})")
    return found


def _to_rgb(img):
    """Any PIL mode -> RGB. Transparency is composited on white (slide background); 16-bit and
    float images are scaled to 8 bits instead of clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(img, dtype=np.float32)
        if img.mode.startswith("I;16"):
            top = 65535.0  # a dark 16-bit image stays dark, whatever its brightest pixel
        else:
            top = 1.0 if img.mode == "F" and values.max() <= 1.0 else 65535.0 if values.max() > 255 else 255.0
        img = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")  # no copy of an RGB image: it may be huge


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# torchvision 0.29 deprecates its image decoders; where a later release drops them, PIL decodes every file.
_DECODE_PNG = getattr(torchvision.io, "decode_png", None)


def _decode_plain_png(data, tile_size):
    """The common tile, an 8-bit RGB PNG already tile_size square, decoded by libpng straight into a
    tensor (no PIL image, no copies); None for anything else, which goes through PIL."""
    if _DECODE_PNG is None or len(data) < 33 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    bit_depth, colour_type = data[24], data[25]
    if (width, height) != (tile_size, tile_size) or bit_depth != 8 or colour_type != 2:
        return None
    try:
        return _DECODE_PNG(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                           mode=torchvision.io.ImageReadMode.RGB)
    except RuntimeError:
        raise ValueError("damaged PNG data (truncated or corrupt)") from None


def load_image(path, tile_size):
    """Decode path to a 3 x tile_size x tile_size uint8 tensor. Raises OSError/ValueError on a bad file.
    EXIF orientation is applied; a non-square image is centre-cropped to a square before resizing.
    A huge image is held in memory about once: JPEGs are decoded downscaled, and nothing is copied."""
    with open(path, "rb") as handle:
        data = handle.read()
    if not data:
        raise ValueError("empty file (0 bytes)")
    plain = _decode_plain_png(data, tile_size)
    if plain is not None:
        return plain
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's warnings (EXIF, palette) are not the user's problem
        # Everything happens inside the with: img may be the opened image itself, which closing frees.
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (tile_size, tile_size))
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            img = _to_rgb(img)
            width, height = img.size
            if width != height:
                side = min(width, height)
                left, top = (width - side) // 2, (height - side) // 2
                img = img.crop((left, top, left + side, top + side))
            if img.size != (tile_size, tile_size):
                img = img.resize((tile_size, tile_size), Image.BICUBIC, reducing_gap=3.0)
            return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()


def png_bytes(rgb):
    """An H x W x 3 uint8 array as the bytes of an 8-bit RGB PNG file.

    Every row gets PNG's Up filter (each byte minus the one above it), and zlib compresses with its
    run-length strategy at level 1. Pillow's PNG writer tries four filters on every row and has no option to
    skip that; on H&E tiles that search costs more than the compression. Measured on the sample tiles and
    their comparison images: writing is about 2.4x faster and reading back (libpng) about 1.7x faster than
    with Pillow's defaults, for files about 4% larger.
    """
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
    """Write an H x W x 3 uint8 array to path as a PNG (png_bytes)."""
    data = png_bytes(rgb)
    with open(path, "wb") as handle:
        handle.write(data)


def describe_error(err):
    """A short reason for a file that failed to decode, for the one-line warning."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, Image.UnidentifiedImageError) or "cannot identify image file" in text:
        return "not a readable image (empty, truncated or another file type)"
    return text


class ImageFolder(torch.utils.data.Dataset):
    """Tiles under a folder. Items are dicts {"image": uint8 tensor or None, "path", "error"}, so a bad
    file never stops a worker: collate() drops it and reports it to the main process."""

    def __init__(self, folder, tile_size, paths=None):
        self.folder = folder
        self.tile_size = tile_size
        self.paths = find_images(folder) if paths is None else list(paths)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        path = self.paths[index]
        try:
            return {"image": load_image(path, self.tile_size), "path": path, "error": None}
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as err:
            return {"image": None, "path": path, "error": describe_error(err)}


def collate(items):
    """Batch the readable items; returns (uint8 N x 3 x H x W, paths, [(path, reason) of skipped files])."""
    good = [item for item in items if item["image"] is not None]
    skipped = [(item["path"], item["error"]) for item in items if item["image"] is None]
    if good:
        # numpy's copy runs on this thread alone: torch.stack would start an intra-op thread team, which
        # waits for a free core while the evaluation's PNG threads are busy.
        images = torch.from_numpy(np.stack([item["image"].numpy() for item in good]))
    else:
        images = torch.empty(0, 3, 0, 0, dtype=torch.uint8)
    return images, [item["path"] for item in good], skipped


class SkipLog:
    """Warns once per unreadable file, in the main process, and remembers them for the summary."""

    def __init__(self, verbose=True):
        self.skipped = {}
        self.verbose = verbose

    @classmethod
    def quiet(cls):
        """A log that remembers without printing (non-zero ranks of a multi-process run)."""
        return cls(verbose=False)

    def add(self, skipped):
        for path, reason in skipped:
            if path not in self.skipped:
                self.skipped[path] = reason
                if self.verbose:
                    print(f"warning: skipped {path}: {reason}", flush=True)

    def __len__(self):
        return len(self.skipped)

    def summary(self):
        return f"{len(self.skipped)} unreadable file(s) skipped" if self.skipped else "no files skipped"
