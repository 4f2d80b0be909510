"""Hostile files and folders, round three, built on the fly: folders the process may not read, pictures this
project drew lying among the tiles, file and folder names that matplotlib would read as mathtext or hide,
JPEGs with damaged EXIF data, and images whose pixel data ends early (a PNG declaring more rows than it
holds; truncated JPEGs; Pillow told to load truncated images)."""
import io
import os
import shutil
import struct
import zlib

import numpy as np
import openpyxl
import pytest
from PIL import Image, ImageFile

import Dataset
import Extract_Features
from core import evaluation_engine
from core import feature_plot
from core import loss_log
from core import png
from core.cli import load_config
from core.errors import UserError
from conftest import tile_array

TILE = 32


def eval_cfg(folder, model, out):
    return load_config([f"--folder_path_test={folder}", f"--model_path_mse={model}", f"--recon_output_mse={out}",
                        f"--reconstruction_metrics_mse={out}/metrics.xlsx", f"--tile_size={TILE}",
                        "--batch_size_test=4", "--num_workers=0", "--GPUs=cpu"], "evaluation", "mse")


def features_cfg(folder, model, out):
    return load_config([f"--folder_path_features={folder}", f"--model_path_ssim={model}",
                        f"--features_output={out}/features.csv", f"--tile_size={TILE}", "--batch_size_test=4",
                        "--num_workers=0", "--GPUs=cpu"], "features")


def skipped_sheet(path):
    sheet = openpyxl.load_workbook(path)["Skipped"]
    return {row[0]: row[1] for row in sheet.iter_rows(min_row=2, values_only=True)}


# --- folders the process cannot read ----------------------------------------------------------------------

def deny_listing(monkeypatch, denied):
    """os.scandir (which os.walk lists folders with) raises PermissionError for the folders in denied, as
    it does for a folder without read permission: root reads every folder, so the tests simulate it."""
    real = os.scandir
    denied = {os.path.abspath(path) for path in denied}

    def scandir(path="."):
        if os.path.abspath(path) in denied:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)
    monkeypatch.setattr(os, "scandir", scandir)


def test_an_unreadable_subfolder_is_one_warning_and_listed_with_the_skipped_files(tmp_path, make_tiles, model_file,
                                                                                monkeypatch, capsys):
    folder = tmp_path / "tiles"
    make_tiles(folder, ["a.png", "b.png", "locked/c.png", "open/d.png"], size=TILE)
    deny_listing(monkeypatch, [folder / "locked"])
    rows = evaluation_engine.evaluate(eval_cfg(folder, model_file, tmp_path / "out"), "mse")
    assert sorted(os.path.relpath(row["Image Path"], folder) for row in rows) == ["a.png", "b.png", "open/d.png"]
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(folder / "locked") in warnings[0] and "permission denied" in warnings[0]
    skipped = skipped_sheet(tmp_path / "out" / "metrics.xlsx")
    assert list(skipped) == [str(folder / "locked")]
    assert skipped[str(folder / "locked")].startswith("folder not readable (permission denied)")


def test_an_unreadable_subfolder_is_in_the_features_skipped_list(tmp_path, make_tiles, model_file, monkeypatch):
    folder = tmp_path / "tiles"
    make_tiles(folder, ["a.png", "b.png", "locked/c.png"], size=TILE)
    deny_listing(monkeypatch, [folder / "locked"])
    Extract_Features.extract_features(features_cfg(folder, model_file, tmp_path / "features"))
    listed = (tmp_path / "features" / "features_skipped.csv").read_text(encoding="utf-8").splitlines()
    assert listed[0] == "Path,Reason" and listed[1].startswith(f"{folder / 'locked'},folder not readable")


