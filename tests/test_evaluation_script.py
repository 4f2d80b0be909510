"""Evaluation_MSE.py / Evaluation_SSIM.py run as a user runs them: comparison PNGs, the metrics workbook,
agreement with scikit-image, the checkpoint layouts they accept, and batch-size independence."""
import io
import os
import time

import numpy as np
import openpyxl
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from core import checkpoint_io
from core import evaluation_engine
from core import inference
from core import report
from Auto_encoder import AutoEncoder
from Dataset import find_images, load_image
from core.png import png_bytes
from core.errors import UserError
from core.cli import load_config
from core.devices import autocast_dtype
from conftest import REPO, SAMPLE_TILES, tile_array

TILE = 64
IMAGES = ["A/x.png", "B/x.png", "B/C/y.jpg", "B/C/deep/w.tif", "z.png", "A/v.webp", "q.bmp"]
BROKEN = "B/broken.png"
COLUMNS = ["Image Path", "MSE", "PSNR", "SSIM"]
METRICS = ("MSE", "PSNR", "SSIM")
TOL = 1e-4


def reference_metrics(original, reconstruction):
    """scikit-image's MSE, PSNR and SSIM of two H x W x 3 float arrays in [0, 1]."""
    return {"MSE": float(np.mean((original - reconstruction) ** 2)),
            "PSNR": peak_signal_noise_ratio(original, reconstruction, data_range=1),
            "SSIM": structural_similarity(reconstruction, original, gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False, data_range=1, channel_axis=-1)}


def agrees(value, reference, name):
    """SSIM to TOL; MSE and PSNR relatively, since 8-bit rounding of the output would shift them by less than TOL."""
    return value == pytest.approx(reference, abs=TOL) if name == "SSIM" else value == pytest.approx(reference, rel=1e-5)


def model_output(model_path, image_paths, tile_size, precision="off"):
    """uint8 originals, float originals and the model's float reconstructions, computed here without the
    evaluation loop: the tiles as Dataset decodes them, straight through the loaded network (one batch)."""
    images = torch.stack([load_image(str(p), tile_size) for p in image_paths])
    model = inference.load_model(str(model_path), torch.device("cpu"))
    originals = images.float() / 255
    amp_dtype = autocast_dtype(torch.device("cpu"), precision)
    with torch.no_grad(), torch.autocast("cpu", dtype=amp_dtype, enabled=amp_dtype is not None):
        reconstructions = model(originals.contiguous(memory_format=torch.channels_last)).float().clamp(0, 1)
    return images, originals, reconstructions


def as_array(tensor):
    return tensor.permute(1, 2, 0).double().numpy()


def read_workbook(path):
    book = openpyxl.load_workbook(path)
    sheets = {name: [list(row) for row in book[name].iter_rows(values_only=True)] for name in book.sheetnames}
    return sheets


def summary_rows(sheets):
    """Summary's statistics and Run's items, by their first cell."""
    return {row[0]: row[1:] for name in ("Summary", "Run") for row in sheets[name] if row and row[0] is not None}


def eval_args(folder, model, out, batch, loss="mse"):
    return [f"--folder_path_test={folder}", f"--model_path_{loss}={model}", f"--recon_output_{loss}={out}/recon/",
            f"--reconstruction_metrics_{loss}={out}/metrics.xlsx", f"--tile_size={TILE}", "--num_workers=0",
            "--GPUs=cpu", f"--batch_size_test={batch}", "--mixed_precision=off"]


def assert_succeeded(result):
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr


@pytest.fixture
def model_path(model_file):
    return model_file


@pytest.fixture
def workdir(tmp_path, model_path):
    """tiles/ with seven images in nested subfolders (the stem x in two of them) and one broken file."""
    for index, name in enumerate(IMAGES):
        path = tmp_path / "tiles" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(tile_array(index, 80)).save(path, quality=95)
    (tmp_path / "tiles" / BROKEN).write_bytes(b"\x89PNG but not really")
    return tmp_path


