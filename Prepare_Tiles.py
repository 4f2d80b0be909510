"""Cut a slide (or any large image) into tissue tiles named by their position.

    python Prepare_Tiles.py --slide_path=slide.svs --tiles_output_folder=training_tiles --tile_stride=128

Tiles are tile_size x tile_size PNGs named <slide>_x<X>_y<Y>.png (pixel position of the top-left corner
at full resolution). A tile is kept when at least tissue_fraction of its pixels are darker than
background_gray. Tiles overlapping a tile of the same slide in exclude_tiles_in (named
<slide>_x<X>_y<Y>.png; by default the held-out input_images/) are left out, so a held-out set stays held out.
"""
import os
import re

import numpy as np
from PIL import Image
from tqdm import tqdm

from Dataset import PILLOW_FORMATS, upright_rgb
from core.errors import UserError
from core.cli import run_main
from core.atomic import check_writable
from core.names import printable
from core.png import write_png

_POSITION = re.compile(r"_x(\d+)_y(\d+)\.png$", re.IGNORECASE)
_PYRAMID_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".svslide", ".bif")
_PILLOW_PIXEL_LIMIT = 400_000_000


class PillowSlide:
    """The full-resolution image through Pillow: fine for regions up to a few hundred megapixels. It is read
    as tiles are (Dataset.upright_rgb): EXIF rotation applied, transparency on white, 16-bit scaled."""

    def __init__(self, path):
        Image.MAX_IMAGE_PIXELS = _PILLOW_PIXEL_LIMIT
        try:
            # No with-block: closing would free the pixels, which upright_rgb keeps when they are RGB already.
            self.image = upright_rgb(Image.open(path, formats=PILLOW_FORMATS))
        except Image.DecompressionBombError:
            raise UserError(f"{path!r} is too large to load whole: install openslide "
                            "(pip install openslide-python openslide-bin) and rerun")
        except (OSError, ValueError, SyntaxError) as err:
            raise UserError(f"cannot read {path!r} ({printable(err)}): is it a PNG, JPEG, TIFF, BMP, GIF or "
                            "WebP image, or a slide file for openslide?")
        self.size = self.image.size

    def region(self, x, y, size):
        return self.image.crop((x, y, x + size, y + size))


class OpenSlideSlide:
    """Level 0 of a pyramidal whole-slide file, read region by region through openslide."""

    def __init__(self, path, openslide):
        try:
            self.slide = openslide.OpenSlide(path)
        except openslide.OpenSlideError as err:
            raise UserError(f"openslide cannot read {path!r} ({err})")
        self.size = self.slide.dimensions

    def region(self, x, y, size):
        rgba = self.slide.read_region((x, y), 0, (size, size))
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")


def open_slide(path):
    if not os.path.exists(path):
        raise UserError(f"slide {path!r} not found: set slide_path in Config.py or pass --slide_path=FILE")
    if not os.path.isfile(path):
        raise UserError(f"slide {path!r} is not a regular file (a folder, pipe or device): "
                        "set slide_path to an image or slide file")
    if path.lower().endswith(_PYRAMID_EXTENSIONS):
        try:
            import openslide
            return OpenSlideSlide(path, openslide)
        except ImportError:
            print("openslide is not installed; reading the full-resolution image with Pillow "
                  "(for large whole-slide files: pip install openslide-python openslide-bin).")
    return PillowSlide(path)


def excluded_boxes(folder, stem, tile_size):
    """(x, y, x + size, y + size) of every tile of slide stem named in folder (<stem>_x<X>_y<Y>.png):
    tiles named after another slide cover other tissue and exclude nothing."""
    if not folder:
        return []
    if not os.path.isdir(folder):
        raise UserError(f"exclude_tiles_in={folder!r} is not a folder: give the folder of held-out tiles, "
                        "or pass --exclude_tiles_in= to exclude nothing")
    boxes = []
    for name in os.listdir(folder):
        match = _POSITION.search(name)
        if match and name[:match.start()] == stem:
            x, y = int(match.group(1)), int(match.group(2))
            boxes.append((x, y, x + tile_size, y + tile_size))
    return boxes


def tissue_share(tile, background_gray):
    gray = np.asarray(tile, dtype=np.float32).mean(axis=2)
    return float((gray < background_gray).mean())


def prepare_tiles(cfg):
    size, stride = cfg.tile_size, cfg.tile_stride
    if size < 1 or stride < 1:
        raise UserError("tile_size and tile_stride must be at least 1")
    check_writable(cfg.tiles_output_folder)
    slide = open_slide(cfg.slide_path)
    stem = os.path.splitext(os.path.basename(cfg.slide_path))[0]
    excluded = excluded_boxes(cfg.exclude_tiles_in, stem, size)
    width, height = slide.size
    origins = [(x, y) for y in range(0, height - size + 1, stride) for x in range(0, width - size + 1, stride)]
    kept = dropped_background = dropped_excluded = 0
    for x, y in tqdm(origins, desc="Tiling", unit="tile", dynamic_ncols=True):
        if any(x < bx1 and bx0 < x + size and y < by1 and by0 < y + size for bx0, by0, bx1, by1 in excluded):
            dropped_excluded += 1
            continue
        tile = slide.region(x, y, size)
        if tissue_share(tile, cfg.background_gray) < cfg.tissue_fraction:
            dropped_background += 1
            continue
        write_png(os.path.join(cfg.tiles_output_folder, f"{stem}_x{x:06d}_y{y:06d}.png"), np.asarray(tile))
        kept += 1
    print(f"{printable(cfg.slide_path)}: {width} x {height} pixels, {len(origins)} positions; kept {kept} tiles "
          f"in {printable(cfg.tiles_output_folder)}, dropped {dropped_background} mostly background"
          + (f" and {dropped_excluded} overlapping {printable(cfg.exclude_tiles_in)}" if excluded else "") + ".")
    return kept


if __name__ == "__main__":
    run_main(prepare_tiles, "tiles")
