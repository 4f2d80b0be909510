"""Prepare_Tiles.py run as a user runs it: which positions become tiles, their pixels, and their PNG encoding."""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from Dataset import load_image
from core.errors import UserError
from core.slides import parse_tile_name
from tests import slides as test_slides
from tests.conftest import REPO


def tile_names(folder):
    """The tiles in folder (the cutting's record .<slide>_tiles.json lies beside them)."""
    return sorted(name for name in os.listdir(folder) if name.endswith(".png"))


def stained(rng, shape):
    """Pink-purple noise, as H&E tissue: the tissue mask looks for stain (colour), not only for darkness."""
    low, high = np.array([130, 50, 110]), np.array([230, 150, 210])
    return rng.integers(low, high, (*shape, 3)).astype(np.uint8)


def make_slide(path):
    """A 192 x 128 RGB image: glass (white) everywhere except stained tissue over the left 100 x 128 and a
    gray speck on the right, with noise so the pixels are not trivial."""
    rng = np.random.default_rng(7)
    pixels = np.full((128, 192, 3), 245, dtype=np.uint8)
    pixels[:, :100] = stained(rng, (128, 100))
    pixels[10:20, 150:160] = 100  # 100 of 4,096 pixels: a background tile
    Image.fromarray(pixels).save(path)
    return pixels


