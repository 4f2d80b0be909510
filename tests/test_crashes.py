"""Processes killed with SIGKILL at the worst moment: what they leave behind is either the previous file or
a complete new one, and a rerun of the same command carries on."""
import csv
import os
import signal
import subprocess
import sys
import time

import openpyxl
import torch
from PIL import Image

from core import checkpoint_io
from Auto_encoder import AutoEncoder
from conftest import REPO, script_env, tile_array
from test_bad_inputs import TILE, eval_args, run, save_model

# Runs a script after wrapping one function so that the process SIGKILLs itself at a chosen moment:
# deterministic, unlike a kill sent from outside on a timer. argv: module, function, when, script, args...
KILL_WRAPPER = """
import os, signal, sys
import core.{module} as target
original, calls = target.{function}, []
def wrapped(*args, **kwargs):
    calls.append(args)
    {body}
target.{function} = wrapped
sys.argv = sys.argv[1:]
import runpy
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_killed(cwd, module, function, body, script, *args):
    code = KILL_WRAPPER.format(module=module, function=function, body=body)
    return subprocess.run([sys.executable, "-c", code, str(REPO / script), *map(str, args)], cwd=cwd,
                          env=dict(script_env(), PYTHONPATH=str(REPO)), stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=300)


def test_atomic_save_killed_mid_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "model.pth"
    checkpoint_io.save({"version": -1, "x": torch.zeros(10)}, target)
    numel = 16_000_000  # 64 MB: writing takes long enough to be caught in the middle
    saver = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, torch\nfrom core import checkpoint_io\n"
         f"x = torch.empty({numel})\n"
         "for version in range(1000):\n"
         "    checkpoint_io.save({'version': version, 'x': x.fill_(version)}, sys.argv[1])\n",
         str(target)], env=dict(script_env(), PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    def half_written():
        # Whatever file the saver writes into (a temporary one, or the target itself if saving were not
        # atomic), kill it while that file holds part of a version.
        sizes = [p.stat().st_size for p in tmp_path.iterdir() if p.is_file()]
        return any(2**20 < size < numel * 4 for size in sizes)

    try:
        deadline = time.time() + 60
        while not half_written():
            assert saver.poll() is None and time.time() < deadline, saver.stderr.read()
            time.sleep(0.002)
        saver.send_signal(signal.SIGKILL)
    finally:
        saver.kill()
        saver.wait()
    loaded = checkpoint_io.load(target)
    x, version = loaded["x"], loaded["version"]
    assert (version == -1 and x.numel() == 10) or (x.numel() == numel and bool((x == version).all()))


def test_atomic_write_creates_files_others_can_read(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    checkpoint_io.save({"x": torch.zeros(1)}, tmp_path / "model.pth")
    assert (tmp_path / "model.pth").stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would, not 0600


def test_training_killed_between_checkpoint_and_loss_log_resumes(tmp_path):
    for index in range(6):
        Image.fromarray(tile_array(index, TILE)).save(tmp_path / f"tile_{index}.png")
    args = [f"--folder_path_train={tmp_path}", f"--model_saved_location_mse={tmp_path / 'ckpt'}",
            f"--training_loss_file_mse={tmp_path / 'loss.csv'}", f"--tile_size={TILE}", "--num_epochs=3",
            "--batch_size_train=6", "--save_interval=1", "--val_fraction=0", "--num_workers=0", "--GPUs=cpu"]
    # Killed right after epoch 2's checkpoint is written, before its loss row: the log is behind the newest
    # checkpoint, which holds the rows the log lacks.
    killed = run_killed(tmp_path, "checkpoint_io", "atomic_write",
                        "original(*args, **kwargs)\n"
                        "    if str(args[0]).endswith('Model_AE_epoch_002.pth'):\n"
                        "        os.kill(os.getpid(), signal.SIGKILL)",
                        "Training_MSE.py", *args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    second = tmp_path / "ckpt" / "Model_AE_epoch_002.pth"
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.pth")) == ["Model_AE_epoch_001.pth", second.name]
    checkpoint_io.load_weights(AutoEncoder(), second)
    with open(tmp_path / "loss.csv", newline="") as handle:
        assert [row["Epoch"] for row in csv.DictReader(handle)] == ["1"]

    resumed = run("Training_MSE.py", *args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming from {second}" in resumed.stdout
    with open(tmp_path / "loss.csv", newline="") as handle:
        assert [row["Epoch"] for row in csv.DictReader(handle)] == ["1", "2", "3"]
    checkpoint_io.load_weights(AutoEncoder(), tmp_path / "ckpt" / "Final_Model_AE_MSE.pth")


def test_evaluation_killed_leaves_no_corrupt_workbook(tmp_path):
    model = save_model(tmp_path / "model.pth")
    for index in range(4):
        Image.fromarray(tile_array(index, TILE)).save(tmp_path / f"tile_{index}.png")
    out = tmp_path / "out"
    args = [*eval_args(tmp_path, model, out), "--batch_size_test=2"]
    assert run("Evaluation_MSE.py", *args, cwd=tmp_path).returncode == 0
    earlier = (out / "metrics.xlsx").read_bytes()

    # Killed half-way, after the first comparison PNG: no workbook is started yet.
    (out / "metrics.xlsx").unlink()
    half = run_killed(tmp_path, "report", "save_comparison",
                      "original(*args, **kwargs)\n    os.kill(os.getpid(), signal.SIGKILL)",
                      "Evaluation_MSE.py", *args)
    assert half.returncode == -signal.SIGKILL
    assert not (out / "metrics.xlsx").exists()

    # Killed with the new workbook fully written to its temporary file, just before it replaces the old one.
    (out / "metrics.xlsx").write_bytes(earlier)
    late = run_killed(tmp_path, "report", "atomic_write",
                      "original(args[0], lambda tmp: (args[1](tmp), os.kill(os.getpid(), signal.SIGKILL)))",
                      "Evaluation_MSE.py", *args)
    assert late.returncode == -signal.SIGKILL
    assert (out / "metrics.xlsx").read_bytes() == earlier
    assert len(list(openpyxl.load_workbook(out / "metrics.xlsx")["Metrics"].iter_rows(min_row=2))) == 4