def test_an_unreadable_subfolder_is_counted_in_the_training_summary(tmp_path, make_tiles, monkeypatch, capsys):
    from core import training_engine
    folder = tmp_path / "tiles"
    make_tiles(folder, ["a.png", "b.png", "c.png", "d.png", "locked/e.png"], size=TILE)
    deny_listing(monkeypatch, [folder / "locked"])
    training_engine.train(load_config([
        f"--folder_path_train={folder}", f"--tile_size={TILE}", "--batch_size_train=4", "--num_epochs=1",
        "--num_workers=0", "--GPUs=cpu", "--augment=false", "--val_fraction=0", "--cache_tiles=false",
        f"--model_saved_location_mse={tmp_path / 'ckpt'}", f"--training_loss_file_mse={tmp_path / 'loss.csv'}"],
        "training", "mse"), "mse")
    out = capsys.readouterr().out
    assert "Training on 4 tiles" in out and "1 unreadable file(s) skipped" in out
    assert [line for line in out.splitlines() if line.startswith("warning: skipped")] == [
        f"warning: skipped {folder / 'locked'}: folder not readable (permission denied): the files in it were "
        "not searched; fix its permissions"]


def test_an_unreadable_image_folder_is_a_permission_error_not_an_empty_one(tmp_path, make_tiles, monkeypatch):
    folder = tmp_path / "tiles"
    make_tiles(folder, ["a.png"], size=TILE)
    deny_listing(monkeypatch, [folder])
    with pytest.raises(UserError) as info:
        Dataset.find_images(str(folder))
    assert "cannot be read (permission denied)" in str(info.value) and "no images found" not in str(info.value)


def test_a_subfolder_without_read_permission_on_disk(tmp_path, make_tiles):
    if os.geteuid() == 0:
        pytest.skip("root lists a folder whatever its mode; the monkeypatched tests above cover this case")
    folder = tmp_path / "tiles"
    make_tiles(folder, ["a.png", "locked/c.png"], size=TILE)
    (folder / "locked").chmod(0)
    try:
        left_out = {}
        assert Dataset.find_images(str(folder), skipped=left_out) == [str(folder / "a.png")]
        assert list(left_out) == [str(folder / "locked")]
    finally:
        (folder / "locked").chmod(0o755)


# --- our own pictures are never read as tiles ---------------------------------------------------------------

def test_every_picture_the_project_draws_carries_the_mark_and_tiles_do_not(tmp_path, make_tiles, model_file):
    rgb = tile_array(0, TILE)
    png.write_png(tmp_path / "tile.png", rgb)
    png.write_png(tmp_path / "drawn.png", rgb, mark=True)
    assert png.is_marked_png((tmp_path / "tile.png").read_bytes()) is False
    assert png.is_marked_png((tmp_path / "drawn.png").read_bytes()) is True
    with Image.open(tmp_path / "drawn.png") as img:  # an ordinary text chunk, and the same pixels
        assert png.OUTPUT_MARK_KEY in img.text and np.array_equal(np.asarray(img), rgb)
    loss_log.plot_history(tmp_path / "curve.png", [{"Epoch": 1, "Loss": "0.1"}, {"Epoch": 2, "Loss": "0.05"}], "mse")
    folder = tmp_path / "tiles"
    make_tiles(folder, ["a.png", "b.png", "c/d.png"], size=TILE)
    evaluation_engine.evaluate(eval_cfg(folder, model_file, tmp_path / "out"), "mse")
    Extract_Features.extract_features(features_cfg(folder, model_file, tmp_path / "features"))
    drawn = [tmp_path / "curve.png", tmp_path / "features" / "features_pca.png",
             *sorted((tmp_path / "out").rglob("*.png"))]
    assert len(drawn) == 5
    for path in drawn:
        assert png.is_marked_png(path.read_bytes()), path


