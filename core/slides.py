"""Reading whole slides: any file OpenSlide opens (SVS, NDPI, MRXS, pyramidal TIFF ...) and one-level images
Pillow opens (PNG, JPEG, plain TIFF), at a chosen resolution, with a tissue mask and a grid of tile positions.

Positions are always level-0 pixels, so tiles of one slide keep their names whatever resolution they are cut
at. Slide objects hold OpenSlide handles: each DataLoader worker opens its own with open_slide(path, mpp).
"""
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from core.errors import UserError
from core.names import printable
from Dataset import on_white

SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".tif", ".tiff", ".scn", ".vms", ".vmu", ".svslide", ".bif",
                  ".dcm", ".png", ".jpg", ".jpeg")
PILLOW_PIXEL_LIMIT = 400_000_000  # a one-level image is held in memory whole: beyond this, convert it to a pyramid
MASK_MPP = 2.0                # microns per pixel of the tissue mask: a 256-px tile at 0.5 um/px spans 64 mask pixels
MASK_MAX_SIDE = 8192          # the mask's longer side at most, whatever the slide's size
MIN_SATURATION = 0.07         # HSV saturation (0..1) above which a pixel is stained
BLACK_LEVEL = 40              # a pixel whose brightest channel is below this is a black border, a pen mark or dust
BACKGROUND_GRAY = 220         # a pixel whose mean of R, G, B is at least this is glass
HOLE_UM2 = 50 * 50            # unstained gaps inside tissue smaller than this area count as tissue
GRAYSCALE_SHARE = 0.05       # below this share of stained pixels among the dark ones, an image is a grayscale scan
SPECK_UM2 = 30 * 30           # stained areas smaller than this are dust or debris, not tissue
_SNAP = 0.02                  # a side ratio within 2 % of a whole number is that number: 0.499 um/px is 20x
_READ_CHUNK = 4096            # level pixels read at once for a thumbnail
_DAMAGE_BLOCK = 256           # a thumbnail chunk with damaged data is read again in blocks of this many level pixels
_TILE_NAME = re.compile(r"^(.*)_x(\d+)_y(\d+)$")


class SlideError(UserError):
    """A slide that cannot be used; str() names the file and the reason."""


def _error(path, reason):
    return SlideError(f"slide {printable(path)!r} {reason}")


# ---------------------------------------------------------------------------------------------- finding slides

def _walk_slides(folder):
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        found.extend(os.path.join(root, name) for name in files
                     if name.lower().endswith(SLIDE_SUFFIXES) and not name.startswith("."))
    return sorted(found, key=lambda path: os.path.relpath(path, folder).split(os.sep))


def _listed_slides(listing):
    base = os.path.dirname(os.path.abspath(listing))
    try:
        with open(listing, encoding="utf-8") as handle:
            lines = [line.strip() for line in handle]
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read the slide list {printable(listing)!r} ({err}): give a text file of "
                        "slide paths, one per line")
    return [os.path.join(base, line) for line in lines if line and not line.startswith("#")]


