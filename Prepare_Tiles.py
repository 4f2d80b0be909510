"""Cut a slide (or any large image) into tissue tiles named by their position.

    python Prepare_Tiles.py --slide_path=slide.svs --tiles_output_folder=training_tiles --tile_stride=128

Tiles are tile_size x tile_size PNGs at target_mpp microns per pixel, read from the slide's best pyramid
level (core/slides.py), named <slide>_x<X>_y<Y>.png after the level-0 position of their top-left corner.
A tile is kept when at least tissue_fraction of it is tissue in the slide's tissue mask. Tiles overlapping a
tile of the same slide in exclude_tiles_in (by default the held-out input_images/) are left out, so a held-out
set stays held out. A folder holds one cutting of a slide: .<slide>_tiles.json beside the tiles records it.
"""
import json
import os

import numpy as np
from tqdm import tqdm

from core.cli import run_main
from core.errors import UserError
from core.atomic import atomic_write, check_writable
from core.names import printable
from core.png import write_png
from core.slides import SlideError, open_slide, parse_tile_name, tile_grid, tile_name, tissue_mask


def excluded_boxes(folder, stem, side0):
    """(x, y, x + side0, y + side0) of every tile of slide stem named in folder (<stem>_x<X>_y<Y>.png):
    tiles named after another slide cover other tissue and exclude nothing."""
    if not folder:
        return np.zeros((0, 4), dtype=np.int64)
    if not os.path.isdir(folder):
        raise UserError(f"exclude_tiles_in={folder!r} is not a folder: give the folder of held-out tiles, "
                        "or pass --exclude_tiles_in= to exclude nothing")
    corners = [(x, y) for tile_stem, x, y in map(_parsed, os.listdir(folder)) if tile_stem == stem]
    return np.array([(x, y, x + side0, y + side0) for x, y in corners], dtype=np.int64).reshape(-1, 4)


def _parsed(name):
    try:
        return parse_tile_name(name) if name.lower().endswith(".png") else (None, 0, 0)
    except ValueError:
        return None, 0, 0


def overlapping(coords, boxes, side0):
    """bool (N,): which tiles at coords (side0 square) overlap any of boxes."""
    if not len(boxes) or not len(coords):
        return np.zeros(len(coords), dtype=bool)
    x, y = coords[:, :1], coords[:, 1:]
    return ((x < boxes[:, 2]) & (boxes[:, 0] < x + side0) & (y < boxes[:, 3]) & (boxes[:, 1] < y + side0)).any(1)


def cutting_record(cfg, slide, grid):
    return {"slide": os.path.basename(cfg.slide_path), "tile_size": cfg.tile_size, "target_mpp": cfg.target_mpp,
            "slide_mpp": slide.mpp, "tile_side_level0": grid.side0, "tile_stride_level0": grid.stride0}


def check_cutting(folder, stem, record):
    """Refuse to mix two cuttings of one slide in folder: its earlier tiles must come from the same tile size,
    stride and resolution. Returns the record file's path."""
    path = os.path.join(folder, f".{stem}_tiles.json")
    if not any(_parsed(name)[0] == stem for name in os.listdir(folder)):
        return path
    try:
        with open(path, encoding="utf-8") as handle:
            earlier = json.load(handle)
    except (OSError, ValueError):
        earlier = None
    keys = ("tile_size", "target_mpp", "slide_mpp", "tile_side_level0", "tile_stride_level0")
    if earlier is None or any(earlier.get(key) != record[key] for key in keys):
        was = ", ".join(f"{key}={earlier.get(key)}" for key in keys) if earlier else "an unrecorded cutting"
        raise UserError(f"{folder!r} already holds tiles of {stem} from another cutting ({was}); this one is "
                        + ", ".join(f"{key}={record[key]}" for key in keys)
                        + ": choose another tiles_output_folder or move those tiles away")
    return path


def cut_tiles(slide, coords, cfg, side0, stem):
    """Write each tile; a damaged region is one warning line and that tile is skipped. Returns (kept, damaged)."""
    kept = damaged = 0
    for x, y in tqdm(coords, desc="Tiling", unit="tile", dynamic_ncols=True):
        try:
            tile = slide.read_region(x, y, side0, side0, cfg.tile_size, cfg.tile_size)
        except SlideError as err:
            tqdm.write(f"warning: {err}; tile skipped")
            damaged += 1
            continue
        write_png(os.path.join(cfg.tiles_output_folder, tile_name(stem, x, y) + ".png"), tile)
        kept += 1
    return kept, damaged


def prepare_tiles(cfg):
    check_writable(cfg.tiles_output_folder)
    stem = os.path.splitext(os.path.basename(cfg.slide_path))[0]
    with open_slide(cfg.slide_path, cfg.slide_mpp) as slide:
        mask = tissue_mask(slide, cfg.background_gray)
        for damage in slide.damaged_regions:
            print(f"warning: {printable(damage)}; no tiles there")
        grid = tile_grid(slide, cfg.tile_size, cfg.tile_stride, cfg.target_mpp, 0.0, mask)
        record = cutting_record(cfg, slide, grid)
        record_path = check_cutting(cfg.tiles_output_folder, stem, record)
        boxes = excluded_boxes(cfg.exclude_tiles_in, stem, grid.side0)
        excluded = overlapping(grid.coords, boxes, grid.side0)
        background = ~excluded & (grid.fractions < cfg.tissue_fraction)
        atomic_write(record_path, lambda tmp: _write_json(tmp, record))
        kept, damaged = cut_tiles(slide, grid.coords[~excluded & ~background], cfg, grid.side0, stem)
        width, height = slide.dimensions
    print(f"{printable(cfg.slide_path)}: {width} x {height} pixels at {slide.mpp:g} um/px, {len(grid.coords)} "
          f"positions of {grid.side0} px; kept {kept} tiles in {printable(cfg.tiles_output_folder)}, dropped "
          f"{int(background.sum())} mostly background"
          + (f" and {int(excluded.sum())} overlapping {printable(cfg.exclude_tiles_in)}" if len(boxes) else "")
          + (f"; skipped {damaged} in damaged regions" if damaged else "") + ".")
    return kept


def _write_json(path, record):
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1)


if __name__ == "__main__":
    run_main(prepare_tiles, "tiles")