def test_pictures_of_an_earlier_run_among_the_tiles_are_skipped_with_one_warning(tmp_path, make_tiles, model_file,
                                                                               monkeypatch, capsys):
    folder = tmp_path / "tiles"
    make_tiles(folder, ["a.png", "b.png", "c.png"], size=TILE)
    evaluation_engine.evaluate(eval_cfg(folder, model_file, tmp_path / "first"), "mse")
    Extract_Features.extract_features(features_cfg(folder, model_file, tmp_path / "features"))
    shutil.copytree(tmp_path / "first", folder / "old_run")
    shutil.copy(tmp_path / "features" / "features_pca.png", folder / "pca.png")
    capsys.readouterr()
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("the folder walk decoded an image"))
    left_out = {}
    found = Dataset.find_images(str(folder), skipped=left_out)
    monkeypatch.setattr(Image, "open", real_open)
    assert [os.path.basename(path) for path in found] == ["a.png", "b.png", "c.png"]
    assert len(left_out) == 4 and set(left_out.values()) == {Dataset.OWN_PICTURE}
    rows = evaluation_engine.evaluate(eval_cfg(folder, model_file, tmp_path / "second"), "mse")
    assert len(rows) == 3
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "4 picture(s) this project drew" in warnings[0]
    assert len(skipped_sheet(tmp_path / "second" / "metrics.xlsx")) == 4


# --- names are never interpreted by a library ---------------------------------------------------------------

def test_folder_names_are_shown_as_written_in_the_pca_plot(tmp_path):
    names = ["$a^$", "_hidden", "\\nocommand", "$x_{$"]
    labels = [name for name in names for _ in range(3)]
    features = np.random.default_rng(0).normal(size=(len(labels), 512)).astype(np.float32)
    figure = feature_plot.pca_figure(features, labels, "$\\frac{1}$ folder")
    figure.savefig(io.BytesIO(), format="png")  # mathtext would raise on every one of these names
    legend = figure.axes[0].get_legend()
    assert [text.get_text() for text in legend.get_texts()] == [f"{name} (3)" for name in names]
    assert figure.axes[0].get_title().endswith("in $\\frac{1}$ folder")


def test_names_that_look_like_formulas_are_text_in_the_workbook(tmp_path, make_tiles, model_file):
    folder = tmp_path / "tiles"
    names = ["=1+1.png", "+cmd.png", "-2.png", "@sum.png"]
    make_tiles(folder, names, size=TILE)
    evaluation_engine.evaluate(eval_cfg(folder, model_file, tmp_path / "out"), "mse")
    sheet = openpyxl.load_workbook(tmp_path / "out" / "metrics.xlsx")["Metrics"]
    cells = [row[0] for row in sheet.iter_rows(min_row=2)]
    assert sorted(os.path.basename(cell.value) for cell in cells) == sorted(names)
    assert all(cell.data_type == "s" for cell in cells)


# --- damaged EXIF -------------------------------------------------------------------------------------------

def jpeg_with_exif(rgb, exif_bytes):
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=95, exif=exif_bytes)
    return buffer.getvalue()


def damaged_exif():
    """EXIF with orientation 6 and a Make entry retyped to FLOAT: Pillow reads it, but ImageOps.exif_transpose
    fails rewriting it (AttributeError)."""
    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 6, "Cam"
    data = bytearray(exif.tobytes())
    count = struct.unpack(">H", data[14:16])[0]
    for entry in range(16, 16 + 12 * count, 12):
        if struct.unpack(">H", data[entry:entry + 2])[0] == 0x010F:
            data[entry + 2:entry + 8] = struct.pack(">HI", 11, 1)
    return bytes(data), exif.tobytes()


