"""Writing outputs when the file system is hostile: links and special files where an output goes, a full
disk at any write, and sets of feature files that must stay consistent. Every failure is one UserError
naming the file; nothing half-written is left behind, and earlier outputs are kept as they were."""
import errno
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import Extract_Features
from core import checkpoint_io
from core import evaluation_engine
from core import atomic
from core import feature_plot
from core import report
from core.errors import UserError
from core.cli import load_config
from conftest import REPO, script_env, tile_array

TILE = 32


@pytest.fixture
def tiles(tmp_path):
    folder = tmp_path / "tiles"
    for i, name in enumerate(["a.png", "b.png", os.path.join("sub", "c.png"), "d.png"]):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(tile_array(i, TILE)).save(folder / name)
    return folder


def eval_config(folder, model, out, batch=2):
    return load_config([f"--folder_path_test={folder}", f"--model_path_mse={model}", f"--recon_output_mse={out}",
                        f"--reconstruction_metrics_mse={out}/metrics.xlsx", f"--tile_size={TILE}",
                        f"--batch_size_test={batch}", "--num_workers=0", "--GPUs=cpu"])


def feature_config(folder, model, out):
    return load_config([f"--folder_path_features={folder}", f"--model_path_ssim={model}",
                        f"--features_output={out}/features.csv", f"--tile_size={TILE}", "--num_workers=0",
                        "--GPUs=cpu"])


def leftovers(folder):
    """Temporary files left in folder or below it."""
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def contents(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def special_files(folder):
    """{kind: path} of the special files an output name may point at; a device node where this test may
    create one (root)."""
    victim = folder / "victim.txt"
    victim.write_text("not yours to overwrite")
    os.symlink(victim, folder / "link")
    os.mkfifo(folder / "pipe")
    kinds = {"symbolic link": folder / "link", "named pipe": folder / "pipe"}
    if os.geteuid() == 0:
        os.mknod(folder / "null", 0o666 | 0o020000, os.makedev(1, 3))  # a character device, as /dev/null
        kinds["device"] = folder / "null"
    return kinds


def test_atomic_write_refuses_links_and_special_files(tmp_path):
    for kind, path in special_files(tmp_path).items():
        before = os.lstat(path)
        with pytest.raises(UserError, match=f"it is a {kind}, not a regular file") as caught:
            atomic.atomic_write(str(path), lambda tmp: open(tmp, "w").write("new"))
        assert "\n" not in str(caught.value) and str(path) in str(caught.value)
        after = os.lstat(path)
        assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino), kind
    assert (tmp_path / "victim.txt").read_text() == "not yours to overwrite"
    assert not leftovers(tmp_path)