def test_evaluation_outputs(workdir, model_path, run_script):
    result = run_script("Evaluation_MSE.py", *eval_args("tiles", model_path, "out", 3), cwd=workdir)
    assert_succeeded(result)
    assert BROKEN.replace("/", os.sep) in result.stdout  # the skipped file is reported

    inputs = sorted(os.path.join("tiles", name) for name in IMAGES)
    sheets = read_workbook(workdir / "out" / "metrics.xlsx")
    assert list(sheets) == ["Metrics", "Summary", "Run", "Skipped"]
    metrics_sheet = sheets["Metrics"]
    assert metrics_sheet[0] == COLUMNS
    rows = [dict(zip(COLUMNS, row)) for row in metrics_sheet[1:]]
    assert sorted(row["Image Path"] for row in rows) == inputs
    assert len(rows) == len(IMAGES)

    # One PNG per image, mirroring the subfolders; the two x.png files do not overwrite each other.
    recon_dir = workdir / "out" / "recon"
    written = sorted(os.path.relpath(p, recon_dir) for p in recon_dir.rglob("*") if p.is_file())
    expected_names = sorted(os.path.splitext(name)[0] + "_comparison.png" for name in IMAGES)
    assert written == [os.path.normpath(n) for n in expected_names]

    # Workbook metrics are those of the model's float output, as scikit-image computes them.
    paths = [workdir / row["Image Path"] for row in rows]
    images, originals, reconstructions = model_output(model_path, paths, TILE)
    for i, row in enumerate(rows):
        reference = reference_metrics(as_array(originals[i]), as_array(reconstructions[i]))
        for name in METRICS:
            assert isinstance(row[name], float)
            assert agrees(row[name], reference[name], name), (row["Image Path"], name)

    # Each PNG is report.comparison_image of the tile and its 8-bit reconstruction.
    recon_u8 = reconstructions.mul(255).round().to(torch.uint8)
    for i, row in enumerate(rows):
        label = os.path.relpath(row["Image Path"], "tiles")
        expected = report.comparison_image(images[i], recon_u8[i], row, label)
        with Image.open(recon_dir / (os.path.splitext(label)[0] + "_comparison.png")) as png:
            assert png.size == expected.size
            difference = np.abs(np.asarray(png.convert("RGB"), dtype=int) - np.asarray(expected, dtype=int))
        assert difference.max() <= 1, label

    summary = summary_rows(sheets)
    assert summary["Metric"] == ["Count", "Mean", "Std", "Min", "Max"]
    for name in METRICS:
        values = np.array([row[name] for row in rows])
        count, mean, std, low, high = summary[name][:5]
        assert count == len(IMAGES)
        assert mean == pytest.approx(values.mean(), abs=1e-9)
        assert std == pytest.approx(values.std(ddof=1), abs=1e-9)
        assert (low, high) == (pytest.approx(values.min()), pytest.approx(values.max()))
    assert summary["Model"][0] == str(model_path)
    assert summary["Precision"][0] == "fp32"

    skipped = sheets["Skipped"]
    assert skipped[0][:2] == ["Path", "Reason"]
    assert [row[0] for row in skipped[1:]] == [os.path.join("tiles", BROKEN)]
    assert skipped[1][1]


def test_bf16_evaluation_stays_close_to_fp32(workdir, model_path, monkeypatch):
    """mixed_precision=bf16 (what "auto" picks on most GPUs) changes the metrics only in the last digits
    that matter, and the workbook says which precision produced them."""
    monkeypatch.chdir(workdir)
    results = {}
    for precision in ("off", "bf16"):
        args = eval_args("tiles", model_path, f"out_{precision}", 4)[:-1] + [f"--mixed_precision={precision}"]
        results[precision] = evaluation_engine.evaluate(load_config(args), "mse")
        summary = summary_rows(read_workbook(workdir / f"out_{precision}" / "metrics.xlsx"))
        assert summary["Precision"][0] == ("fp32" if precision == "off" else "bf16")
    assert [row["Image Path"] for row in results["off"]] == [row["Image Path"] for row in results["bf16"]]
    differences = {name: max(abs(a[name] - b[name]) for a, b in zip(results["off"], results["bf16"]))
                   for name in METRICS}
    assert 0 < differences["PSNR"] < 0.1  # bf16 really ran, and stayed within a tenth of a dB
    assert differences["SSIM"] < 2e-3


def test_batch_size_is_honoured(workdir, model_path, monkeypatch):
    """Batches of 3 and of 32 files reach the model as such (less the broken file) and give the same numbers."""
    sizes = []
    reconstruct = evaluation_engine.reconstruct

    def recording(model, images, device, amp_dtype):
        sizes.append(len(images))
        return reconstruct(model, images, device, amp_dtype)

    monkeypatch.setattr(evaluation_engine, "reconstruct", recording)
    monkeypatch.chdir(workdir)
    results = {}
    for batch in (3, 32):
        sizes.clear()
        cfg = load_config(eval_args("tiles", model_path, f"out{batch}", batch))
        results[batch] = evaluation_engine.evaluate(cfg, "mse")
        files = find_images("tiles")
        expected = [sum(not p.endswith("broken.png") for p in files[i:i + batch]) for i in range(0, len(files), batch)]
        assert sizes == expected and len(sizes) == (3 if batch == 3 else 1)
    assert [row["Image Path"] for row in results[3]] == [row["Image Path"] for row in results[32]]
    for row3, row32 in zip(results[3], results[32]):
        for name in METRICS:
            assert row3[name] == pytest.approx(row32[name], abs=1e-5)


