"""Hostile image folders and output paths: every script skips what it cannot read, names it, and otherwise
stops with one line on stderr (exit code 2) before doing any work. Every case is built here, on the fly."""
import io
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import openpyxl
import pytest
import torch
from PIL import Image

import Dataset
from core import checkpoint_io
from core import inference
from core import atomic
from core import report
from core import training_engine
from Auto_encoder import AutoEncoder
from Dataset import ImageFolder, find_images, load_image
from core.errors import UserError
from conftest import REPO, script_env, tile_array
from core.names import printable

TILE = 32
LATIN1_NAME = os.fsdecode(b"latin1_caf\xe9.png")  # a name that is not UTF-8, as copied from an old system
LATIN1_BAD = os.fsdecode(b"broken_caf\xe9.jpg")


def in_workbook(path):
    """How a path appears in the workbook: bytes that are not UTF-8 become \\xNN (names.printable)."""
    return printable(path)


def run(script, *args, cwd, env=()):
    """Run a script as a user would. Output is decoded by hand: text mode would turn a progress bar's
    carriage returns into line breaks, and a file name that is not UTF-8 into a decoding error."""
    done = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd,
                          env={**script_env(), **dict(env)},
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
    done.stdout, done.stderr = (os.fsdecode(stream) for stream in (done.stdout, done.stderr))
    return done


