"""Finding tiles in a folder tree and decoding them to RGB uint8 tensors of one size.

Training, evaluation, the notebook and feature extraction all use this module, so every tool sees
the same files in the same order, decoded the same way.
"""
import io
import os
import signal
import threading
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

from core.errors import UserError
from core.names import printable, special_kind

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tiff", ".tif", ".webp")
# The Pillow decoders of those extensions, and no others: a file of another type under an image name
# (PostScript, which Pillow would hand to Ghostscript) is not decoded.
PILLOW_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")
MAX_FILE_BYTES = 4096 * 4096 * 8  # an uncompressed 4096 x 4096 16-bit RGBA image: no tile file is larger


def _identity(path):
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def find_images(folder, exclude=()):
    """Every image file under folder, at any depth, as sorted paths. Symbolic links are followed,
    each directory once, so a link loop ends and no file is listed twice. A folder whose name looks
    like an image (x.png/) is an ordinary folder: searched, never reported as a bad file. exclude: this
    run's output folders and files, never read back as input when they lie inside folder."""
    if not os.path.exists(folder):
        raise UserError(f"image folder {folder!r} does not exist: set the folder path in Config.py "
                        f"or pass --folder_path_...=PATH to a folder of images "
                        f"(accepted extensions: {' '.join(IMAGE_EXTENSIONS)})")
    if not os.path.isdir(folder):
        raise UserError(f"{folder!r} is a file, not a folder: point the folder path at the folder that holds the tiles")
    skip_dirs = {_identity(path) for path in exclude if os.path.isdir(path)} - {None}
    skip_files = {(_identity(os.path.dirname(os.path.abspath(path))), os.path.basename(path))
                  for path in exclude if not os.path.isdir(path)}
    found = []
    seen_dirs = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        here = _identity(root)
        if here in seen_dirs or here in skip_dirs:
            dirs[:] = []
            continue
        seen_dirs.add(here)
        dirs.sort()  # which of two links to one folder is kept must not depend on directory order
        found.extend(os.path.join(root, name) for name in files
                     if name.lower().endswith(IMAGE_EXTENSIONS) and (here, name) not in skip_files)
    found.sort(key=lambda path: os.path.relpath(path, folder).split(os.sep))
    if not found:
        raise UserError(f"no images found in {folder!r} or its subfolders "
                        f"(accepted extensions: {' '.join(IMAGE_EXTENSIONS)})")
    return found


def _check_file(info):
    """ValueError unless info (an os.stat result) is a regular file of a size a tile can have."""
    kind = special_kind(info.st_mode)
    if kind:
        raise ValueError(f"not a regular file (a {kind}); not read")
    if info.st_size > MAX_FILE_BYTES:
        raise ValueError(f"{info.st_size / 1e6:.0f} MB, larger than any tile ({MAX_FILE_BYTES / 1e6:.0f} MB at "
                         "most); not read: cut large images into tiles with Prepare_Tiles.py")


def read_tile_file(path):
    """The bytes of path, read only when it is a regular file no larger than MAX_FILE_BYTES (checked before
    it is opened), so a named pipe, a device or a huge file neither blocks nor fills the memory."""
    _check_file(os.stat(path))
    # O_NONBLOCK: a pipe swapped in after the check still cannot block the open; the fstat catches it.
    handle = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with open(handle, "rb") as file:
        _check_file(os.fstat(handle))
        data = file.read(MAX_FILE_BYTES + 1)
    if not data:
        raise ValueError("empty file (0 bytes)")
    if len(data) > MAX_FILE_BYTES:
        _check_file(os.stat(path))  # it grew while being read
    return data


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
        img = on_white(img)
    return img if img.mode == "RGB" else img.convert("RGB")  # no copy of an RGB image: it may be huge


def on_white(img):
    """An image with transparency composited on white, as RGBA: transparent areas of a tile or a slide
    region are glass, whose background is white."""
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)


def upright_rgb(img):
    """An opened PIL image, decoded, turned upright by its EXIF orientation and converted to RGB (_to_rgb):
    how every tile and every slide is read."""
    img.load()
    ImageOps.exif_transpose(img, in_place=True)
    return _to_rgb(img)


def load_image(path, tile_size):
    """Decode path to a 3 x tile_size x tile_size uint8 tensor. Raises OSError/ValueError on a bad file.
    EXIF orientation is applied; a non-square image is centre-cropped to a square before resizing.
    A huge image is held in memory about once: JPEGs are decoded downscaled, and nothing is copied."""
    data = read_tile_file(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's warnings (EXIF, palette) are not the user's problem
        # Everything happens inside the with: img may be the opened image itself, which closing frees.
        with Image.open(io.BytesIO(data), formats=PILLOW_FORMATS) as img:
            img.draft("RGB", (tile_size, tile_size))
            img = upright_rgb(img)
            width, height = img.size
            if width != height:
                side = min(width, height)
                left, top = (width - side) // 2, (height - side) // 2
                img = img.crop((left, top, left + side, top + side))
            if img.size != (tile_size, tile_size):
                img = img.resize((tile_size, tile_size), Image.BICUBIC, reducing_gap=3.0)
            return torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy())  # one copy, to C x H x W


def describe_error(err):
    """A short reason for a file that failed to decode, for the one-line warning."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, Image.UnidentifiedImageError) or "cannot identify image file" in text:
        return "not a readable image (empty, truncated or another file type)"
    return text


class ImageFolder(torch.utils.data.Dataset):
    """Tiles under a folder. Items are dicts {"image": uint8 tensor or None, "path", "error"}, so a bad
    file never stops a worker: collate() drops it and reports it to the main process."""

    def __init__(self, folder, tile_size, paths=None, exclude=()):
        self.folder = folder
        self.tile_size = tile_size
        self.paths = find_images(folder, exclude) if paths is None else list(paths)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        path = self.paths[index]
        try:
            return {"image": load_image(path, self.tile_size), "path": path, "error": None}
        # Pillow's decoders meet hostile data with many exception types (OSError, ValueError, SyntaxError,
        # struct.error, IndexError, MemoryError ...): whatever a file does, it is skipped, never fatal.
        except Exception as err:
            return {"image": None, "path": path, "error": describe_error(err)}


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def start_batches(loader):
    """iter(loader), with its worker processes started while Ctrl-C and SIGTERM wait: a worker that got one
    before its worker_init_fn (runtime.ignore_interrupts) ran would die with a traceback. A signal that came
    meanwhile is delivered to this process as soon as the workers run."""
    if not loader.num_workers or threading.current_thread() is not threading.main_thread():
        return iter(loader)
    received = []
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum))
                for signum in _STOP_SIGNALS}
    try:
        return iter(loader)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        for signum in received[:1]:
            signal.raise_signal(signum)


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
                    print(f"warning: skipped {printable(path)}: {printable(reason)}", flush=True)

    def __len__(self):
        return len(self.skipped)

    def summary(self):
        return f"{len(self.skipped)} unreadable file(s) skipped" if self.skipped else "no files skipped"
