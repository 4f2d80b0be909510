"""The slide mode of Extract_Features.py on a folder of tiny TIFF slides: one .h5 and picture per readable
slide, a summary row per file, 20x and 40x scans of one tissue agreeing, the slide mode agreeing with the
tile-folder mode on tiles cut by Prepare_Tiles.py, resume after a rerun, SIGTERM and a kill, and the shares
of torchrun processes and SLURM array tasks."""
import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile

import Extract_Features
import slides as test_slides
from core import shares, slide_features
from core.cli import load_config
from conftest import REPO, script_env, tile_array

TILE = 64
READABLE = ["s20.svs", os.path.join("deep", "s40.tif")]
BAD = ["broken.svs", "nompp.tif", "truncated.svs"]


def tissue(seed, width, height):
    """A slide image at 0.5 mpp: glass (near white) with a textured block of tissue in the middle."""
    image = np.full((height, width, 3), 242, np.uint8)
    block = tile_array(seed, max(width, height) // 2)
    top, left = height // 4, width // 4
    image[top:top + block.shape[0], left:left + block.shape[1]] = block[:height - top, :width - left]
    return image


def write_tiff(path, levels, mpp):
    """A tiled TIFF, level 0 first and each further level half the size before, at level 0's mpp."""
    path.parent.mkdir(parents=True, exist_ok=True)
    resolution = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER") if mpp else {}
    with tifffile.TiffWriter(path) as tif:
        tif.write(levels[0], tile=(64, 64), photometric="rgb", subifds=len(levels) - 1, **resolution)
        for level in levels[1:]:
            tif.write(level, tile=(64, 64), photometric="rgb", subfiletype=1)


def make_cohort(folder):
    """slides/: a 20x slide, a 40x pyramid of the same tissue, and three files that cannot be used."""
    (folder / "deep").mkdir(parents=True)
    test_slides.make_20x(folder, "s20.svs")
    test_slides.make_40x(folder / "deep", "s40.tif")
    test_slides.make_no_mpp(folder, "nompp.tif")
    test_slides.make_not_a_slide(folder, "broken.svs")
    test_slides.make_truncated(folder, "truncated.svs")


COHORT = ["--features_csv=true", "--tile_qc=true", "--num_workers=1", f"--tile_stride={2 * TILE}"]


def settings(out, slides="slides", *extra):
    return [f"--folder_path_slides={slides}", f"--features_folder={out}", f"--tile_size={TILE}",
            f"--tile_stride={TILE}", "--tissue_fraction=0.5", "--num_workers=0", "--GPUs=cpu",
            "--batch_size_test=4", "--model_path_ssim=model.pth", *extra]


def run_script(cwd, *args, env=None):
    return subprocess.run([sys.executable, str(REPO / "Extract_Features.py"), *args], cwd=cwd,
                          env=env or script_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=120)


def summary(path):
    with open(path, newline="") as handle:
        return {row["Slide"]: row for row in csv.DictReader(handle)}


def h5(path):
    with h5py.File(path, "r") as handle:
        return {key: handle[key][()] for key in handle}, dict(handle.attrs)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, model_file):
    root = tmp_path_factory.mktemp("slide_features")
    make_cohort(root / "slides")
    shutil.copy(model_file, root / "model.pth")
    return root


@pytest.fixture(scope="module")
def cohort(workspace):
    result = run_script(workspace, *settings("out", "slides", *COHORT))
    return result


def test_one_h5_and_picture_per_readable_slide_and_a_row_per_file(workspace, cohort):
    assert cohort.returncode == 2, cohort.stderr
    assert "error: 3 of 5 slides could not be described" in cohort.stderr
    rows = summary(workspace / "out" / "slides_summary.csv")
    assert sorted(rows) == sorted(os.path.join("slides", name) for name in READABLE + BAD)
    for name in READABLE:
        row = rows[os.path.join("slides", name)]
        assert row["Status"] == "done" and int(row["Tiles"]) > 0 and float(row["Seconds"]) > 0, row
        stem = os.path.join(workspace, "out", os.path.splitext(name)[0])
        assert os.path.isfile(stem + ".h5") and os.path.isfile(stem + "_tiles.png") and os.path.isfile(stem + ".csv")
    for name in BAD:
        row = rows[os.path.join("slides", name)]
        assert row["Status"] == "skipped" and row["Reason"], row
        assert cohort.stdout.count(f"warning: {os.path.join('slides', name)}: skipped") == 1, cohort.stdout
    assert "DeepCluster++ resizes every tile to 256 px" in cohort.stdout
    assert not list((workspace / "out").rglob("*.tmp"))