def find_slides(path):
    """The slides named by path: one slide file, a folder (searched recursively, sorted), or a .txt file listing
    slide paths one per line (relative to the .txt's folder; blank lines and # comments ignored)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        slides = _walk_slides(path)
        if not slides:
            raise UserError(f"no slides found in {printable(path)!r} or its subfolders "
                            f"(accepted suffixes: {' '.join(SLIDE_SUFFIXES)})")
        return slides
    if not os.path.exists(path):
        raise UserError(f"{printable(path)!r} not found: give a slide file, a folder of slides or a .txt list")
    if path.lower().endswith(".txt"):
        slides = _listed_slides(path)
        if not slides:
            raise UserError(f"the slide list {printable(path)!r} names no slides: one slide path per line")
        return slides
    return [path]


# ------------------------------------------------------------------------------------------------ resolution

def _plausible(mpp):
    """A microscope's resolution; a screen's 72 or 96 dpi (353 or 265 um/px) is what software writes by default."""
    return mpp is not None and math.isfinite(mpp) and 0.01 <= mpp <= 100


def _tiff_mpp(resolution, unit):
    """Microns per pixel from a TIFF XResolution (pixels per unit) and ResolutionUnit; None when not recorded."""
    per_micron = {"centimeter": 1e4, "cm": 1e4, 3: 1e4, "inch": 25400.0, 2: 25400.0}.get(unit)
    try:
        resolution = float(resolution)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if per_micron is None or not resolution > 0:
        return None
    return per_micron / resolution


def _chosen_mpp(path, recorded, slide_mpp):
    if slide_mpp and slide_mpp > 0:
        return float(slide_mpp)
    if _plausible(recorded):
        return recorded
    raise _error(path, "records no resolution: pass --slide_mpp=... (microns per pixel at full resolution, "
                        "0.25 for a 40x scan, 0.5 for 20x)")


# ----------------------------------------------------------------------------------------------- the slides

class Slide:
    """A slide opened by open_slide: level-0 dimensions and resolution, regions at any size, a thumbnail.
    Subclasses read one pyramid level's pixels (_read_level); resizing and level choice happen here."""

    path: str
    dimensions: tuple
    mpp: float
    level_downsamples: tuple = (1.0,)
    damaged_regions: list  # the errors of regions the thumbnail could not read (left white: no tissue)

    def __init__(self):
        self.damaged_regions = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        pass

    def best_level(self, downsample):
        """The lowest-resolution level whose downsample is at most downsample (a level 0.1 % finer counts)."""
        fitting = [level for level, ds in enumerate(self.level_downsamples) if ds <= downsample * 1.001]
        return max(fitting, key=lambda level: self.level_downsamples[level], default=0)

    def read_region(self, x, y, width0, height0, out_width, out_height):
        """uint8 (out_height, out_width, 3) RGB of the level-0 rectangle at (x, y) of size width0 x height0,
        read from the best level and resized; transparency on white; SlideError naming a damaged region."""
        level = self.best_level(min(width0 / out_width, height0 / out_height))
        ds = self.level_downsamples[level]
        size = (max(1, round(width0 / ds)), max(1, round(height0 / ds)))
        image = self._read_level(level, int(x), int(y), size)
        if image.size != (out_width, out_height):
            image = image.resize((out_width, out_height), Image.LANCZOS)
        return np.asarray(image)

    def thumbnail(self, max_side):
        """The whole slide as uint8 RGB with its longer side max_side, and thumbnail px per level-0 px.
        Read in chunks from the best level, so a one-level slide is never decoded whole at once."""
        scale = max_side / max(self.dimensions)
        size = (max(1, round(self.dimensions[0] * scale)), max(1, round(self.dimensions[1] * scale)))
        level = self.best_level(1 / scale)
        ds = self.level_downsamples[level]
        factor = max(1, int(1 / (scale * ds)))  # whole-number reduction of each chunk; the rest at the end
        chunk = max(factor, _READ_CHUNK // factor * factor)
        width, height = (math.ceil(side / ds) for side in self.dimensions)
        reduced = Image.new("RGB", (math.ceil(width / factor), math.ceil(height / factor)), "white")
        for top in range(0, height, chunk):
            for left in range(0, width, chunk):
                part = self._read_or_white(level, left, top, (min(chunk, width - left), min(chunk, height - top)))
                reduced.paste(part.reduce(factor) if factor > 1 else part, (left // factor, top // factor))
        return np.asarray(reduced.resize(size, Image.BOX)), size[0] / self.dimensions[0]


    def _read_or_white(self, level, left, top, size):
        """The level's pixels at (left, top) (level pixels) of size; where the data is damaged, blocks of
        _DAMAGE_BLOCK pixels stay white, so no tile is cut there, and each is named in damaged_regions."""
        ds = self.level_downsamples[level]
        try:
            return self._read_level(level, round(left * ds), round(top * ds), size)
        except SlideError as err:
            if max(size) <= _DAMAGE_BLOCK:
                self.damaged_regions.append(str(err))
                return Image.new("RGB", size, "white")
        canvas = Image.new("RGB", size, "white")
        for dy in range(0, size[1], _DAMAGE_BLOCK):
            for dx in range(0, size[0], _DAMAGE_BLOCK):
                block = (min(_DAMAGE_BLOCK, size[0] - dx), min(_DAMAGE_BLOCK, size[1] - dy))
                canvas.paste(self._read_or_white(level, left + dx, top + dy, block), (dx, dy))
        return canvas


class _OpenSlideSlide(Slide):
    def __init__(self, path, slide_mpp):
        import openslide
        super().__init__()
        self._openslide = openslide
        self.path = path
        self.handle = self._open()
        self.dimensions = tuple(self.handle.dimensions)
        self.level_downsamples = tuple(float(ds) for ds in self.handle.level_downsamples)
        props = self.handle.properties
        recorded = _float(props.get(openslide.PROPERTY_NAME_MPP_X))
        if not _plausible(recorded):
            recorded = _tiff_mpp(props.get("tiff.XResolution"), props.get("tiff.ResolutionUnit"))
        try:
            self.mpp = _chosen_mpp(path, recorded, slide_mpp)
        except SlideError:
            self.close()
            raise

    def _open(self):
        try:
            return self._openslide.OpenSlide(self.path)
        except self._openslide.OpenSlideError as err:
            raise _error(self.path, f"cannot be read by OpenSlide ({printable(str(err))}): "
                                    "is the file complete? re-copy it")

    def close(self):
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    def _read_level(self, level, x, y, size):
        try:
            return on_white(self.handle.read_region((x, y), level, size))
        except self._openslide.OpenSlideError as err:
            # OpenSlide refuses every later read on a handle that met an error: the next region needs a new one.
            self.handle.close()
            self.handle = self._open()
            ds = self.level_downsamples[level]
            raise _error(self.path, f"has damaged image data in the region x={x}, y={y}, "
                                    f"{round(size[0] * ds)} x {round(size[1] * ds)} level-0 pixels "
                                    f"({printable(str(err))})")


def _float(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


class _PillowSlide(Slide):
    """A one-level image, decoded whole as tiles are (Dataset.upright_rgb): EXIF rotation applied, transparency
    on white, 16-bit scaled."""

    def __init__(self, path, slide_mpp):
        from Dataset import PILLOW_FORMATS, upright_rgb
        super().__init__()
        self.path = path
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = PILLOW_PIXEL_LIMIT // 2  # Pillow refuses images of more than twice this
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                # No with-block: closing would free the pixels, which upright_rgb keeps when they are RGB already.
                opened = Image.open(path, formats=PILLOW_FORMATS)
                recorded = self._recorded_mpp(opened)
                self.image = upright_rgb(opened)
        except Image.DecompressionBombError:
            raise _error(path, f"has more than {PILLOW_PIXEL_LIMIT:,} pixels on one level: convert it to a "
                               "pyramidal TIFF (for example with vips tiffsave --tile --pyramid) and rerun")
        except Image.UnidentifiedImageError:
            raise _error(path, "is not a slide or image that OpenSlide or Pillow can read: check the file")
        except (OSError, ValueError, SyntaxError) as err:
            raise _error(path, f"cannot be read ({printable(str(err))}): is it complete, and a slide file, "
                               "PNG, JPEG or TIFF image?")
        finally:
            Image.MAX_IMAGE_PIXELS = limit  # tiles elsewhere in the process keep Pillow's own limit
        self.dimensions = self.image.size
        self.mpp = _chosen_mpp(path, recorded, slide_mpp)

    @staticmethod
    def _recorded_mpp(opened):
        tags = getattr(opened, "tag_v2", None)
        if not tags or 282 not in tags:
            return None
        return _tiff_mpp(tags[282], tags.get(296, 2))  # TIFF's default unit is the inch

    def close(self):
        self.image = None

    def _read_level(self, level, x, y, size):
        box = (x, y, x + size[0], y + size[1])
        inside = (max(0, x), max(0, y), min(self.dimensions[0], box[2]), min(self.dimensions[1], box[3]))
        if inside == box:
            return self.image.crop(box)
        canvas = Image.new("RGB", size, "white")  # beyond the image is glass, as OpenSlide's transparent edge
        if inside[0] < inside[2] and inside[1] < inside[3]:
            canvas.paste(self.image.crop(inside), (inside[0] - x, inside[1] - y))
        return canvas


def _tiff_truncated(path):
    """True when path is a TIFF whose image data runs past the end of the file (an interrupted copy)."""
    with open(path, "rb") as handle:
        if handle.read(4) not in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
            return False
    import tifffile
    log = logging.getLogger("tifffile")
    level = log.level
    log.setLevel(logging.CRITICAL)  # its warnings about a damaged file would come before our one line
    try:
        with tifffile.TiffFile(path) as tiff:
            end = max((offset + count for page in tiff.pages for offset, count in
                       zip(page.dataoffsets, page.databytecounts) if count), default=0)
    except Exception:  # a TIFF tifffile cannot parse: OpenSlide or Pillow says what is wrong with it
        return False
    finally:
        log.setLevel(level)
    return end > os.path.getsize(path)


def _openslide_format(path):
    try:
        import openslide
    except ImportError:
        return None
    try:
        return openslide.OpenSlide.detect_format(path)
    except openslide.OpenSlideError:
        return None


def open_slide(path, slide_mpp=0.0):
    """The slide at path: through OpenSlide when it knows the format, else through Pillow as one level.
    slide_mpp > 0 overrides the recorded resolution. SlideError when the file is not a slide, is truncated,
    or records no resolution and slide_mpp is 0."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise _error(path, "not found: check the slide path (Config.py slide_path or --slide_path=FILE)")
    if not os.path.isfile(path):
        raise _error(path, "is not a regular file (a folder, pipe or device): give a slide or image file")
    if _tiff_truncated(path):
        raise _error(path, "is truncated (its image data runs past the end of the file): re-copy it")
    if _openslide_format(path):
        return _OpenSlideSlide(path, slide_mpp)
    return _PillowSlide(path, slide_mpp)


# ------------------------------------------------------------------------------------- tile sides and the mask

def _ratio_multiple(ratio):
    """ratio snapped to a whole number when within _SNAP of one (0.5 um/px tiles from 0.499 um/px: 1)."""
    nearest = round(ratio)
    return nearest if nearest >= 1 and abs(ratio - nearest) <= _SNAP * nearest else ratio


def level0_side(slide, tile_size, target_mpp):
    """A tile's side in level-0 pixels: tile_size pixels at target_mpp, snapped to tile_size * a whole number
    when the ratio of resolutions is within 2 % of one (0.499 um/px at 0.5 gives 256, 0.2495 gives 512)."""
    return max(1, round(tile_size * _ratio_multiple(target_mpp / slide.mpp)))


@dataclass
class TissueMask:
    """array: bool (H, W), True on tissue; scale: mask pixels per level-0 pixel."""
    array: np.ndarray
    scale: float


def tissue_pixels(rgb, background_gray=BACKGROUND_GRAY):
    """bool (H, W): stained pixels that are neither glass nor black. An image without colour anywhere (a
    grayscale scan) has no stain to see: there, every pixel darker than glass and brighter than black counts."""
    rgb = rgb.astype(np.int16)
    brightest, darkest = rgb.max(axis=2), rgb.min(axis=2)
    saturation = (brightest - darkest) / np.maximum(brightest, 1)
    candidate = (rgb.mean(axis=2) < background_gray) & (brightest >= BLACK_LEVEL)
    if not candidate.any() or (saturation[candidate] > MIN_SATURATION).mean() < GRAYSCALE_SHARE:
        return candidate
    return candidate & (saturation > MIN_SATURATION)


def _small_parts(mask, min_pixels, touching_edge=True):
    """bool like mask: its connected parts smaller than min_pixels (touching_edge False: and not touching the
    image's edge, which makes glass around the tissue no hole in it)."""
    labels, count = ndimage.label(mask)
    small = np.bincount(labels.ravel(), minlength=count + 1) < min_pixels
    small[0] = False
    if not touching_edge:
        small[np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))] = False
    return small[labels]


def clean_mask(mask, mask_mpp):
    """Specks dropped and small holes filled; areas given in square microns, so any mask resolution agrees."""
    pixel_um2 = mask_mpp * mask_mpp
    mask = mask & ~_small_parts(mask, SPECK_UM2 / pixel_um2)
    return mask | _small_parts(~mask, HOLE_UM2 / pixel_um2, touching_edge=False)


def tissue_mask(slide, background_gray=BACKGROUND_GRAY):
    """The slide's tissue, computed once on a thumbnail at about MASK_MPP microns per pixel: stained pixels
    (tissue_pixels), specks dropped and small holes filled. Transparent areas (composited on white) and black
    borders are not tissue."""
    scale = min(slide.mpp / MASK_MPP, MASK_MAX_SIDE / max(slide.dimensions), 1.0)
    rgb, scale = slide.thumbnail(max(1, round(max(slide.dimensions) * scale)))
    return TissueMask(clean_mask(tissue_pixels(rgb, background_gray), slide.mpp / scale), scale)


# ---------------------------------------------------------------------------------------------- the tile grid

@dataclass
class TileGrid:
    """coords: int64 (N, 2) level-0 (x, y) top-left corners, sorted by y then x; side0, stride0: level-0 pixels;
    fractions: float (N,) tissue share of each tile; mask: the TissueMask they were chosen with."""
    coords: np.ndarray
    side0: int
    stride0: int
    fractions: np.ndarray
    mask: TissueMask


def level0_stride(slide, tile_stride, target_mpp):
    """tile_stride pixels at target_mpp in level-0 pixels, snapped as level0_side snaps a tile's side."""
    return max(1, round(tile_stride * _ratio_multiple(target_mpp / slide.mpp)))


def tissue_fractions(mask, coords, side0):
    """The share of tissue in each level-0 box (x, y, side0 x side0), from the mask's summed-area table."""
    table = np.pad(mask.array.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    height, width = mask.array.shape
    x0 = np.clip(np.round(coords[:, 0] * mask.scale).astype(np.int64), 0, width - 1)
    y0 = np.clip(np.round(coords[:, 1] * mask.scale).astype(np.int64), 0, height - 1)
    x1 = np.clip(np.round((coords[:, 0] + side0) * mask.scale).astype(np.int64), x0 + 1, width)
    y1 = np.clip(np.round((coords[:, 1] + side0) * mask.scale).astype(np.int64), y0 + 1, height)
    inside = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    return inside / ((x1 - x0) * (y1 - y0))


def tile_grid(slide, tile_size, tile_stride, target_mpp, tissue_fraction, mask=None):
    """Tiles of tile_size px at target_mpp on a grid of stride0 level-0 pixels from (0, 0), kept when at least
    tissue_fraction of each is tissue (mask: tissue_mask(slide) when None)."""
    side0 = level0_side(slide, tile_size, target_mpp)
    stride0 = level0_stride(slide, tile_stride, target_mpp)
    mask = tissue_mask(slide) if mask is None else mask
    width, height = slide.dimensions
    ys, xs = np.meshgrid(np.arange(0, height - side0 + 1, stride0, dtype=np.int64),
                         np.arange(0, width - side0 + 1, stride0, dtype=np.int64), indexing="ij")
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1).reshape(-1, 2)
    fractions = tissue_fractions(mask, coords, side0) if len(coords) else np.zeros(0)
    keep = fractions >= tissue_fraction
    return TileGrid(coords[keep], side0, stride0, fractions[keep], mask)


def tile_name(slide_stem, x, y):
    """"<stem>_x000512_y002560": a tile's name without suffix, from its level-0 top-left corner."""
    return f"{slide_stem}_x{int(x):06d}_y{int(y):06d}"


def parse_tile_name(name):
    """(stem, x, y) of a name made by tile_name (a suffix such as .png is dropped); ValueError otherwise."""
    base = os.path.basename(name)
    stem, suffix = os.path.splitext(base)
    match = _TILE_NAME.match(stem if suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff") else base)
    if not match:
        raise ValueError(f"{name!r} is not a tile name <slide>_x<X>_y<Y>")
    return match.group(1), int(match.group(2)), int(match.group(3))
