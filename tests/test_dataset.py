"""Finding and decoding tiles: recursion, extensions, order, colour modes, EXIF orientation, bad files."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import Dataset
from Dataset import IMAGE_EXTENSIONS, ImageFolder, collate, find_images, load_image
from core.errors import UserError

TREE = ["z.png", "a/deep/er/still/one.PNG", "a/deep/two.Jpg", "a/three.tif", "b/four.webp", "b/five.JPEG",
        "b/six.bmp", "b/seven.gif", "a/deep/er/eight.TIFF", "C/nine.jpg", "a/ten.png"]
NOT_IMAGES = ["notes.txt", "a/deep/data.csv", "b/six.bmp.bak", "a/png", "b/README", "a/deep/er/.png.txt"]


def relative(paths, folder):
    return [os.path.relpath(p, folder) for p in paths]


@pytest.fixture
def tree(tmp_path, make_tiles):
    folder = tmp_path / "tiles"
    make_tiles(folder, TREE, size=40)
    for name in NOT_IMAGES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("not an image")
    return folder


def test_walk_finds_every_image_at_any_depth_and_nothing_else(tree):
    found = relative(find_images(str(tree)), tree)
    assert sorted(found) == sorted(os.path.normpath(name) for name in TREE)
    assert os.path.normpath("a/deep/er/still/one.PNG") in found  # four levels down


def test_order_is_sorted_by_path_and_repeatable(tree):
    first = find_images(str(tree))
    assert find_images(str(tree)) == first
    parts = [p.split(os.sep) for p in relative(first, tree)]
    assert parts == sorted(parts)
    assert ImageFolder(str(tree), 32).paths == first
    # Creating more files elsewhere does not reorder the existing ones.
    (tree / "c").mkdir()
    Image.new("RGB", (8, 8)).save(tree / "c" / "0.png")
    assert [p for p in find_images(str(tree)) if p in first] == first


def test_extensions_are_case_insensitive(tmp_path, make_tiles):
    names = [f"img{i}{ext.upper() if i % 2 else ext}" for i, ext in enumerate(IMAGE_EXTENSIONS)]
    make_tiles(tmp_path, names, size=16)
    assert sorted(relative(find_images(str(tmp_path)), tmp_path)) == sorted(names)


@pytest.mark.parametrize("contents", [[], ["sub/readme.txt", "sub/deeper/tile.png.txt"]], ids=["empty", "no_images"])
def test_folder_without_images_is_user_error(tmp_path, contents):
    folder = tmp_path / "empty_tiles"
    folder.mkdir()
    for name in contents:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("not an image")
    with pytest.raises(UserError) as info:
        find_images(str(folder))
    message = str(info.value)
    assert "empty_tiles" in message
    for ext in IMAGE_EXTENSIONS:
        assert ext in message


def test_missing_folder_is_user_error(tmp_path):
    with pytest.raises(UserError) as info:
        ImageFolder(str(tmp_path / "no_such_tiles"), 32)
    message = str(info.value)
    assert "no_such_tiles" in message and "does not exist" in message
    for ext in IMAGE_EXTENSIONS:
        assert ext in message


def test_file_instead_of_folder_is_user_error(tmp_path):
    path = tmp_path / "tile.png"
    Image.new("RGB", (8, 8)).save(path)
    with pytest.raises(UserError, match="tile.png"):
        find_images(str(path))


def decoded(path, size):
    tensor = load_image(str(path), size)
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, size, size)
    return tensor.permute(1, 2, 0).numpy().astype(int)


def test_grayscale_becomes_grey_rgb(tmp_path):
    gray = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    Image.fromarray(gray > 127).save(tmp_path / "bilevel.png")
    rgb = decoded(tmp_path / "gray.png", 32)
    assert np.array_equal(rgb, np.repeat(gray[:, :, None], 3, axis=2))
    bilevel = decoded(tmp_path / "bilevel.png", 32)
    assert np.array_equal(bilevel[:, :, 0], np.where(gray > 127, 255, 0))


def test_palette_becomes_its_colours(tmp_path):
    image = Image.new("P", (32, 32))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(1, (16, 0, 32, 32))
    image.save(tmp_path / "palette.png")
    rgb = decoded(tmp_path / "palette.png", 32)
    assert (rgb[:, :16] == [255, 0, 0]).all() and (rgb[:, 16:] == [0, 0, 255]).all()
    image.save(tmp_path / "palette_transparent.png", transparency=1)
    rgb = decoded(tmp_path / "palette_transparent.png", 32)
    assert (rgb[:, :16] == [255, 0, 0]).all() and (rgb[:, 16:] == 255).all()


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., 1] = 200                     # green everywhere
    rgba[:, :16, 3] = 255                  # left half opaque
    rgba[:, 16:, 3] = 0                    # right half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    rgb = decoded(tmp_path / "rgba.png", 32)
    assert (rgb[:, :16] == [0, 200, 0]).all()
    assert (rgb[:, 16:] == 255).all()


def test_16_bit_is_scaled_not_clipped(tmp_path):
    values = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    rgb = decoded(tmp_path / "deep.png", 32)
    assert np.abs(rgb[:, :, 0] - values / 257.0).max() <= 1
    assert (rgb[:, :, 0] == rgb[:, :, 2]).all()
    assert rgb.max() == 255 and len(np.unique(rgb)) > 16


@pytest.mark.parametrize("name", ["cmyk.tif", "cmyk.jpg"])
def test_cmyk_becomes_rgb(tmp_path, name):
    cmyk = np.zeros((32, 32, 4), dtype=np.uint8)
    cmyk[:, 16:, 0] = 255                  # right half: full cyan
    Image.fromarray(cmyk, "CMYK").save(tmp_path / name, quality=100)
    rgb = decoded(tmp_path / name, 32)
    assert np.abs(rgb[:, :12] - 255).max() <= 8                     # no ink: white
    assert np.abs(rgb[:, 20:] - [0, 255, 255]).max() <= 8           # cyan: no red


def quadrants(size):
    """Red, green / blue, white quadrants, so any rotation or flip is visible."""
    half = size // 2
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[:half, :half] = [255, 0, 0]
    image[:half, half:] = [0, 255, 0]
    image[half:, :half] = [0, 0, 255]
    image[half:, half:] = 255
    return image


def save_with_orientation(array, path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(array).save(path, quality=95, exif=exif.tobytes())


def test_exif_orientation_is_applied(tmp_path):
    stored = quadrants(64)
    save_with_orientation(stored, tmp_path / "rotated.jpg", 6)  # 6: display rotated 90 degrees clockwise
    rgb = decoded(tmp_path / "rotated.jpg", 64)
    clockwise = np.rot90(stored, k=-1).astype(int)
    assert np.abs(rgb - clockwise).mean() < 8
    assert np.abs(rgb - stored).mean() > 60


def test_exif_orientation_turns_a_landscape_image_upright(tmp_path):
    """A 128 x 64 landscape stored with orientation 6 is a 64 x 128 portrait: the centre square then
    shows the colours one above the other, not side by side."""
    stored = np.zeros((64, 128, 3), dtype=np.uint8)
    stored[:, :64] = [255, 0, 0]
    stored[:, 64:] = [0, 0, 255]
    save_with_orientation(stored, tmp_path / "landscape.jpg", 6)
    rgb = decoded(tmp_path / "landscape.jpg", 64)
    assert np.abs(rgb[:24] - [255, 0, 0]).mean() < 10      # top: red
    assert np.abs(rgb[40:] - [0, 0, 255]).mean() < 10      # bottom: blue
    save_with_orientation(stored, tmp_path / "plain.jpg", 1)
    rgb = decoded(tmp_path / "plain.jpg", 64)
    assert np.abs(rgb[:, :24] - [255, 0, 0]).mean() < 10   # without the tag: left red, right blue
    assert np.abs(rgb[:, 40:] - [0, 0, 255]).mean() < 10


@pytest.mark.parametrize("width, height", [(100, 100), (20, 20), (96, 48)])
def test_resized_to_tile_size(tmp_path, width, height):
    image = np.full((height, width, 3), (30, 120, 210), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "tile.png")
    rgb = decoded(tmp_path / "tile.png", 32)
    assert np.abs(rgb - [30, 120, 210]).max() <= 1


def test_non_square_is_centre_cropped(tmp_path):
    bands = np.zeros((32, 96, 3), dtype=np.uint8)
    bands[:, :32] = [255, 0, 0]
    bands[:, 32:64] = [0, 255, 0]
    bands[:, 64:] = [0, 0, 255]
    Image.fromarray(bands).save(tmp_path / "wide.png")
    Image.fromarray(bands.transpose(1, 0, 2)).save(tmp_path / "tall.png")
    for name in ("wide.png", "tall.png"):
        assert (decoded(tmp_path / name, 32) == [0, 255, 0]).all()


def test_resize_keeps_the_picture(tmp_path):
    Image.fromarray(quadrants(128)).save(tmp_path / "big.png")
    rgb = decoded(tmp_path / "big.png", 32)
    assert np.abs(rgb - quadrants(32)).mean() < 8


@pytest.fixture
def mixed_folder(tmp_path, make_tiles):
    folder = tmp_path / "mixed"
    good = make_tiles(folder, ["a.png", "c/d.png"], size=48)
    (folder / "b.png").write_bytes(b"this is not a png")
    valid = (folder / "a.png").read_bytes()
    (folder / "c" / "truncated.png").write_bytes(valid[: len(valid) // 2])
    return folder, good


def test_undecodable_file_is_an_item_with_an_error(mixed_folder):
    folder, good = mixed_folder
    dataset = ImageFolder(str(folder), 32)
    assert len(dataset) == 4
    items = {os.path.basename(item["path"]): item for item in (dataset[i] for i in range(len(dataset)))}
    for name in ("b.png", "truncated.png"):
        assert items[name]["image"] is None
        assert isinstance(items[name]["error"], str) and items[name]["error"]
    for name in ("a.png", "d.png"):
        assert items[name]["error"] is None and items[name]["image"].shape == (3, 32, 32)


def test_collate_drops_bad_items_and_reports_them(mixed_folder):
    folder, good = mixed_folder
    dataset = ImageFolder(str(folder), 32)
    images, paths, skipped = collate([dataset[i] for i in range(len(dataset))])
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8
    assert sorted(paths) == sorted(str(p) for p in good)
    assert sorted(os.path.basename(path) for path, _ in skipped) == ["b.png", "truncated.png"]
    assert all(reason for _, reason in skipped)
    for image, path in zip(images, paths):
        assert torch.equal(image, load_image(path, 32))


def test_collate_of_only_bad_items_is_empty(mixed_folder):
    folder, _ = mixed_folder
    dataset = ImageFolder(str(folder), 32)
    bad = [dataset[i] for i in range(len(dataset)) if dataset[i]["image"] is None]
    images, paths, skipped = collate(bad)
    assert len(images) == 0 and paths == [] and len(skipped) == 2


def test_data_loader_batches_in_folder_order(mixed_folder):
    folder, _ = mixed_folder
    dataset = ImageFolder(str(folder), 32)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=0, collate_fn=collate)
    seen, skipped = [], []
    for images, paths, bad in loader:
        assert images.shape[0] == len(paths)
        seen += paths
        skipped += [path for path, _ in bad]
    assert [p for p in dataset.paths if p in seen] == seen
    assert sorted(seen + skipped) == sorted(dataset.paths)


def test_skip_log_warns_once_per_file(capsys):
    log = Dataset.SkipLog()
    log.add([("x.png", "broken")])
    log.add([("x.png", "broken"), ("y.png", "empty")])
    assert len(log) == 2
    out = capsys.readouterr().out
    assert out.count("x.png") == 1 and "y.png" in out
    assert "2 unreadable" in log.summary()
