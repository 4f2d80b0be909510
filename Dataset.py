"""Finding tiles in a folder tree and decoding them to RGB uint8 tensors of one size.

Training, evaluation, the notebook and feature extraction all use this module, so every tool sees
the same files in the same order, decoded the same way.
"""
import atexit
import io
import os
import signal
import stat
import struct
import threading
import warnings
import weakref
import zlib

import numpy as np
import torch
from PIL import ExifTags, Image, ImageFile

from core.errors import UserError, exhausted
from core.names import printable, special_kind
from core.png import is_marked_png
from core.signals import STOP_SIGNALS

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tiff", ".tif", ".webp")
# The Pillow decoders of those extensions, and no others: a file of another type under an image name
# (PostScript, which Pillow would hand to Ghostscript) is not decoded.
PILLOW_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")
MAX_FILE_BYTES = 4096 * 4096 * 8  # an uncompressed 4096 x 4096 16-bit RGBA image: no tile file is larger
# Reasons of what the folder walk leaves out (find_images' skipped), shown and listed with the unreadable files.
OWN_PICTURE = "a picture this project drew (comparison image, loss curve or PCA plot), not a tile; not read"
UNREADABLE_FOLDER = "folder not readable ({reason}): the files in it were not searched; fix its permissions"
_HEAD_BYTES = 4096  # read of a PNG's start to find the output mark; more only when its chunks run past it
_MORE_HEAD_BYTES = 1 << 20  # the most read beyond that (a large colour profile before the text chunks)
_ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                 4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
_warned = set()


def _identity(path):
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _is_own_picture(path):
    """Whether path is a PNG carrying the mark of the pictures this project draws (outputs.is_marked_png).
    Only its first bytes are read, and only when it is a regular file (a pipe or a device is left for the
    loader to report)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        # O_NONBLOCK: a pipe swapped in after the check cannot block the open; the fstat catches it.
        with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                return False
            head = handle.read(_HEAD_BYTES)
            marked = is_marked_png(head)
            if marked is None:
                marked = is_marked_png(head + handle.read(_MORE_HEAD_BYTES))
    except OSError:
        return False
    return bool(marked)


def _walk_error(folder, skipped):
    """os.walk's onerror: the image folder itself unreadable is an error; a subfolder goes to skipped."""
    def report(err):
        reason = (err.strerror or str(err)).lower()
        if os.path.abspath(err.filename or folder) == os.path.abspath(folder):
            if isinstance(err, PermissionError):
                raise UserError(f"image folder {folder!r} cannot be read (permission denied): fix its permissions "
                                "(chmod u+rx) or run as a user who may read it")
            raise UserError(f"image folder {folder!r} cannot be read ({reason}): check the folder")
        skipped[err.filename] = UNREADABLE_FOLDER.format(reason=reason)
    return report