def test_h5_layout_attributes_and_qc(workspace, cohort):
    data, attrs = h5(workspace / "out" / "s20.h5")
    n = len(data["coords"])
    assert data["features"].shape == (n, 512) and data["features"].dtype == np.float32
    assert n > 10 and data["coords"].dtype == np.int64 and np.isfinite(data["features"]).all()
    order = np.lexsort((data["coords"][:, 0], data["coords"][:, 1]))
    assert (order == np.arange(n)).all()  # sorted by y, then x
    assert attrs["complete"] and attrs["tile_size"] == TILE and attrs["tile_side_level0"] == TILE
    assert attrs["slide_mpp"] == pytest.approx(test_slides.SAMPLE_MPP) and attrs["target_mpp"] == 0.5
    assert attrs["model_sha256"] == slide_features.file_sha256(workspace / "model.pth")
    assert data["qc_mse"].shape == (n,) and data["qc_ssim"].shape == (n,)
    assert ((data["qc_mse"] > 0) & (data["qc_mse"] < 0.5)).all()
    assert ((data["qc_ssim"] > -1) & (data["qc_ssim"] < 1)).all()
    _, attrs40 = h5(workspace / "out" / "deep" / "s40.h5")
    assert attrs40["slide_mpp"] == pytest.approx(test_slides.SAMPLE_MPP / 2) and attrs40["tile_side_level0"] == 2 * TILE
    table = pd.read_csv(workspace / "out" / "s20.csv")
    assert list(table.columns) == [f"Feature_{i}" for i in range(1, 513)] + ["File_Path"]
    assert table["File_Path"][0] == f"s20_x{data['coords'][0, 0]:06d}_y{data['coords'][0, 1]:06d}"
    np.testing.assert_array_equal(table.iloc[:, :512].to_numpy(np.float32), data["features"])