def test_tiles_are_the_slide_pixels_and_background_is_dropped(tmp_path, run_script):
    pixels = make_slide(tmp_path / "slide.png")
    result = run_script("Prepare_Tiles.py", "--slide_path=slide.png", "--slide_mpp=0.5", "--tiles_output_folder=tiles",
                        "--tile_size=64", "--tile_stride=32", "--exclude_tiles_in=", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    names = tile_names(tmp_path / "tiles")
    # Origins every 32 pixels: x in 0..128, y in 0..64. Tissue covers x < 100, so a tile is kept when more
    # than half of it lies left of 100: x = 0, 32, 64 (the mask, at 2 um/px, blurs the edge by a few pixels).
    assert names == sorted(f"slide_x{x:06d}_y{y:06d}.png" for x in (0, 32, 64) for y in (0, 32, 64))
    assert "kept 9 tiles" in result.stdout and "dropped 6 mostly background" in result.stdout
    for name in names:
        x, y = int(name[7:13]), int(name[15:21])
        with Image.open(tmp_path / "tiles" / name) as tile:
            assert tile.format == "PNG" and tile.mode == "RGB"
            assert np.array_equal(np.asarray(tile), pixels[y:y + 64, x:x + 64])
        # Training reads them through Dataset's libpng path, to the same pixels.
        decoded = load_image(str(tmp_path / "tiles" / name), 64)
        assert torch.equal(decoded, torch.from_numpy(pixels[y:y + 64, x:x + 64]).permute(2, 0, 1))


def test_positions_of_held_out_tiles_are_excluded(tmp_path, run_script):
    make_slide(tmp_path / "slide.png")
    (tmp_path / "held_out").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "held_out" / "slide_x000000_y000000.png")
    result = run_script("Prepare_Tiles.py", "--slide_path=slide.png", "--slide_mpp=0.5", "--tiles_output_folder=tiles",
                        "--tile_size=64", "--tile_stride=32", "--exclude_tiles_in=held_out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # Origins at x or y of 0 or 32 overlap the held-out tile at (0, 0); of the nine tissue tiles, five remain.
    assert tile_names(tmp_path / "tiles") == sorted(
        ["slide_x000000_y000064.png", "slide_x000032_y000064.png",
         *(f"slide_x000064_y{y:06d}.png" for y in (0, 32, 64))])
    assert "kept 5 tiles" in result.stdout
    assert "overlapping held_out" in result.stdout


def test_held_out_tiles_of_another_slide_exclude_nothing(tmp_path, run_script):
    """The default exclude_tiles_in is input_images: its tiles are of the shipped slide, so cutting any
    other slide must keep every position."""
    make_slide(tmp_path / "slide.png")
    (tmp_path / "input_images").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "input_images" / "other_slide_x000000_y000000.png")
    result = run_script("Prepare_Tiles.py", "--slide_path=slide.png", "--slide_mpp=0.5", "--tiles_output_folder=tiles",
                        "--tile_size=64", "--tile_stride=32", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "kept 9 tiles" in result.stdout


def test_missing_held_out_folder_is_one_line_exit_2(tmp_path, run_script):
    make_slide(tmp_path / "slide.png")
    result = run_script("Prepare_Tiles.py", "--slide_path=slide.png", "--slide_mpp=0.5", "--tiles_output_folder=tiles",
                        "--tile_size=64", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: exclude_tiles_in='input_images' is not a folder")
    assert result.stderr.count("\n") == 1


def test_missing_slide_is_one_line_exit_2(tmp_path, run_script):
    result = run_script("Prepare_Tiles.py", "--slide_path=nowhere.svs", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: slide 'nowhere.svs' not found") and result.stderr.count("\n") == 1


def test_transparent_areas_are_glass_not_tissue(tmp_path, run_script):
    """A slide exported with an alpha channel: the transparent half (RGBA 0, 0, 0, 0) is background."""
    pixels = np.zeros((64, 128, 4), dtype=np.uint8)
    pixels[:, :64, :3] = stained(np.random.default_rng(3), (64, 64))
    pixels[:, :64, 3] = 255
    Image.fromarray(pixels, "RGBA").save(tmp_path / "slide.png")
    result = run_script("Prepare_Tiles.py", "--slide_path=slide.png", "--slide_mpp=0.5", "--tiles_output_folder=tiles",
                        "--tile_size=64", "--tile_stride=64", "--exclude_tiles_in=", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert tile_names(tmp_path / "tiles") == ["slide_x000000_y000000.png"]
    with Image.open(tmp_path / "tiles" / "slide_x000000_y000000.png") as tile:
        assert np.array_equal(np.asarray(tile), pixels[:, :64, :3])


def test_16_bit_slides_are_scaled_not_clipped(tmp_path, run_script):
    """A 16-bit grayscale slide: tissue at about half intensity on the left, glass near white on the right."""
    pixels = np.full((64, 128), 64000, dtype=np.uint16)
    pixels[:, :64] = 30000
    Image.fromarray(pixels).save(tmp_path / "slide.png")
    result = run_script("Prepare_Tiles.py", "--slide_path=slide.png", "--slide_mpp=0.5", "--tiles_output_folder=tiles",
                        "--tile_size=64", "--tile_stride=64", "--exclude_tiles_in=", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert tile_names(tmp_path / "tiles") == ["slide_x000000_y000000.png"]
    with Image.open(tmp_path / "tiles" / "slide_x000000_y000000.png") as tile:
        assert np.abs(np.asarray(tile, dtype=int) - round(30000 / 65535 * 255)).max() <= 1


def test_exif_rotation_is_applied(tmp_path, run_script):
    """Stored 128 wide and 64 high with tissue on the left; EXIF orientation 6 turns it upright to 64 x 128
    with the tissue on top, where the tile positions refer to."""
    stored = np.full((64, 128, 3), 245, dtype=np.uint8)
    stored[:, :64] = 90
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "slide.jpg", exif=exif, quality=95)
    result = run_script("Prepare_Tiles.py", "--slide_path=slide.jpg", "--slide_mpp=0.5", "--tiles_output_folder=tiles",
                        "--tile_size=64", "--tile_stride=64", "--exclude_tiles_in=", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "64 x 128 pixels" in result.stdout
    assert tile_names(tmp_path / "tiles") == ["slide_x000000_y000000.png"]


def cut(tmp_path, **settings):
    """prepare_tiles in this process, with Config's values for the keys not given."""
    import Config
    from Prepare_Tiles import prepare_tiles
    from core.cli import script_keys
    values = {key: getattr(Config, key) for key in script_keys("tiles")}
    values.update(exclude_tiles_in="", tiles_output_folder=str(tmp_path / "tiles"), **settings)
    return prepare_tiles(SimpleNamespace(**values))


def test_shipped_slide_keeps_the_held_out_tiles_positions_and_pixels(tmp_path, run_script, sample_tiles):
    """The default slide_path is the shipped slide; cut on the grid from (0, 0), its tissue tiles include the 16
    held-out tiles of input_images/, pixel for pixel (0.499 um/px at 0.5: read at level 0, not resized)."""
    import Config
    assert (REPO / Config.slide_path).is_file()
    result = run_script("Prepare_Tiles.py", f"--slide_path={REPO / Config.slide_path}", "--tiles_output_folder=tiles",
                        "--exclude_tiles_in=", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "2220 x 2967 pixels at 0.499 um/px, 88 positions of 256 px" in result.stdout
    names = tile_names(tmp_path / "tiles")
    for path, pixels in sample_tiles:
        assert path.name in names
        with Image.open(tmp_path / "tiles" / path.name) as tile:
            assert np.array_equal(np.asarray(tile), pixels)


def test_another_cutting_into_the_same_folder_is_refused(tmp_path, run_script):
    make_slide(tmp_path / "slide.png")
    assert cut(tmp_path, slide_path=str(tmp_path / "slide.png"), slide_mpp=0.5, tile_size=64, tile_stride=32) == 9
    before = {name: (tmp_path / "tiles" / name).read_bytes() for name in tile_names(tmp_path / "tiles")}
    # The same cutting again is fine (it rewrites the same tiles); another tissue_fraction is the same cutting.
    assert cut(tmp_path, slide_path=str(tmp_path / "slide.png"), slide_mpp=0.5, tile_size=64, tile_stride=32,
               tissue_fraction=0.9) > 0
    result = run_script("Prepare_Tiles.py", "--slide_path=slide.png", "--slide_mpp=0.5", "--tiles_output_folder=tiles",
                        "--tile_size=64", "--tile_stride=16", "--exclude_tiles_in=", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: 'tiles' already holds tiles of slide from another cutting (")
    assert "tile_stride_level0=32" in result.stderr and "tile_stride_level0=16" in result.stderr
    assert {name: (tmp_path / "tiles" / name).read_bytes() for name in tile_names(tmp_path / "tiles")} == before
    # Tiles of that slide without a record (cut by hand or by an older version) are not mixed with either.
    (tmp_path / "tiles" / ".slide_tiles.json").unlink()
    with pytest.raises(UserError, match="an unrecorded cutting"):
        cut(tmp_path, slide_path=str(tmp_path / "slide.png"), slide_mpp=0.5, tile_size=64, tile_stride=32)


def test_truncated_image_is_one_error_line_and_no_tiles(tmp_path, run_script):
    make_slide(tmp_path / "slide.png")
    data = (tmp_path / "slide.png").read_bytes()
    (tmp_path / "slide.png").write_bytes(data[:len(data) // 2])
    result = run_script("Prepare_Tiles.py", "--slide_path=slide.png", "--slide_mpp=0.5", "--tiles_output_folder=tiles",
                        "--tile_size=64", "--exclude_tiles_in=", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: slide 'slide.png' cannot be read (image file is truncated")
    assert tile_names(tmp_path / "tiles") == []


def test_damaged_tile_data_skips_those_tiles_and_goes_on(tmp_path, capsys):
    """One level-0 JPEG tile of the slide is garbage from its middle on: every tile over it is one warning
    line naming its region, skipped and counted; every other tile is cut as from the intact slide."""
    (tmp_path / "intact").mkdir()
    (tmp_path / "damaged").mkdir()
    intact = test_slides.make_20x(tmp_path / "intact", "slide.svs")
    damaged, (x, y, width, height) = test_slides.make_damaged(tmp_path / "damaged", "slide.svs")
    cut(tmp_path / "intact", slide_path=str(intact), tile_stride=128)
    kept = cut(tmp_path / "damaged", slide_path=str(damaged), tile_stride=128)
    out = capsys.readouterr().out
    intact_names = tile_names(tmp_path / "intact" / "tiles")
    damaged_names = tile_names(tmp_path / "damaged" / "tiles")
    overlap = [name for name in intact_names
               if abs(parse_tile_name(name)[1] - x) < width and abs(parse_tile_name(name)[2] - y) < height]
    assert overlap and kept == len(damaged_names) == len(intact_names) - len(overlap)
    assert set(damaged_names) == set(intact_names) - set(overlap)
    assert out.count("has damaged image data in the region") == len(overlap)
    assert f"region x={x}, y={y}, 256 x 256 level-0 pixels" in out
    assert f"skipped {len(overlap)} in damaged regions" in out