def find_images(folder, exclude=(), skipped=None):
    """Every image file under folder, at any depth, as sorted paths. Symbolic links are followed,
    each directory once, so a link loop ends and no file is listed twice. A folder whose name looks
    like an image (x.png/) is an ordinary folder: searched, never reported as a bad file. exclude: this
    run's output folders and files, never read back as input when they lie inside folder. Subfolders that
    cannot be read and the pictures this project drew (_is_own_picture) are left out, each with its reason
    in the dict skipped when one is given."""
    if not os.path.exists(folder):
        raise UserError(f"image folder {folder!r} does not exist: set the folder path in Config.py "
                        f"or pass --folder_path_...=PATH to a folder of images "
                        f"(accepted extensions: {' '.join(IMAGE_EXTENSIONS)})")
    if not os.path.isdir(folder):
        raise UserError(f"{folder!r} is a file, not a folder: point the folder path at the folder that holds the tiles")
    skipped = {} if skipped is None else skipped
    skip_dirs = {_identity(path) for path in exclude if os.path.isdir(path)} - {None}
    skip_files = {(_identity(os.path.dirname(os.path.abspath(path))), os.path.basename(path))
                  for path in exclude if not os.path.isdir(path)}
    found = []
    seen_dirs = set()
    for root, dirs, files in os.walk(folder, onerror=_walk_error(folder, skipped), followlinks=True):
        here = _identity(root)
        if here in seen_dirs or here in skip_dirs:
            dirs[:] = []
            continue
        seen_dirs.add(here)
        dirs.sort()  # which of two links to one folder is kept must not depend on directory order
        found.extend(os.path.join(root, name) for name in files
                     if name.lower().endswith(IMAGE_EXTENSIONS) and (here, name) not in skip_files)
    own = {path for path in found if path.lower().endswith(".png") and _is_own_picture(path)}
    skipped.update(dict.fromkeys(sorted(own), OWN_PICTURE))
    found = sorted((path for path in found if path not in own),
                   key=lambda path: os.path.relpath(path, folder).split(os.sep))
    if not found:
        raise UserError(f"no images found in {folder!r} or its subfolders "
                        f"(accepted extensions: {' '.join(IMAGE_EXTENSIONS)})"
                        + (f"; {len(skipped)} left out (unreadable folders or pictures this project drew)"
                           if skipped else ""))
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
    float images are scaled to 8 bits instead of clipped. Each mode takes at most one more image-sized
    buffer than the decoded image (scaled in place, pasted onto the white), so that a transparent or
    16-bit tile needs about the memory of an RGB one."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(img, dtype=np.float32)
        if img.mode.startswith("I;16"):
            top = 65535.0  # a dark 16-bit image stays dark, whatever its brightest pixel
        else:
            top = 1.0 if img.mode == "F" and values.max() <= 1.0 else 65535.0 if values.max() > 255 else 255.0
        values = values if values.flags.writeable else values.copy()
        values /= top  # the steps of values / top * 255.0 + 0.5, in place
        values *= 255.0
        values += 0.5
        img = Image.fromarray(np.clip(values, 0, 255, out=values).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return on_white(img)
    return img if img.mode == "RGB" else img.convert("RGB")  # no copy of an RGB image: it may be huge


def on_white(img):
    """An image with transparency (RGBA, LA, ...) composited on white, as RGB: transparent areas of a tile
    or a slide region are glass, whose background is white. The same pixels as alpha_composite on white,
    without its two more copies of the image."""
    if img.mode not in ("RGBA", "LA"):
        img = img.convert("RGBA")
    background = Image.new("RGB", img.size, (255, 255, 255))
    background.paste(img, mask=img)
    return background


def check_truncation_policy():
    """UserError when Pillow was told (by other code in this process) to load truncated images: their
    missing rows would become black pixels instead of a skipped file."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise UserError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process: truncated tiles would be "
                        "read as black pixels; remove the code that sets it")


def _expected_png_bytes(header):
    """Bytes of filtered rows a PNG of this IHDR body holds once decompressed (Adam7 passes included)."""
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour, 1)
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    total = 0
    for x0, y0, dx, dy in passes if interlace else ((0, 0, 1, 1),):
        columns, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if columns > 0 and rows > 0:
            total += rows * (1 + -(-(columns * channels * depth) // 8))
    return total


def check_png_complete(data):
    """ValueError when a PNG's compressed pixel data ends before the last row its header declares: Pillow
    would fill the missing rows with black and report nothing. Inflates in pieces, keeping none of them."""
    offset, header, compressed = 8, None, []
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        if kind == b"IHDR":
            header = data[offset + 8:offset + 21]
        elif kind == b"IDAT":
            compressed.append(data[offset + 8:offset + 8 + length])
        elif kind == b"IEND":
            break
        offset += 12 + length
    if header is None or len(header) != 13:
        return  # Pillow reports a missing or short header itself
    expected, produced = _expected_png_bytes(header), 0
    inflater, pending = zlib.decompressobj(), b"".join(compressed)
    try:
        while pending and produced < expected and not inflater.eof:
            produced += len(inflater.decompress(pending, 1 << 20))
            pending = inflater.unconsumed_tail
    except zlib.error:
        return  # damaged compressed data: Pillow's decoder reports it
    if produced < expected:
        raise ValueError(f"image data incomplete ({produced} of {expected} bytes of pixel rows): the file is "
                         "truncated or damaged; copy it again")


def _ends_in_an_empty_row(img):
    """Whether either of the last two rows of a decoded image holds only zeros (read without a copy of the rest)."""
    tail = np.asarray(img.crop((0, max(0, img.height - 2), img.width, img.height)))
    return not tail.reshape(len(tail), -1).any(axis=1).all()


def _orientation(img, name):
    """The transpose that turns img upright by its EXIF orientation, or None. Damaged EXIF data is no reason
    to lose the tile: its orientation is ignored, with one warning per file."""
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception as err:  # Pillow's EXIF parser meets damaged data with many exception types
        if name not in _warned:
            _warned.add(name)
            print(f"warning: {printable(name)}: damaged EXIF data ({printable(describe_error(err))}); "
                  "orientation ignored", flush=True)
        return None
    return _ORIENTATIONS.get(orientation) if isinstance(orientation, int) else None


def upright_rgb(img, name="image"):
    """An opened PIL image, decoded, turned upright by its EXIF orientation and converted to RGB (_to_rgb):
    how every tile and every slide is read. name: the file, for the warning about damaged EXIF data."""
    check_truncation_policy()
    img.load()
    method = _orientation(img, name)
    return _to_rgb(img if method is None else img.transpose(method))


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
            img.load()
            # Rows a PNG lacks stay zero, the last ones first (the last Adam7 pass holds every other row):
            # only a PNG ending in an empty row is inflated once more to count its rows.
            if img.format == "PNG" and _ends_in_an_empty_row(img):
                check_png_complete(data)
            img = upright_rgb(img, path)
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
        check_truncation_policy()
        self.folder = folder
        self.tile_size = tile_size
        self.left_out = {}  # {path: reason} of what find_images left out: unreadable folders, our own pictures
        self.paths = find_images(folder, exclude, self.left_out) if paths is None else list(paths)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        path = self.paths[index]
        try:
            return {"image": load_image(path, self.tile_size), "path": path, "error": None}
        # Pillow's decoders meet hostile data with many exception types (OSError, ValueError, SyntaxError,
        # struct.error, IndexError ...): whatever a file does, it is skipped, never fatal. Memory or open files
        # running out is the machine's limit, not the file's fault: the run stops saying what to lower.
        except Exception as err:
            if exhausted(err):
                raise
            return {"image": None, "path": path, "error": describe_error(err)}


_running = weakref.WeakSet()  # iterators of start_batches whose loader processes may still run
_exit_hook = []


def _stop_running_loaders():
    """At exit, end the loader processes of iterators still alive (an error's traceback keeps them): Python
    would send them SIGTERM, which they ignore (signals.ignore_interrupts), and wait for them forever."""
    for iterator in list(_running):
        iterator._shutdown_workers()


def start_batches(loader):
    """iter(loader), with its worker processes started while the stop signals (signals.STOP_SIGNALS) wait: a
    worker that got one before its worker_init_fn (signals.ignore_interrupts) ran would die with a traceback.
    A signal that came meanwhile is delivered to this process as soon as the workers run."""
    if not loader.num_workers or threading.current_thread() is not threading.main_thread():
        return iter(loader)
    if not _exit_hook:  # registered after multiprocessing's own exit hook, so it runs before it
        _exit_hook.append(atexit.register(_stop_running_loaders))
    received = []
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum))
                for signum in STOP_SIGNALS}
    try:
        iterator = iter(loader)
        _running.add(iterator)
        return iterator
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        for signum in received[:1]:
            signal.raise_signal(signum)


def in_shared_memory(batch):
    """batch, moved into shared memory when this is a loader process. Otherwise the move happens when the batch
    is sent, in a thread of the loader process whose error is only printed, and the run waits forever for the
    batch (a container's small /dev/shm); here the error reaches the main process (cli.run_main: one line)."""
    if torch.utils.data.get_worker_info() is not None:
        batch.share_memory_()
    return batch


def collate(items):
    """Batch the readable items; returns (uint8 N x 3 x H x W, paths, [(path, reason) of skipped files])."""
    good = [item for item in items if item["image"] is not None]
    skipped = [(item["path"], item["error"]) for item in items if item["image"] is None]
    if good:
        # numpy's copy runs on this thread alone: torch.stack would start an intra-op thread team, which
        # waits for a free core while the evaluation's PNG threads are busy.
        images = in_shared_memory(torch.from_numpy(np.stack([item["image"].numpy() for item in good])))
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

    def add_left_out(self, left_out):
        """What the folder walk left out (ImageFolder.left_out): a warning per unreadable folder, one for all
        the pictures this project drew; all of them listed with the skipped files."""
        own = [path for path, reason in left_out.items() if reason == OWN_PICTURE]
        self.add((path, reason) for path, reason in left_out.items() if reason != OWN_PICTURE)
        self.skipped.update(dict.fromkeys(own, OWN_PICTURE))
        if own and self.verbose:
            print(f"warning: skipped {len(own)} picture(s) this project drew (comparison images, loss curves, "
                  f"PCA plots), not tiles, such as {printable(own[0])}", flush=True)

    def __len__(self):
        return len(self.skipped)

    def summary(self):
        return f"{len(self.skipped)} unreadable file(s) skipped" if self.skipped else "no files skipped"
