"""Small test slides made from the shipped sample slide, for any test that needs a slide file.

    from tests.slides import make_20x, make_40x
    path = make_20x(tmp_path)          # tmp_path / "region_20x.svs"

Every maker writes into the given folder and returns the new file's path. The 20x and 40x files show the
same tissue: the 40x one is the 20x region upsampled 2x (mpp halved), with a 2x-downsampled pyramid level.
Tiles are JPEG-encoded by Pillow (q=90, no chroma subsampling) and stored as they are by tifffile.
"""
import io
import os
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SAMPLE_SLIDE = REPO / "sample_slides" / "cmu_small_region.svs"
SAMPLE_MPP = 0.499
REGION = (512, 1024, 1024, 1024)  # x, y, width, height in the sample slide: tissue at the left, glass at the right
TILE = 256
# tifffile looks a compressor up even for tiles that are already encoded, and encodes JPEG only through the
# optional imagecodecs package; these tiles never pass through it.
tifffile.TIFF.COMPRESSORS._codecs.setdefault(7, None)


def sample_region(region=REGION):
    """The RGB uint8 pixels of region (x, y, width, height) of the shipped slide."""
    import openslide
    x, y, width, height = region
    with openslide.OpenSlide(str(SAMPLE_SLIDE)) as slide:
        return np.asarray(slide.read_region((x, y), 0, (width, height)).convert("RGB"))


def _jpeg_tiles(rgb):
    for top in range(0, rgb.shape[0], TILE):
        for left in range(0, rgb.shape[1], TILE):
            tile = np.full((TILE, TILE, 3), 255, dtype=np.uint8)
            part = rgb[top:top + TILE, left:left + TILE]
            tile[:part.shape[0], :part.shape[1]] = part
            encoded = io.BytesIO()
            Image.fromarray(tile).save(encoded, "JPEG", quality=90, subsampling=0)
            yield encoded.getvalue()


def write_pyramid(path, levels, mpp=None, description=None):
    """A tiled JPEG TIFF of levels (RGB arrays, level 0 first). mpp: recorded as TIFF resolution (pixels per
    cm), or nothing when None. description: level 0's ImageDescription (an Aperio one makes it an SVS)."""
    with tifffile.TiffWriter(path) as tiff:
        for index, rgb in enumerate(levels):
            resolution = {} if mpp is None or index else {"resolution": (1e4 / mpp, 1e4 / mpp),
                                                         "resolutionunit": "CENTIMETER"}
            tiff.write(_jpeg_tiles(rgb), shape=rgb.shape, dtype="uint8", tile=(TILE, TILE), compression="jpeg",
                       photometric="ycbcr", subsampling=(1, 1), subfiletype=1 if index else 0, metadata=None,
                       description=description if index == 0 else None, **resolution)
    return Path(path)


def _half(rgb):
    return np.asarray(Image.fromarray(rgb).reduce(2))


def make_20x(folder, name="region_20x.svs"):
    """An SVS-like slide (Aperio description with MPP = 0.499) of REGION, 1024 x 1024, with a 2x level."""
    rgb = sample_region()
    height, width = rgb.shape[:2]
    description = (f"Aperio Image Library v11.2.1\n{width}x{height} ({TILE}x{TILE}) JPEG/RGB Q=90"
                   f"|AppMag = 20|MPP = {SAMPLE_MPP}")
    return write_pyramid(Path(folder) / name, [rgb, _half(rgb)], description=description)


def region_40x():
    """REGION upsampled 2x (Lanczos): the same tissue as make_20x's at twice the pixels."""
    rgb = sample_region()
    return np.asarray(Image.fromarray(rgb).resize((rgb.shape[1] * 2, rgb.shape[0] * 2), Image.LANCZOS))


def make_40x(folder, name="region_40x.tif", mpp=SAMPLE_MPP / 2):
    """A generic pyramidal TIFF of region_40x (2048 x 2048, resolution in pixels per cm) with a 2x level."""
    rgb = region_40x()
    return write_pyramid(Path(folder) / name, [rgb, _half(rgb)], mpp=mpp)


def make_no_mpp(folder, name="region_no_mpp.tif"):
    """make_40x's slide without any recorded resolution."""
    return make_40x(folder, name, mpp=None)


def make_truncated(folder, name="region_truncated.svs", keep=0.6):
    """make_20x's slide cut off after keep of its bytes, as an interrupted copy leaves it."""
    whole = make_20x(folder, "whole_" + name)
    data = whole.read_bytes()
    os.remove(whole)
    path = Path(folder) / name
    path.write_bytes(data[:int(len(data) * keep)])
    return path


def make_not_a_slide(folder, name="notes.svs"):
    """A text file with a slide's suffix."""
    path = Path(folder) / name
    path.write_text("This is not a slide, only text with a .svs name.\n")
    return path


def make_damaged(folder, name="region_damaged.svs", tile=(1, 1)):
    """make_20x's slide with the JPEG data of one level-0 tile (column, row) overwritten by garbage from its
    middle on. Returns (path, (x, y, width, height) of that tile in level-0 pixels)."""
    path = make_20x(folder, name)
    with tifffile.TiffFile(path) as tiff:
        page = tiff.pages[0]
        index = tile[1] * (page.imagewidth // TILE) + tile[0]
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    with open(path, "r+b") as handle:
        handle.seek(offset + count // 2)
        handle.write(np.random.default_rng(0).integers(0, 256, count // 4, dtype=np.uint8).tobytes())
    return path, (tile[0] * TILE, tile[1] * TILE, TILE, TILE)