def error_line(result):
    """The one line on stderr, after checking the run failed as a user error (exit code 2)."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n"), repr(result.stderr)
    # A cleared progress bar may precede it on the same line; a terminal shows what follows the last \r.
    line = result.stderr.rstrip("\n").rsplit("\r", 1)[-1]
    assert line.startswith("error: "), repr(result.stderr)
    return line


def eval_args(folder, model, out):
    return [f"--folder_path_test={folder}", f"--model_path_mse={model}", f"--recon_output_mse={out}/png",
            f"--reconstruction_metrics_mse={out}/metrics.xlsx", f"--tile_size={TILE}", "--batch_size_test=16",
            "--num_workers=0", "--GPUs=cpu"]


def train_args(folder, out, epochs=1):
    return [f"--folder_path_train={folder}", f"--model_saved_location_mse={out}/ckpt",
            f"--training_loss_file_mse={out}/loss.csv", f"--tile_size={TILE}", f"--num_epochs={epochs}",
            "--batch_size_train=64", "--save_interval=100", "--val_fraction=0", "--num_workers=0", "--GPUs=cpu"]


def save_model(path):
    torch.manual_seed(0)
    torch.save(AutoEncoder().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("model") / "model.pth")


def tile(seed, width=24, height=24):
    return Image.fromarray(tile_array(seed, max(width, height))[:height, :width])


def truncated(image, fmt):
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()[:len(buffer.getvalue()) * 6 // 10]


def png_claiming_size(width, height):
    """A valid PNG header announcing width x height, with no pixels: what a decompression bomb looks like."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def write_mode_images(folder):
    """One small file per unusual pixel format. Returns {name: [((row, col), expected RGB), ...]} for the
    file decoded at TILE x TILE."""
    expected = {}
    Image.new("L", (20, 20), 77).save(folder / "gray.png")
    expected["gray.png"] = [((16, 16), (77, 77, 77))]
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.save(folder / "palette.png")
    expected["palette.png"] = [((16, 16), (10, 200, 30))]
    halves = Image.new("P", (20, 20), 1)
    halves.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    halves.paste(0, (0, 0, 10, 20))  # left half: index 0, the transparent one
    halves.save(folder / "palette_alpha.png", transparency=0)
    expected["palette_alpha.png"] = [((16, 2), (255, 255, 255)), ((16, 29), (10, 200, 30))]
    Image.new("RGBA", (20, 20), (0, 0, 0, 128)).save(folder / "rgba.png")
    expected["rgba.png"] = [((16, 16), (127, 127, 127))]  # half-transparent black over white
    Image.new("LA", (20, 20), (0, 128)).save(folder / "la.png")
    expected["la.png"] = [((16, 16), (127, 127, 127))]
    Image.fromarray(np.full((20, 20), 32768, np.uint16)).save(folder / "gray16.png")
    expected["gray16.png"] = [((16, 16), (128, 128, 128))]
    # All values <= 255: a 16-bit image that is nearly black must not be taken for an 8-bit one.
    Image.fromarray(np.full((20, 20), 200, np.uint16)).save(folder / "dark16.png")
    expected["dark16.png"] = [((16, 16), (1, 1, 1))]
    Image.fromarray(np.full((20, 20), 32768, np.uint16)).save(folder / "gray16.tif")
    expected["gray16.tif"] = [((16, 16), (128, 128, 128))]
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=95)
    expected["cmyk.jpg"] = [((16, 16), (255, 0, 0))]
    frames = [Image.new("RGB", (20, 20), colour) for colour in ((200, 30, 30), (30, 30, 200))]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100)
    expected["animated.gif"] = [((16, 16), (200, 30, 30))]
    # Stored 40 wide x 20 high, red left and blue right; EXIF 6 means "turn 90 degrees clockwise to view",
    # so upright it is 20 x 40 with red on top.
    sideways = Image.new("RGB", (40, 20), (220, 0, 0))
    sideways.paste((0, 0, 220), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways.save(folder / "exif_rotated.jpg", exif=exif, quality=95)
    expected["exif_rotated.jpg"] = [((2, 2), (220, 0, 0)), ((2, 29), (220, 0, 0)), ((29, 2), (0, 0, 220))]
    return expected


def build_hostile_folder(folder):
    """Every kind of awkward input in one tree. Returns (good relative paths, {bad relative path: reason})."""
    folder.mkdir()
    good = ["a.png", "a.jpg", "a_png.bmp", os.path.join("sub1", "s.png"), os.path.join("sub2", "s.png"),
            os.path.join("x.png", "inner.png"), "with space.png", "héllo_ß.png", "=1+1.png", "+cmd.png",
            "-minus.png", "@at.png", LATIN1_NAME]
    for index, name in enumerate(good):
        (folder / name).parent.mkdir(exist_ok=True)
        tile(index).save(folder / name)
    tile(50, 10, 10).save(folder / "tiny.png")
    tile(51, 90, 30).save(folder / "wide.png")
    good += ["tiny.png", "wide.png"] + list(write_mode_images(folder))
    (folder / "zero.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(truncated(Image.fromarray(tile_array(60, 64)), "PNG"))
    (folder / "truncated.jpg").write_bytes(truncated(Image.fromarray(tile_array(61, 64)), "JPEG"))
    (folder / "text.jpg").write_text("not a picture")
    (folder / LATIN1_BAD).write_text("not a picture")
    (folder / "bomb.png").write_bytes(png_claiming_size(20000, 20000))
    (folder / "notes.txt").write_text("ignored: not an image extension")
    os.symlink("..", folder / "sub1" / "loop")
    bad = {"zero.png": "empty file (0 bytes)", "truncated.png": "truncated", "truncated.jpg": "truncated",
           "text.jpg": "not a readable image", LATIN1_BAD: "not a readable image",
           "bomb.png": "decompression bomb"}
    return good, bad


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """(working folder, input folder name relative to it, good paths, {bad path: reason}); the input folder's
    name starts with '=' so every path the workbook stores would be a formula if written naively."""
    root = tmp_path_factory.mktemp("hostile")
    name = "=1+1 tiles"
    good, bad = build_hostile_folder(root / name)
    return (root, name, sorted(os.path.join(name, g) for g in good),
            {os.path.join(name, b): reason for b, reason in bad.items()})


def skip_warnings(stdout):
    return [line for line in stdout.splitlines() if line.startswith("warning: skipped ")]


def assert_one_warning_per_bad_file(stdout, bad):
    """Bytes of a file name that are not UTF-8 are shown as \\xNN (names.printable)."""
    warnings = skip_warnings(stdout)
    assert len(warnings) == len(bad), stdout
    for path, reason in bad.items():
        shown = printable(path)
        matching = [w for w in warnings if w.startswith(f"warning: skipped {shown}: ")]
        assert len(matching) == 1 and reason in matching[0], (path, warnings)


def test_evaluation_of_a_hostile_folder(hostile, model_file):
    root, name, good, bad = hostile
    # A terminal whose encoding rejects what it cannot encode, as a UTF-8 desktop locale does.
    result = run("Evaluation_MSE.py", *eval_args(name, model_file, "out"), cwd=root,
                 env={"PYTHONIOENCODING": "utf-8:strict"})
    assert result.returncode == 0, result.stderr
    assert_one_warning_per_bad_file(result.stdout, bad)
    assert not any("x.png:" in w for w in skip_warnings(result.stdout)), "a folder named x.png is searched"

    book = openpyxl.load_workbook(root / "out" / "metrics.xlsx")
    cells = [row[0] for row in book["Metrics"].iter_rows(min_row=2)]
    # Each file once: the link loop added nothing.
    assert sorted(cell.value for cell in cells) == sorted(map(in_workbook, good))
    assert all(cell.data_type == "s" for cell in cells)
    skipped = {row[0].value: row[1].value for row in book["Skipped"].iter_rows(min_row=2)}
    assert set(skipped) == set(map(in_workbook, bad))
    assert all(reason in skipped[in_workbook(path)] for path, reason in bad.items())
    folder_cell = next(row[1] for row in book["Run"].iter_rows() if row[0].value == "Image folder")
    assert folder_cell.value == name and folder_cell.data_type == "s"

    pngs = [p.relative_to(root / "out" / "png") for p in (root / "out" / "png").rglob("*.png") if p.is_file()]
    assert len(pngs) == len(good)  # one per image: no name clash overwrote another
    assert {str(p) for p in pngs} >= {os.path.join("sub1", "s_comparison.png"),
                                     os.path.join("sub2", "s_comparison.png"),
                                     os.path.join("x.png", "inner_comparison.png")}


def test_training_on_a_hostile_folder(hostile, tmp_path):
    root, name, _, bad = hostile
    result = run("Training_MSE.py", *train_args(root / name, tmp_path, epochs=2), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    bad_absolute = {os.path.join(root, path): reason for path, reason in bad.items()}
    assert_one_warning_per_bad_file(result.stdout, bad_absolute)  # once, although both epochs met them
    assert "Epoch 2/2, Average Loss" in result.stdout
    checkpoint_io.load_weights(AutoEncoder(), tmp_path / "ckpt" / "Final_Model_AE_MSE.pth")


def test_unusual_pixel_formats_become_the_right_rgb(tmp_path):
    for name, checks in write_mode_images(tmp_path).items():
        decoded = load_image(tmp_path / name, TILE)
        assert decoded.shape == (3, TILE, TILE) and decoded.dtype == torch.uint8, name
        for (row, col), rgb in checks:
            pixel = decoded[:, row, col].int().numpy()
            assert np.abs(pixel - rgb).max() <= 6, (name, (row, col), pixel)  # 6: JPEG's loss


@pytest.mark.parametrize("width, height", [(90, 30), (30, 90)])
def test_non_square_is_centre_cropped_then_resized(tmp_path, width, height):
    thirds = np.zeros((height, width, 3), np.uint8)
    colours = np.array([(200, 0, 0), (0, 200, 0), (0, 0, 200)], np.uint8)
    for i, colour in enumerate(colours):
        if width > height:
            thirds[:, i * width // 3:(i + 1) * width // 3] = colour
        else:
            thirds[i * height // 3:(i + 1) * height // 3] = colour
    Image.fromarray(thirds).save(tmp_path / "long.png")
    decoded = load_image(tmp_path / "long.png", TILE)
    assert decoded.shape == (3, TILE, TILE)
    assert (decoded.permute(1, 2, 0).int() - torch.tensor([0, 200, 0])).abs().max() <= 1  # the middle third only


def test_training_and_evaluation_decode_through_the_same_code(tmp_path):
    assert training_engine.ImageFolder is inference.ImageFolder is Dataset.ImageFolder
    tile(0, 90, 30).save(tmp_path / "wide.png")
    tile(1, 10, 10).save(tmp_path / "tiny.jpg")
    dataset = ImageFolder(tmp_path, TILE)
    for item in (dataset[0], dataset[1]):
        assert torch.equal(item["image"], load_image(item["path"], TILE))


def test_huge_images_are_resized_with_bounded_memory(tmp_path):
    # 6000 x 6000 RGB is 144 MB in Pillow's 4-byte pixels. A JPEG is decoded at 1/8 scale (draft); a PNG
    # cannot be, but must not be copied on its way to a tile.
    colour = (120, 60, 200)
    huge = Image.new("RGB", (6000, 6000), colour)
    huge.save(tmp_path / "huge.jpg", quality=90)
    huge.save(tmp_path / "huge.png", compress_level=1)
    del huge
    tile(0).save(tmp_path / "small.png")
    # VmHWM is this process's peak RSS (ru_maxrss would include the forking test process's own peak);
    # writing 5 to clear_refs resets it, so each image is measured on its own.
    code = (
        "import json, sys\n"
        "from Dataset import load_image\n"
        "def peak():\n"
        "    with open('/proc/self/status') as handle:\n"
        "        return next(int(line.split()[1]) for line in handle if line.startswith('VmHWM')) / 1024\n"
        "for path in sys.argv[1:]:\n"
        "    with open('/proc/self/clear_refs', 'w') as handle:\n"
        "        handle.write('5')\n"
        "    before = peak()\n"
        "    decoded = load_image(path, 32)\n"
        "    print(json.dumps([list(decoded.shape), decoded.float().mean(dim=(1, 2)).tolist(), peak() - before]))\n")
    result = subprocess.run([sys.executable, "-c", code, "small.png", "huge.jpg", "huge.png"], cwd=tmp_path,
                            env=dict(script_env(), PYTHONPATH=str(REPO)), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    # The small image first: the first decode's one-off allocations are not the huge images'.
    _, (jpeg_shape, jpeg_mean, jpeg_mb), (png_shape, png_mean, png_mb) = map(json.loads, result.stdout.splitlines())
    assert jpeg_shape == png_shape == [3, TILE, TILE]
    assert np.abs(np.array(jpeg_mean) - colour).max() <= 3 and np.abs(np.array(png_mean) - colour).max() <= 1
    assert jpeg_mb < 40, result.stdout
    assert png_mb < 216, result.stdout  # 1.5 x the decoded picture: held once, not copied three times


def test_walk_survives_links_and_folders_named_like_images(tmp_path):
    tile(0).save(tmp_path / "a.png")
    (tmp_path / "x.png").mkdir()
    tile(1).save(tmp_path / "x.png" / "b.png")
    (tmp_path / "deep").mkdir()
    os.symlink("..", tmp_path / "deep" / "up")
    os.symlink(tmp_path, tmp_path / "deep" / "root")
    os.symlink("missing.png", tmp_path / "dangling.png")
    found = find_images(tmp_path)
    assert sorted(os.path.realpath(p) for p in found if "dangling" not in p) == sorted(
        str(tmp_path / name) for name in ("a.png", os.path.join("x.png", "b.png")))
    item = ImageFolder(tmp_path, TILE, paths=[tmp_path / "dangling.png"])[0]
    assert item["image"] is None and "No such file" in item["error"]


def test_comparison_names_are_unique_even_when_stems_clash(tmp_path):
    names = ["a.png", "a.jpg", "a_png.bmp", "B.png", "b.jpg", os.path.join("s1", "t.png"),
             os.path.join("s2", "t.png"), LATIN1_NAME, "x" * 300 + ".png", "x" * 300 + ".jpg"]
    paths = [str(tmp_path / n) for n in names]
    out = report.comparison_names(paths, str(tmp_path))
    assert len({name.casefold() for name in out.values()}) == len(names)
    for name in out.values():
        assert name.endswith("_comparison.png") and len(os.fsencode(os.path.basename(name))) <= 255
        (tmp_path / "out" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "out" / name).write_bytes(b"")  # the file system accepts every name


def test_workbook_never_turns_a_path_into_a_formula(tmp_path):
    paths = [f"{prefix}tile {i}.png" for i, prefix in enumerate(("=", "+", "-", "@", "=HYPERLINK(\"x\")"))]
    rows = [{"Image Path": p, "MSE": 0.1, "PSNR": 10.0, "SSIM": 0.5} for p in paths]
    skipped = {"=bad.png": "empty file (0 bytes)", "@other.jpg": "=not a formula either"}
    report.write_workbook(str(tmp_path / "m.xlsx"), rows, skipped, "=model.pth", "+folder")
    book = openpyxl.load_workbook(tmp_path / "m.xlsx")
    metric_cells = [row[0] for row in book["Metrics"].iter_rows(min_row=2)]
    assert [c.value for c in metric_cells] == paths and all(c.data_type == "s" for c in metric_cells)
    skipped_cells = [c for row in book["Skipped"].iter_rows(min_row=2) for c in row]
    assert [c.value for c in skipped_cells] == [v for item in skipped.items() for v in item]
    assert all(c.data_type == "s" for c in skipped_cells)


def test_every_file_bad_is_one_error_and_writes_nothing(tmp_path, model_file):
    folder = tmp_path / "bad tiles"
    folder.mkdir()
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.jpg").write_text("not a picture")
    (folder / "truncated.png").write_bytes(truncated(Image.fromarray(tile_array(0, 64)), "PNG"))
    (tmp_path / "out").mkdir()
    earlier = tmp_path / "out" / "metrics.xlsx"
    earlier.write_bytes(b"an earlier run's workbook")
    result = run("Evaluation_MSE.py", *eval_args(folder, model_file, tmp_path / "out"), cwd=tmp_path)
    assert str(folder) in error_line(result)
    assert len(skip_warnings(result.stdout)) == 3
    assert earlier.read_bytes() == b"an earlier run's workbook"
    assert not list((tmp_path / "out").rglob("*.png")) and not list((tmp_path / "out").rglob("*.tmp"))


def test_training_on_only_bad_files_is_one_error(tmp_path):
    folder = tmp_path / "bad tiles"
    folder.mkdir()
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.jpg").write_text("not a picture")
    result = run("Training_MSE.py", *train_args(folder, tmp_path), cwd=tmp_path)
    assert str(folder) in error_line(result)
    assert not list((tmp_path / "ckpt").glob("*.pth"))


@pytest.mark.parametrize("script", ["Evaluation_MSE.py", "Training_MSE.py"])
@pytest.mark.parametrize("problem", ["missing", "file"])
def test_input_folder_missing_or_a_file(tmp_path, model_file, script, problem):
    folder = tmp_path / "tiles"
    if problem == "file":
        folder.write_bytes(b"")
    args = eval_args(folder, model_file, tmp_path) if script.startswith("Eval") else train_args(folder, tmp_path)
    line = error_line(run(script, *args, cwd=tmp_path))
    assert str(folder) in line
    assert ("does not exist" if problem == "missing" else "is a file, not a folder") in line


@pytest.mark.parametrize("script, setting, leaf", [
    ("Evaluation_MSE.py", "recon_output_mse", "png"),
    ("Evaluation_MSE.py", "reconstruction_metrics_mse", "metrics.xlsx"),
    ("Training_MSE.py", "model_saved_location_mse", "ckpt"),
    ("Training_MSE.py", "training_loss_file_mse", "loss.csv"),
])
def test_unwritable_output_fails_before_any_work(tmp_path, script, setting, leaf):
    # Tests run as root, so permissions cannot block a folder; a file where a folder must be always does.
    blocker = tmp_path / "a file"
    blocker.write_text("")
    # Input and model do not exist either: an error about them would mean work started before the check.
    inputs = (["--folder_path_train=absent"] if script.startswith("Training")
              else ["--folder_path_test=absent", "--model_path_mse=absent.pth"])
    args = [f"--{setting}={blocker / leaf}", *inputs, f"--tile_size={TILE}", "--num_workers=0", "--GPUs=cpu"]
    result = run(script, *args, cwd=tmp_path)
    line = error_line(result)
    assert "cannot write to output folder" in line and f"{blocker} is a file" in line
    assert result.stdout == ""


def test_workbook_path_that_is_a_folder_fails_before_any_work(tmp_path):
    (tmp_path / "metrics.xlsx").mkdir()
    result = run("Evaluation_MSE.py", f"--reconstruction_metrics_mse={tmp_path / 'metrics.xlsx'}",
                 "--folder_path_test=absent", "--model_path_mse=absent.pth", "--GPUs=cpu", cwd=tmp_path)
    assert f"{tmp_path / 'metrics.xlsx'}" in error_line(result) and result.stdout == ""


def test_atomic_write_onto_a_folder_is_a_user_error(tmp_path):
    (tmp_path / "loss.csv").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        atomic.atomic_write(str(tmp_path / "loss.csv"), lambda tmp: open(tmp, "w").close())
    assert sorted(os.listdir(tmp_path)) == ["loss.csv"]
