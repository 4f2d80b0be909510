"""core/slides.py: resolution, levels, the tissue mask, the tile grid, names, and damaged or wrong files."""
import numpy as np
import pytest
from PIL import Image

from core import slides
from core.slides import SlideError, open_slide, tile_grid
from tests import slides as test_slides


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The 20x and 40x test slides of the same tissue, made once for this module."""
    folder = tmp_path_factory.mktemp("slides")
    return {"20x": test_slides.make_20x(folder), "40x": test_slides.make_40x(folder), "folder": folder}


def test_20x_and_40x_slides_give_the_same_tiles(made):
    """The same tissue at twice the pixels: the same tiles at twice the coordinates, read from the 40x slide's
    2x level, with nearly the pixels of the 20x slide (the two differ by the 40x file's upsampling and JPEG)."""
    with open_slide(made["20x"]) as s20, open_slide(made["40x"]) as s40:
        g20 = tile_grid(s20, 256, 64, 0.5, 0.5)
        g40 = tile_grid(s40, 256, 64, 0.5, 0.5)
        assert (g20.side0, g20.stride0, g40.side0, g40.stride0) == (256, 64, 512, 128)
        assert len(g20.coords) > 50 and len(g20.coords) < 16 * 16  # tissue and glass in the region
        assert np.array_equal(g40.coords, g20.coords * 2)
        assert g40.coords.dtype == np.int64 and g40.coords.shape[1] == 2
        for x, y in g20.coords[::7]:
            tile20 = s20.read_region(x, y, 256, 256, 256, 256).astype(int)
            tile40 = s40.read_region(2 * x, 2 * y, 512, 512, 256, 256)
            assert tile40.shape == (256, 256, 3) and tile40.dtype == np.uint8
            assert np.abs(tile20 - tile40).mean() < 4.0  # measured: at most 3.1


def test_grid_is_sorted_by_y_then_x_and_on_the_stride(made):
    with open_slide(made["20x"]) as slide:
        grid = tile_grid(slide, 256, 96, 0.5, 0.3)
    order = np.lexsort((grid.coords[:, 0], grid.coords[:, 1]))
    assert np.array_equal(order, np.arange(len(grid.coords)))
    assert not (grid.coords % 96).any() and (grid.fractions >= 0.3).all()


def test_resolution_is_read_or_refused(made, tmp_path):
    with open_slide(made["20x"]) as s20, open_slide(made["40x"]) as s40:
        assert (s20.mpp, s40.mpp) == (0.499, pytest.approx(0.2495))
        assert s20.dimensions == (1024, 1024) and s40.dimensions == (2048, 2048)
    no_mpp = test_slides.make_no_mpp(tmp_path)
    with pytest.raises(SlideError, match="records no resolution: pass --slide_mpp="):
        open_slide(no_mpp)
    with open_slide(no_mpp, slide_mpp=0.25) as slide:
        assert slide.mpp == 0.25
    with open_slide(made["20x"], slide_mpp=0.5) as slide:
        assert slide.mpp == 0.5  # the user's value wins over the recorded one
    # A plain TIFF through Pillow, resolution in dots per inch: 50,800 dpi is 0.5 um per pixel.
    Image.new("RGB", (64, 64), (200, 100, 150)).save(tmp_path / "plain.tif", dpi=(50800, 50800))
    with open_slide(tmp_path / "plain.tif") as slide:
        assert slide.mpp == pytest.approx(0.5)
    # A screen resolution (72 dpi, what image software writes by default) is no microscope's.
    Image.new("RGB", (64, 64)).save(tmp_path / "screen.tif", dpi=(72, 72))
    with pytest.raises(SlideError, match="records no resolution"):
        open_slide(tmp_path / "screen.tif")
    Image.new("RGB", (64, 64)).save(tmp_path / "plain.png")
    with pytest.raises(SlideError, match="plain.png' records no resolution"):
        open_slide(tmp_path / "plain.png")


def test_tile_side_snaps_to_whole_multiples():
    class Fake:
        mpp = 0.499
    assert slides.level0_side(Fake, 256, 0.5) == 256
    Fake.mpp = 0.2495
    assert slides.level0_side(Fake, 256, 0.5) == 512
    Fake.mpp = 0.3
    assert slides.level0_side(Fake, 256, 0.5) == 427  # 1.67x: no whole multiple near, so rounded
    Fake.mpp = 1.0
    assert slides.level0_side(Fake, 256, 0.5) == 128


def test_tissue_mask_ignores_black_border_and_transparent_areas(tmp_path):
    """H&E tissue in the middle, an opaque black frame, and a transparent band whose hidden colour is pink."""
    rgba = np.zeros((512, 512, 4), dtype=np.uint8)
    rgba[..., :3], rgba[..., 3] = 245, 255
    rgba[128:384, 128:384, :3] = test_slides.sample_region((1024, 1536, 256, 256))
    rgba[:32, :, :3] = rgba[:, :32, :3] = 0  # black border, opaque
    rgba[400:, :, :3] = (200, 80, 160)  # pink under full transparency
    rgba[400:, :, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "slide.png")
    with open_slide(tmp_path / "slide.png", slide_mpp=0.5) as slide:
        mask = slides.tissue_mask(slide)
        assert mask.scale == pytest.approx(0.25)
        level0 = np.asarray(Image.fromarray(mask.array).resize((512, 512), Image.NEAREST))
        assert not level0[:32].any() and not level0[:, :32].any() and not level0[400:].any()
        assert level0[136:376, 136:376].mean() > 0.9
        grid = tile_grid(slide, 64, 64, 0.5, 0.5, mask=mask)
        assert grid.coords.min() >= 128 - 32 and grid.coords.max() <= 384 - 32


def test_find_slides_in_a_folder_a_list_and_a_file(tmp_path):
    for name in ["b/two.svs", "a/one.tif", "a/sub/three.ndpi", "a/notes.csv", "four.PNG"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "a" / "sub" / "empty").mkdir()
    found = slides.find_slides(tmp_path)
    assert [p[len(str(tmp_path)) + 1:] for p in found] == ["a/one.tif", "a/sub/three.ndpi", "b/two.svs", "four.PNG"]
    (tmp_path / "list.txt").write_text("b/two.svs\n\n# not this one\na/one.tif\n")
    assert slides.find_slides(tmp_path / "list.txt") == [str(tmp_path / "b/two.svs"), str(tmp_path / "a/one.tif")]
    assert slides.find_slides(tmp_path / "b/two.svs") == [str(tmp_path / "b/two.svs")]
    with pytest.raises(slides.UserError, match="not found"):
        slides.find_slides(tmp_path / "nowhere")
    with pytest.raises(slides.UserError, match="no slides found"):
        slides.find_slides(tmp_path / "a" / "sub" / "empty")


def test_tile_name_round_trip():
    assert slides.tile_name("slide_a", 512, 2560) == "slide_a_x000512_y002560"
    assert slides.parse_tile_name("slide_a_x000512_y002560") == ("slide_a", 512, 2560)
    assert slides.parse_tile_name("dir/my_x1_slide_x1234567_y000001.png") == ("my_x1_slide", 1234567, 1)
    with pytest.raises(ValueError):
        slides.parse_tile_name("slide.png")


def test_damaged_region_is_named_and_the_rest_stays_readable(tmp_path):
    path, (x, y, width, height) = test_slides.make_damaged(tmp_path)
    with open_slide(path) as slide:
        with pytest.raises(SlideError, match=f"damaged image data in the region x={x}, y={y}, 256 x 256"):
            slide.read_region(x, y, width, height, width, height)
        intact = test_slides.sample_region()[:256, :256].astype(int)
        assert np.abs(slide.read_region(0, 0, 256, 256, 256, 256) - intact).mean() < 3


def test_truncated_and_non_slide_files_are_one_error(tmp_path):
    with pytest.raises(SlideError, match="region_truncated.svs' is truncated"):
        open_slide(test_slides.make_truncated(tmp_path))
    with pytest.raises(SlideError, match="notes.svs' is not a slide"):
        open_slide(test_slides.make_not_a_slide(tmp_path))
    png = tmp_path / "cut.png"
    Image.fromarray(test_slides.sample_region((1024, 1536, 256, 256))).save(png)
    png.write_bytes(png.read_bytes()[:20000])
    with pytest.raises(SlideError, match="cut.png' cannot be read"):
        open_slide(png, slide_mpp=0.5)
    with pytest.raises(SlideError, match="not found"):
        open_slide(tmp_path / "nowhere.svs")