def test_a_jpeg_with_damaged_exif_is_decoded_upright_not_skipped(tmp_path):
    rgb = tile_array(3, TILE)
    rgb[:, : TILE // 2] = 0  # left half black: the orientation shows
    bad, good = damaged_exif()
    (tmp_path / "bad.jpg").write_bytes(jpeg_with_exif(rgb, bad))
    (tmp_path / "good.jpg").write_bytes(jpeg_with_exif(rgb, good))
    item = Dataset.ImageFolder(str(tmp_path), TILE)[0]
    assert item["error"] is None, item["error"]
    assert np.array_equal(item["image"].numpy(), Dataset.load_image(str(tmp_path / "good.jpg"), TILE).numpy())
    # Orientation 6 is a quarter turn clockwise: the black left half is on top now.
    assert item["image"][:, : TILE // 4].float().mean() < 10 < 40 < item["image"][:, -TILE // 4:].float().mean()


def test_unreadable_exif_is_decoded_without_its_orientation_with_one_warning(tmp_path, monkeypatch, capsys):
    rgb = tile_array(4, TILE)
    path = tmp_path / "x.jpg"
    path.write_bytes(jpeg_with_exif(rgb, damaged_exif()[1]))

    def broken(self):
        raise SyntaxError("not a TIFF file (header b'\\x00' not valid)")
    monkeypatch.setattr(Image.Image, "getexif", broken)
    first = Dataset.load_image(str(path), TILE)
    Dataset.load_image(str(path), TILE)
    warnings = capsys.readouterr().out.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {path}: damaged EXIF data")
    assert warnings[0].endswith("orientation ignored")
    decoded = np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)
    assert np.abs(first.numpy().astype(int) - decoded).max() <= 1  # as stored, not rotated


# --- pixel data that ends early -----------------------------------------------------------------------------

def png_chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))


def short_png(side=300, rows=10, interlace=0):
    """A PNG whose header declares side x side pixels and whose complete zlib stream holds `rows` rows (of the
    first Adam7 pass, every eighth pixel of every eighth row, when interlaced)."""
    rgb = tile_array(5, side)[::8, ::8] if interlace else tile_array(5, side)
    raw = b"".join(b"\0" + rgb[row].tobytes() for row in range(rows))
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, interlace)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(raw))
            + png_chunk(b"IEND", b""))


@pytest.mark.parametrize("interlace", [0, 1])
def test_a_png_holding_fewer_rows_than_it_declares_is_skipped_never_black(tmp_path, interlace):
    (tmp_path / "short.png").write_bytes(short_png(interlace=interlace))
    Image.fromarray(tile_array(6, TILE)).save(tmp_path / "whole.png")
    folder = Dataset.ImageFolder(str(tmp_path), TILE)
    short = folder[folder.paths.index(str(tmp_path / "short.png"))]
    assert short["image"] is None and short["error"].startswith("image data incomplete")
    assert folder[folder.paths.index(str(tmp_path / "whole.png"))]["error"] is None


def test_complete_pngs_of_every_layout_still_decode(tmp_path):
    rgb = tile_array(7, 40)
    for index, (mode, options) in enumerate([("RGB", {}), ("RGB", {"interlace": 1}), ("L", {}), ("RGBA", {}),
                                             ("P", {}), ("I;16", {}), ("1", {})]):
        img = Image.fromarray(rgb).convert(mode) if mode != "I;16" else Image.fromarray(
            (rgb[..., 0].astype(np.uint16) * 257))
        path = tmp_path / f"{index}.png"
        img.save(path, **options)
        data = path.read_bytes()
        Dataset.check_png_complete(data)
        assert Dataset.load_image(str(path), TILE).shape == (3, TILE, TILE)


@pytest.mark.parametrize("cut", [0.3, 0.7])
def test_a_truncated_jpeg_is_skipped(tmp_path, cut):
    buffer = io.BytesIO()
    Image.fromarray(tile_array(8, 64)).save(buffer, "JPEG")
    data = buffer.getvalue()
    (tmp_path / "cut.jpg").write_bytes(data[:int(len(data) * cut)])
    item = Dataset.ImageFolder(str(tmp_path), TILE)[0]
    assert item["image"] is None and "truncated" in item["error"].lower()


def test_pillow_told_to_load_truncated_images_is_refused(tmp_path, monkeypatch):
    (tmp_path / "short.png").write_bytes(short_png())
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(UserError, match="LOAD_TRUNCATED_IMAGES is True"):
        Dataset.ImageFolder(str(tmp_path), TILE)