def test_a_link_planted_under_a_comparison_name_is_refused_before_any_work(tmp_path, tiles, model_file):
    (tmp_path / "out").mkdir()
    (tmp_path / "victim.txt").write_text("not yours to overwrite")
    os.symlink(tmp_path / "victim.txt", tmp_path / "out" / "b_comparison.png")
    result = subprocess.run([sys.executable, str(REPO / "Evaluation_MSE.py"), f"--folder_path_test={tiles}",
                             f"--model_path_mse={model_file}", f"--recon_output_mse={tmp_path / 'out'}",
                             f"--reconstruction_metrics_mse={tmp_path / 'out' / 'metrics.xlsx'}",
                             f"--tile_size={TILE}", "--num_workers=0", "--GPUs=cpu"], cwd=tmp_path,
                            env=script_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "refusing to write" in result.stderr and "b_comparison.png" in result.stderr
    assert "symbolic link" in result.stderr
    assert (tmp_path / "victim.txt").read_text() == "not yours to overwrite"
    assert sorted(os.listdir(tmp_path / "out")) == ["b_comparison.png"]


def test_disk_full_while_writing_comparison_pngs(tmp_path, tiles, model_file, monkeypatch):
    out = tmp_path / "out"
    evaluation_engine.evaluate(eval_config(tiles, model_file, out), "mse")
    before = contents(out)
    written = []

    def fills_up(path, data):
        if len(written) == 2:
            with open(path, "wb") as handle:
                handle.write(data[:len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        with open(path, "wb") as handle:
            handle.write(data)
        written.append(path)

    monkeypatch.setattr(atomic, "write_bytes", fills_up)
    with pytest.raises(UserError, match="No space left on device") as caught:
        evaluation_engine.evaluate(eval_config(tiles, model_file, out, batch=1), "mse")
    message = str(caught.value)
    assert "\n" not in message and "_comparison.png" in message and "the disk is full" in message
    assert not leftovers(out)
    assert contents(out) == before  # the earlier run's PNGs and workbook, untouched or rewritten whole
    for png in out.rglob("*.png"):
        with Image.open(png) as image:
            image.load()


def test_disk_full_while_writing_the_workbook(tmp_path, tiles, model_file, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.xlsx").write_bytes(b"an earlier run's workbook")

    flush = atomic._fsync

    def fsync(path):  # a full disk shows when the data is flushed on many file systems (NFS, ext4)
        if os.path.basename(path).startswith(".metrics.xlsx."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        flush(path)

    monkeypatch.setattr(atomic, "_fsync", fsync)
    with pytest.raises(UserError, match="metrics.xlsx") as caught:
        evaluation_engine.evaluate(eval_config(tiles, model_file, out), "mse")
    assert "the disk is full" in str(caught.value)
    assert (out / "metrics.xlsx").read_bytes() == b"an earlier run's workbook"
    assert not leftovers(out)


def test_check_writable_fails_on_a_full_disk(tmp_path, monkeypatch):
    real = os.statvfs(tmp_path)
    full = os.statvfs_result((real.f_bsize, real.f_frsize, real.f_blocks, 0, 0, real.f_files, real.f_ffree,
                              real.f_favail, real.f_flag, real.f_namemax))
    monkeypatch.setattr(os, "statvfs", lambda path: full)
    with pytest.raises(UserError, match="full disk"):
        atomic.check_writable(str(tmp_path / "out"))
    monkeypatch.undo()

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # where a full disk shows on many file systems

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(UserError, match="No space left on device"):
        atomic.check_writable(str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == []


def test_feature_files_are_replaced_together_or_not_at_all(tmp_path, tiles, model_file, monkeypatch):
    (tiles / "broken.png").write_bytes(b"not a picture")
    out = tmp_path / "features"
    Extract_Features.extract_features(feature_config(tiles, model_file, out))
    before = contents(out)
    assert {p.name for p in before} == {"features.csv", "features.npy", "features_paths.txt", "features_pca.png",
                                        "features_skipped.csv"}
    (tiles / "broken.png").unlink()
    Image.fromarray(tile_array(9, TILE)).save(tiles / "new.png")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(feature_plot.Figure, "savefig", no_space)  # the last file of the set to be written
    with pytest.raises(UserError, match="features_pca.png"):
        Extract_Features.extract_features(feature_config(tiles, model_file, out))
    assert contents(out) == before and not leftovers(out)

    monkeypatch.undo()
    Extract_Features.extract_features(feature_config(tiles, model_file, out))
    after = contents(out)
    assert {p.name for p in after} == {"features.csv", "features.npy", "features_paths.txt", "features_pca.png"}
    assert len(pd.read_csv(out / "features.csv")) == len(np.load(out / "features.npy")) == 5


def test_output_set_refuses_a_special_file_before_any_work(tmp_path, tiles, model_file):
    out = tmp_path / "features"
    out.mkdir()
    os.symlink("/dev/null", out / "features_paths.txt")
    with pytest.raises(UserError, match="features_paths.txt.*symbolic link"):
        Extract_Features.extract_features(feature_config(tiles, model_file, out))
    assert sorted(os.listdir(out)) == ["features_paths.txt"] and os.readlink(out / "features_paths.txt") == "/dev/null"


# Runs a script with a limit on the size of any file it writes (RLIMIT_FSIZE), so that a real write fails
# part-way, as on a full disk: the kernel refuses the bytes beyond the limit.
WITH_FILE_SIZE_LIMIT = """
import os, resource, runpy, signal, sys
limit, sys.argv = int(sys.argv[1]), sys.argv[2:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_tiles_are_never_left_half_written(tmp_path):
    rng = np.random.default_rng(0)
    stain = np.array([190, 90, 170]) + rng.integers(-30, 30, (64, 128, 3))  # H&E-like pink: tissue to the mask
    Image.fromarray(stain.astype(np.uint8)).save(tmp_path / "slide.png")
    result = subprocess.run([sys.executable, "-c", WITH_FILE_SIZE_LIMIT, "4096", str(REPO / "Prepare_Tiles.py"),
                             "--slide_path=slide.png", "--tiles_output_folder=tiles", "--tile_size=64",
                             "--tile_stride=64", "--exclude_tiles_in=", "--slide_mpp=0.5"], cwd=tmp_path, env=script_env(), stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    line = result.stderr.splitlines()[-1]  # after the progress bar
    assert line.startswith("error: cannot write ") and "slide_x000000_y000000.png" in line, result.stderr
    # No truncated tile, no temporary file: only the record of the cutting (Prepare_Tiles.py writes it first).
    assert os.listdir(tmp_path / "tiles") == [".slide_tiles.json"]


def test_workbook_sheets_read_cleanly_with_pandas(tmp_path):
    rows = [{"Image Path": f"t{i}.png", "MSE": 0.01 * (i + 1), "PSNR": 20.0 + i, "SSIM": 0.5 + 0.1 * i}
            for i in range(3)]
    report.write_workbook(str(tmp_path / "m.xlsx"), rows, {"bad.png": "empty file (0 bytes)"}, "model.pth",
                          "tiles", "bf16")
    sheets = pd.read_excel(tmp_path / "m.xlsx", sheet_name=None)
    assert list(sheets) == ["Metrics", "Summary", "Run", "Skipped"]
    summary = sheets["Summary"]
    assert list(summary.columns) == ["Metric", "Count", "Mean", "Std", "Min", "Max"]
    assert list(summary["Metric"]) == ["MSE", "PSNR", "SSIM"] and list(summary["Count"]) == [3, 3, 3]
    assert all(summary[column].dtype == np.float64 for column in ("Mean", "Std", "Min", "Max"))
    run = dict(zip(sheets["Run"]["Item"], sheets["Run"]["Value"]))
    assert run == {"Model": "model.pth", "Image folder": "tiles", "Precision": "bf16", "Images evaluated": 3,
                   "Files skipped": 1}


def test_disk_full_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "Model_AE_epoch_005.pth"
    checkpoint_io.save({"epoch": 5}, str(path))
    before = path.read_bytes()

    def fsync(_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic, "_fsync", fsync)
    with pytest.raises(UserError, match="Model_AE_epoch_005.pth.*the disk is full"):
        checkpoint_io.save({"epoch": 10, "weights": torch.zeros(1000)}, str(path))
    assert path.read_bytes() == before and not leftovers(tmp_path)


@pytest.mark.parametrize("when", ["creating", "writing"])
def test_an_interrupt_while_a_file_is_written_leaves_no_temporary_file(tmp_path, monkeypatch, when):
    """Ctrl-C or a scheduler's SIGTERM (a KeyboardInterrupt) arriving just after the temporary file was
    created, before its name was returned, or while its content is written: the old file stays, nothing else."""
    target = tmp_path / "summary.csv"
    target.write_text("old\n")
    real_open, real_close = os.open, os.close

    def open_then_interrupt(path, *args, **kwargs):
        real_close(real_open(path, *args, **kwargs))
        raise KeyboardInterrupt

    def write(tmp):
        with open(tmp, "w") as handle:
            handle.write("new\n")
        raise KeyboardInterrupt

    if when == "creating":
        monkeypatch.setattr(os, "open", open_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        atomic.atomic_write(str(target), write)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.csv"]
    assert target.read_text() == "old\n"
