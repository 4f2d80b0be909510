"""Extract_Features.py end to end on a tiny folder: the CSV DeepCluster++ reads, the .npy and paths files
beside it, the PCA plot, skipped files, determinism, and agreement with calling model.embed directly."""
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import Extract_Features
from core import feature_plot
from core import inference
from Auto_encoder import AutoEncoder
from Dataset import load_image
from core.cli import load_config
from core.devices import autocast_dtype
from conftest import REPO, script_env, tile_array
from core.inference import load_model

TILE = 64
HEADER = [f"Feature_{i}" for i in range(1, 513)] + ["File_Path"]
BAD = os.path.join("tiles", "b", "broken.png")


def _tile(seed, width=TILE, height=TILE):
    return Image.fromarray(tile_array(seed, max(width, height))[:height, :width])


def run_script(cwd, *args):
    return subprocess.run([sys.executable, str(REPO / "Extract_Features.py"), f"--tile_size={TILE}",
                           "--num_workers=0", "--GPUs=cpu", "--batch_size_test=3", *args],
                          cwd=cwd, env=script_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """tiles/a and tiles/b (a duplicate pair across them, a non-square JPEG, a broken file, a name with a
    comma and quotes), one tile directly in tiles/, and a seeded model saved as a training checkpoint."""
    root = tmp_path_factory.mktemp("features")
    for sub in ("a", "b"):
        (root / "tiles" / sub).mkdir(parents=True)
    _tile(1).save(root / "tiles" / "a" / "dup_one.png")
    _tile(1).save(root / "tiles" / "b" / "dup_two.png")
    _tile(2).save(root / "tiles" / "a" / "x1.png")
    _tile(3).save(root / "tiles" / "a" / 'x,"2".png')  # a name the CSV must quote
    _tile(4, width=96, height=80).save(root / "tiles" / "b" / "wide.jpg", quality=90)
    _tile(5).save(root / "tiles" / "top.png")
    (root / BAD).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    torch.manual_seed(0)
    model = AutoEncoder()
    torch.save({"epoch": 1, "model_state_dict": model.state_dict()}, root / "model.pth")
    return root


@pytest.fixture(scope="module")
def first_run(workspace):
    result = run_script(workspace, "--folder_path_features=tiles", "--model_path_ssim=model.pth",
                        "--features_output=out/features.csv")
    assert result.returncode == 0, result.stderr
    return result


def _csv(workspace, name="out/features.csv"):
    return pd.read_csv(workspace / name)


def test_csv_layout_and_rows(workspace, first_run):
    with open(workspace / "out" / "features.csv") as handle:
        assert handle.readline().rstrip("\n").split(",") == HEADER
    table = _csv(workspace)
    assert table.shape == (6, 513)
    assert all(table[c].dtype == np.float64 for c in HEADER[:-1])
    expected = sorted(["a/dup_one.png", "a/x1.png", 'a/x,"2".png', "b/dup_two.png", "b/wide.jpg", "top.png"],
                      key=lambda p: p.split("/"))
    assert list(table["File_Path"]) == [os.path.join("tiles", *p.split("/")) for p in expected]
    assert "6 feature vectors" in first_run.stdout and "images/s" in first_run.stdout


def test_bad_file_skipped_once_and_listed(workspace, first_run):
    assert BAD not in set(_csv(workspace)["File_Path"])
    assert first_run.stdout.count(f"warning: skipped {BAD}") == 1
    skipped = _csv(workspace, "out/features_skipped.csv")
    assert list(skipped.columns) == ["Path", "Reason"]
    assert list(skipped["Path"]) == [BAD]


def test_duplicate_pixels_give_identical_rows(workspace, first_run):
    table = _csv(workspace).set_index("File_Path")
    one = table.loc[os.path.join("tiles", "a", "dup_one.png")].to_numpy()
    two = table.loc[os.path.join("tiles", "b", "dup_two.png")].to_numpy()
    np.testing.assert_allclose(one, two, rtol=0, atol=1e-6)
    assert not np.allclose(one, table.loc[os.path.join("tiles", "a", "x1.png")].to_numpy())


def test_npy_paths_and_csv_agree_with_direct_embed(workspace, first_run):
    table = _csv(workspace)
    array = np.load(workspace / "out" / "features.npy")
    assert array.dtype == np.float32 and array.shape == (6, 512)
    np.testing.assert_array_equal(table[HEADER[:-1]].to_numpy().astype(np.float32), array)
    lines = (workspace / "out" / "features_paths.txt").read_text().splitlines()
    assert lines == list(table["File_Path"])

    # The run used Config's mixed_precision ("auto": fp32 for inference on a CPU); so does this.
    amp_dtype = autocast_dtype(torch.device("cpu"), "auto")
    model = load_model(str(workspace / "model.pth"), torch.device("cpu"))
    with torch.inference_mode(), torch.autocast("cpu", dtype=amp_dtype, enabled=amp_dtype is not None):
        x = torch.stack([load_image(str(workspace / p), TILE) for p in lines]).float() / 255
        direct = model.embed(x.contiguous(memory_format=torch.channels_last)).float().numpy()
    np.testing.assert_allclose(array, direct, rtol=1e-5, atol=1e-5)


def test_pca_png_opens(workspace, first_run):
    with Image.open(workspace / "out" / "features_pca.png") as image:
        image.verify()
        assert image.format == "PNG" and min(image.size) > 100


def test_deterministic_across_runs(workspace, first_run):
    again = run_script(workspace, "--folder_path_features=tiles", "--model_path_ssim=model.pth",
                       "--features_output=again/features.csv")
    assert again.returncode == 0, again.stderr
    for name in ("features.csv", "features.npy", "features_paths.txt", "features_skipped.csv"):
        assert (workspace / "again" / name).read_bytes() == (workspace / "out" / name).read_bytes(), name


def test_all_bad_folder_exits_2_and_writes_nothing(workspace):
    bad = workspace / "all_bad"
    bad.mkdir()
    (bad / "one.png").write_bytes(b"")
    (bad / "two.jpg").write_bytes(b"garbage")
    result = run_script(workspace, "--folder_path_features=all_bad", "--model_path_ssim=model.pth",
                        "--features_output=bad_out/features.csv")
    assert result.returncode == 2
    assert "error: none of the 2 files" in result.stderr
    assert list((workspace / "bad_out").iterdir()) == []


def test_only_the_encoder_runs(workspace, monkeypatch):
    class Forbidden(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("the decoder ran")

    def encoder_only(path, device):
        model = load_model(path, device)
        model.decoder = Forbidden()
        return model

    monkeypatch.setattr(inference, "load_model", encoder_only)
    monkeypatch.chdir(workspace)
    cfg = load_config(["--folder_path_features=tiles", "--model_path_ssim=model.pth", f"--tile_size={TILE}",
                       "--num_workers=0", "--GPUs=cpu", "--features_output=inproc/features.csv"])
    features, paths = Extract_Features.extract_features(cfg)
    assert features.shape == (6, 512) and len(paths) == 6
    assert (workspace / "inproc" / "features.csv").is_file()


def test_subfolder_labels_and_pca():
    folder = os.path.join("root", "tiles")
    paths = [os.path.join(folder, "s1", "deep", "t.png"), os.path.join(folder, "s2", "t.png"),
             os.path.join(folder, "t.png")]
    assert feature_plot.subfolder_labels(paths, folder) == ["s1", "s2", feature_plot.TOP_FOLDER_LABEL]

    rng = np.random.default_rng(0)
    data = rng.normal(size=(50, 512)).astype(np.float32) * 0.01
    data[:, 7] += np.linspace(-5, 5, 50, dtype=np.float32)
    scores, explained = feature_plot.pca_2d(data)
    assert scores.shape == (50, 2) and explained[0] > 0.9 and explained.sum() <= 1 + 1e-9
    centred = data.astype(np.float64) - data.mean(axis=0, dtype=np.float64)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(np.abs(scores), np.abs(u[:, :2] * s[:2]), rtol=1e-6, atol=1e-9)
    single, single_explained = feature_plot.pca_2d(data[:1])
    assert single.shape == (1, 2) and not single_explained.any()