def test_20x_and_40x_agree_at_the_same_positions(workspace, cohort):
    f20, _ = h5(workspace / "out" / "s20.h5")
    f40, _ = h5(workspace / "out" / "deep" / "s40.h5")
    at40 = {tuple(xy): i for i, xy in enumerate((f40["coords"] // 2).tolist())}
    pairs = [(i, at40[xy]) for i, xy in enumerate(map(tuple, f20["coords"].tolist())) if xy in at40]
    assert len(pairs) >= 0.9 * max(len(f20["coords"]), len(f40["coords"]))  # the two masks keep the same tiles
    a, b = (f["features"][[p[k] for p in pairs]] for k, f in enumerate((f20, f40)))
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    print(f"20x against 40x: max abs difference {np.abs(a - b).max():.3g}, min cosine {cosine.min():.6f}")
    assert cosine.min() > 0.99


def test_slide_mode_equals_tile_folder_mode(workspace, cohort, run_script, monkeypatch):
    cut = run_script("Prepare_Tiles.py", "--slide_path=slides/s20.svs", "--tiles_output_folder=cut",
                     f"--tile_size={TILE}", f"--tile_stride={2 * TILE}", "--exclude_tiles_in=", cwd=workspace)
    assert cut.returncode == 0, cut.stderr
    monkeypatch.chdir(workspace)
    cfg = load_config(["--folder_path_features=cut", "--model_path_ssim=model.pth", f"--tile_size={TILE}",
                       "--num_workers=0", "--GPUs=cpu", "--features_output=folder_mode/features.csv"])
    features, paths = Extract_Features.extract_features(cfg)
    by_name = {os.path.splitext(os.path.basename(p))[0]: f for p, f in zip(paths, features)}
    table = pd.read_csv(workspace / "out" / "s20.csv")
    common = [name for name in table["File_Path"] if name in by_name]
    assert len(common) >= len(table) // 2 and common, (list(table["File_Path"]), sorted(by_name))
    slide_mode = table.set_index("File_Path").loc[common].to_numpy(np.float32)
    np.testing.assert_allclose(slide_mode, np.stack([by_name[name] for name in common]), rtol=0, atol=1e-5)


def test_the_same_command_again_reads_nothing(workspace, cohort, monkeypatch):
    before = {p: p.stat().st_mtime_ns for p in (workspace / "out").rglob("*") if p.suffix in (".h5", ".png", ".csv")
              and p.name != "slides_summary.csv" and "part" not in p.name}
    again = run_script(workspace, *settings("out", "slides", *COHORT))
    assert again.returncode == 2, again.stderr
    rows = summary(workspace / "out" / "slides_summary.csv")
    assert [rows[os.path.join("slides", n)]["Status"] for n in READABLE] == ["already done"] * 2
    assert {p: p.stat().st_mtime_ns for p in before} == before
    # Another setting is another result: the slide is described again.
    monkeypatch.chdir(workspace)
    slide_features.extract_slide_features(load_config(settings("out", "slides/s20.svs", *COHORT[:2],
                                                               f"--tile_stride={4 * TILE}")))
    assert summary(workspace / "out" / "slides_summary.csv")[os.path.join("slides", "s20.svs")]["Status"] == "done"


def copies_folder(workspace, name, count):
    folder = workspace / name
    for i in range(count):
        write_tiff(folder / f"c{i}" / "slide.tif", [tissue(10 + i, 448, 384)], 0.5)
    return folder


def test_sigterm_then_rerun_equals_a_clean_run(workspace, monkeypatch):
    copies_folder(workspace, "many", 4)
    monkeypatch.chdir(workspace)
    slide_features.extract_slide_features(load_config(settings("clean", "many")))
    process = subprocess.Popen([sys.executable, str(REPO / "Extract_Features.py"), *settings("stopped", "many")],
                               cwd=workspace, env=script_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    first = workspace / "stopped" / "c0" / "slide.h5"
    deadline = time.monotonic() + 60
    while not first.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143 and stderr.strip().endswith("interrupted"), stderr
    done = sorted(p.parent.name for p in (workspace / "stopped").rglob("slide.h5"))
    assert 1 <= len(done) < 4, done
    assert not list((workspace / "stopped").rglob("*.tmp"))
    # A signal between a slide's last file and its summary row leaves that row to the rerun.
    listed = summary(workspace / "stopped" / "slides_summary.csv")
    assert len(done) - 1 <= len(listed) <= len(done)
    # What a kill -9 while writing leaves: a temporary file and an .h5 without `complete`.
    victim = workspace / "stopped" / "c3" / "slide.h5"
    victim.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(victim, "w") as handle:
        handle.create_dataset("features", data=np.zeros((1, 512), np.float32))
    (victim.parent / ".slide.h5.0badf00d.tmp").write_bytes(b"half")

    slide_features.extract_slide_features(load_config(settings("stopped", "many")))  # the same command, in-process
    statuses = [row["Status"] for row in summary(workspace / "stopped" / "slides_summary.csv").values()]
    assert statuses.count("already done") == len(done) and statuses.count("done") == 4 - len(done)
    assert not list((workspace / "stopped").rglob("*.tmp"))
    for i in range(4):
        resumed, clean_data = (h5(workspace / out / f"c{i}" / "slide.h5")[0] for out in ("stopped", "clean"))
        for key in ("features", "coords"):
            np.testing.assert_array_equal(resumed[key], clean_data[key])
    assert sorted(p.relative_to(workspace / "stopped").as_posix() for p in (workspace / "stopped").rglob("*")
                  if "part" not in p.name) == sorted(p.relative_to(workspace / "clean").as_posix()
                                                     for p in (workspace / "clean").rglob("*") if "part" not in p.name)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_torchrun_two_processes_do_each_slide_once(workspace):
    folder = copies_folder(workspace, "ranked", 3)
    env = script_env()
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={free_port()}", str(REPO / "Extract_Features.py"),
                             *settings("ranked_out", folder.name)], cwd=workspace, env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("process 1 of 2: 2 of them") == 1 and result.stdout.count("process 2 of 2: 1 of them") == 1
    rows = summary(workspace / "ranked_out" / "slides_summary.csv")
    assert sorted(rows) == [os.path.join("ranked", f"c{i}", "slide.tif") for i in range(3)]
    assert all(row["Status"] == "done" for row in rows.values())
    parts = [summary(p) for p in sorted((workspace / "ranked_out").glob("slides_summary.part*of2.csv"))]
    assert [len(p) for p in parts] == [2, 1] and not set(parts[0]) & set(parts[1])


def test_slurm_array_tasks_split_the_slides(workspace, monkeypatch):
    folder = copies_folder(workspace, "array", 3)
    monkeypatch.chdir(workspace)
    cfg = load_config(settings("array_out", folder.name))
    shares = []
    for task in (1, 2):  # --array=1-2
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
        monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
        shares.append([row["Slide"] for row in slide_features.extract_slide_features(cfg)])
    assert shares == [[os.path.join("array", c, "slide.tif") for c in ("c0", "c2")], [os.path.join("array", "c1", "slide.tif")]]
    assert len(summary(workspace / "array_out" / "slides_summary.csv")) == 3


def test_process_share_combines_torchrun_and_slurm():
    env = {"RANK": "1", "WORLD_SIZE": "2", "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert shares.process_share(env) == (7, 8)
    assert shares.process_share({}) == (0, 1)
    stepped = {"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_MIN": "2", "SLURM_ARRAY_TASK_STEP": "2",
               "SLURM_ARRAY_TASK_COUNT": "3"}  # --array=2-6:2
    assert shares.process_share(stepped) == (2, 3)
    with pytest.raises(slide_features.UserError):
        shares.process_share({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "2"})


def test_output_names_never_collide(tmp_path):
    cfg = load_config(["--folder_path_slides=" + str(tmp_path), "--features_folder=f"], "features")
    slides = [str(tmp_path / "a.svs"), str(tmp_path / "a.tif"), str(tmp_path / "x" / "a.svs"), "/elsewhere/a.svs"]
    names = slide_features.output_names(slides, cfg)
    places = [os.path.join(*names[s]) for s in slides]
    assert len(set(places)) == 4
    assert places[2] == os.path.join("f", "x", "a") and places[0] == os.path.join("f", "a.svs")
    assert places[3] == os.path.join("f", "elsewhere", "a")
    grid = np.array([[0, 0], [64, 0], [128, 0], [256, 0], [0, 64], [64, 64]])
    assert slide_features.row_blocks(grid, 64, 2) == [(0, 2), (2, 1), (3, 1), (4, 2)]


def test_256px_features_equal_deepcluster_computation(workspace, monkeypatch):
    """DeepCluster++ on the same tiles: Resize(256), ToTensor, ImageNet Normalize outside the model, the
    plain (unfolded) encoder, the global average."""
    import openslide
    import torch
    from torchvision import transforms
    from Auto_encoder import IMAGENET_MEAN, IMAGENET_STD, AutoEncoder
    monkeypatch.chdir(workspace)
    slide_features.extract_slide_features(load_config(settings("dc", "slides/s20.svs", "--tile_size=256",
                                                               "--tile_stride=512")))
    data, _ = h5(workspace / "dc" / "s20.h5")
    assert len(data["coords"]) >= 1
    model = AutoEncoder()
    model.load_state_dict(torch.load(workspace / "model.pth", weights_only=True))
    model.eval()
    prepare = transforms.Compose([transforms.Resize(256), transforms.ToTensor(),
                                  transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    with openslide.OpenSlide(str(workspace / "slides" / "s20.svs")) as slide:
        tiles = [slide.read_region((int(x), int(y)), 0, (256, 256)).convert("RGB") for x, y in data["coords"]]
    with torch.inference_mode():
        theirs = model.encoder(torch.stack([prepare(tile) for tile in tiles])).mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(data["features"], theirs, rtol=0, atol=1e-5)