LAYOUTS = ["bare", "training", "data_parallel", "ddp_in_training_dict", "compiled", "state_dict_key",
           "float16", "float16_module"]


def layout(name, state):
    """A checkpoint layout users bring: (object to save, state dict the model must end up with)."""
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    from_half = {k: v.float() if v.is_floating_point() else v for k, v in half.items()}
    return {
        "bare": (state, state),
        "training": ({"epoch": 3, "model_state_dict": state, "loss": 0.1,
                      "optimizer_state_dict": {"state": {}, "param_groups": []}}, state),
        "data_parallel": ({f"module.{k}": v for k, v in state.items()}, state),
        "ddp_in_training_dict": ({"epoch": 1, "model_state_dict": {f"module.{k}": v for k, v in state.items()}},
                                 state),
        "compiled": ({f"_orig_mod.{k}": v for k, v in state.items()}, state),
        "state_dict_key": ({"state_dict": state}, state),
        "float16": (half, from_half),
        "float16_module": ({f"module.{k}": v for k, v in half.items()}, from_half),
    }[name]


@pytest.mark.parametrize("name", LAYOUTS)
def test_checkpoint_layouts_load(tmp_path, model_path, name):
    state = torch.load(model_path, weights_only=True)
    saved, expected = layout(name, state)
    path = tmp_path / f"{name}.pth"
    torch.save(saved, path)
    weights = AutoEncoder()
    checkpoint_io.load_weights(weights, str(path))
    loaded = weights.state_dict()
    assert list(loaded) == list(state)
    for key, value in expected.items():
        assert loaded[key].dtype == state[key].dtype
        assert torch.equal(loaded[key], value.to(state[key].dtype)), key

    # The inference model (BatchNorm folded into the convolutions) computes what the plain network does.
    model = inference.load_model(str(path), torch.device("cpu"))
    assert not model.training
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    reference = AutoEncoder()
    reference.load_state_dict(state)
    x = torch.rand(2, 3, TILE, TILE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(x), reference.eval()(x), atol=1e-2 if "float16" in name else 1e-5)


def test_checkpoint_with_extra_keys_is_refused(tmp_path, model_path):
    state = torch.load(model_path, weights_only=True)
    state["head.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(UserError, match="head.weight"):
        inference.load_model(str(tmp_path / "extra.pth"), torch.device("cpu"))


def test_checkpoint_that_does_not_fit_exits_2_naming_keys(workdir, model_path, run_script):
    state = torch.load(model_path, weights_only=True)
    del state["encoder.0.bias"]
    state["decoder.15.weight"] = torch.zeros(4, 32, 3, 3)
    torch.save(state, workdir / "wrong.pth")
    result = run_script("Evaluation_MSE.py", *eval_args("tiles", "wrong.pth", "out", 4), cwd=workdir)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert "encoder.0.bias" in lines[0] and "decoder.15.weight" in lines[0] and "wrong.pth" in lines[0]
    assert not (workdir / "out" / "metrics.xlsx").exists()
    assert not list((workdir / "out").rglob("*.png"))


def test_shipped_defaults_on_sample_tiles(tmp_path, run_script):
    """Evaluation_SSIM.py exactly as shipped (input_images, the sample SSIM model), outputs redirected."""
    result = run_script("Evaluation_SSIM.py", f"--recon_output_ssim={tmp_path}/recon/",
                        f"--reconstruction_metrics_ssim={tmp_path}/metrics.xlsx", cwd=REPO, timeout=400)
    assert_succeeded(result)
    tiles = sorted(SAMPLE_TILES.glob("*.png"))
    assert len(tiles) == 16
    assert sorted(p.name for p in (tmp_path / "recon").iterdir()) == sorted(f"{p.stem}_comparison.png" for p in tiles)
    for png in (tmp_path / "recon").iterdir():
        with Image.open(png) as image:
            image.verify()

    sheets = read_workbook(tmp_path / "metrics.xlsx")
    assert sheets["Metrics"][0] == COLUMNS
    rows = [dict(zip(COLUMNS, row)) for row in sheets["Metrics"][1:]]
    assert len(rows) == 16
    assert [os.path.basename(row["Image Path"]) for row in rows] == [p.name for p in tiles]
    assert summary_rows(sheets)["SSIM"][0] == 16
    assert summary_rows(sheets)["Model"][0] == "sample_models/model_auto_encoder_reconstruction_ssim.pth"

    # Metrics of the network's output at the precision the workbook names ("auto": fp32 on a CPU, bf16 on
    # most GPUs), all 16 tiles in one batch as batch_size_test=32 feeds them.
    precision = summary_rows(sheets)["Precision"][0]
    assert precision in ("fp32", "bf16")
    model = REPO / "sample_models" / "model_auto_encoder_reconstruction_ssim.pth"
    images, originals, reconstructions = model_output(model, tiles, 256, "off" if precision == "fp32" else precision)
    for i in range(16):
        reference = reference_metrics(as_array(originals[i]), as_array(reconstructions[i]))
        for name in METRICS:
            assert agrees(rows[i][name], reference[name], name), (rows[i]["Image Path"], name)


@pytest.mark.parametrize("shape", [(1, 1, 3), (2, 7, 3), (5, 3, 3), (334, 542, 3)])
def test_png_bytes_decode_to_the_same_pixels(shape):
    rgb = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    rgb[shape[0] // 2:] = 255  # runs of one value too, which zlib's run-length strategy encodes differently
    with Image.open(io.BytesIO(png_bytes(rgb))) as png:
        assert png.format == "PNG" and png.mode == "RGB" and png.size == (shape[1], shape[0])
        assert np.array_equal(np.asarray(png), rgb)


def test_each_batch_pngs_are_written_before_the_next_forward_pass(workdir, model_path, monkeypatch):
    """At most one batch of images waits for its PNG: memory stays flat however many tiles there are (on a
    GPU the network outruns PNG writing), and on a CPU the writing never runs beside the network."""
    written, seen_by_forward = [], []
    save, reconstruct = report.save_comparison, evaluation_engine.reconstruct

    def slow_save(*args):
        time.sleep(0.05)
        save(*args)
        written.append(args[-1])

    def recording(*args):
        seen_by_forward.append(len(written))
        return reconstruct(*args)

    monkeypatch.setattr(report, "save_comparison", slow_save)
    monkeypatch.setattr(evaluation_engine, "reconstruct", recording)
    monkeypatch.chdir(workdir)
    rows = evaluation_engine.evaluate(load_config(eval_args("tiles", model_path, "out", 2)), "mse")
    files = find_images("tiles")
    batches = [size for size in (sum(not p.endswith("broken.png") for p in files[i:i + 2])
                                 for i in range(0, len(files), 2)) if size]
    assert seen_by_forward == [sum(batches[:k]) for k in range(len(batches))]
    assert len(written) == len(rows) == sum(batches)


def test_comparison_pngs_from_processes_are_those_from_threads(workdir, model_path, monkeypatch):
    """Beside a GPU the comparison PNGs are drawn by processes (drawing holds the GIL); run here with the pool
    a GPU gets, the PNGs and metrics are those the CPU's threads write, and a full disk is still one error."""
    from concurrent.futures import ProcessPoolExecutor
    monkeypatch.chdir(workdir)
    threads_rows = evaluation_engine.evaluate(load_config(eval_args("tiles", model_path, "threads", 3)), "mse")
    real = evaluation_engine.comparison_writers
    pool, parts, in_flight = real(torch.device("cuda"), loader_workers=0)
    pool.shutdown()
    assert isinstance(pool, ProcessPoolExecutor) and parts >= 1 and in_flight == 2
    pool, _, in_flight = real(torch.device("cpu"), loader_workers=0)
    pool.shutdown()
    assert not isinstance(pool, ProcessPoolExecutor) and in_flight == 1
    monkeypatch.setattr(evaluation_engine, "comparison_writers",
                        lambda device, workers: real(torch.device("cuda"), workers))
    monkeypatch.setattr(evaluation_engine, "cpu_count", lambda: 3)  # two processes, so a batch is split
    process_rows = evaluation_engine.evaluate(load_config(eval_args("tiles", model_path, "processes", 3)), "mse")
    assert process_rows == threads_rows
    names = sorted(path.relative_to(workdir / "threads") for path in (workdir / "threads").rglob("*.png"))
    assert len(names) == len(threads_rows) and names == sorted(
        path.relative_to(workdir / "processes") for path in (workdir / "processes").rglob("*.png"))
    for name in names:
        assert (workdir / "threads" / name).read_bytes() == (workdir / "processes" / name).read_bytes()

    def full_disk(path, rgb, mark=False):
        raise UserError(f"cannot write {path!r}: the disk is full")
    monkeypatch.setattr(report, "write_png", full_disk)  # the forked processes inherit it
    with pytest.raises(UserError, match="the disk is full"):
        evaluation_engine.evaluate(load_config(eval_args("tiles", model_path, "full", 3)), "mse")
    assert not (workdir / "full" / "metrics.xlsx").exists()
