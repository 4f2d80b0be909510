"""Hostile settings and runs, round three: a Config.py that is broken or missing, empty paths, too few
training tiles for BatchNorm, errors under torchrun, read-only outputs, and a second run on the outputs of
a live one (and none left locked by a run killed with SIGKILL)."""
import os
import signal
import socket
import subprocess
import sys
import time

import openpyxl
import pytest
import torch
from PIL import Image

import Extract_Features
from core import checkpoint_io
from core import cli
from core import evaluation_engine
from core import run_lock
from core import training_engine
from core.cli import load_config
from core.errors import UserError
from conftest import REPO, script_env, tile_array

TILE = 32


def tiles(folder, count):
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.fromarray(tile_array(index, TILE)).save(folder / f"t{index}.png")
    return folder


def train_args(folder, out, *extra):
    return [f"--folder_path_train={folder}", f"--tile_size={TILE}", "--batch_size_train=4", "--num_epochs=1",
            "--num_workers=0", "--GPUs=cpu", "--augment=false", "--cache_tiles=false",
            f"--model_saved_location_mse={out / 'ckpt'}", f"--training_loss_file_mse={out / 'loss.csv'}", *extra]


def eval_args(folder, model, out):
    return [f"--folder_path_test={folder}", f"--model_path_mse={model}", f"--recon_output_mse={out}",
            f"--reconstruction_metrics_mse={out}/metrics.xlsx", f"--tile_size={TILE}", "--batch_size_test=4",
            "--num_workers=0", "--GPUs=cpu"]


# --- Config.py and settings ---------------------------------------------------------------------------------

@pytest.fixture
def own_config(tmp_path, monkeypatch):
    """Write a Config.py of the test's own (the text given), found before the repository's."""
    def write(text):
        folder = tmp_path / "config"
        folder.mkdir()
        if text is not None:
            (folder / "Config.py").write_text(text)
        monkeypatch.delitem(sys.modules, "Config", raising=False)
        monkeypatch.setattr(sys, "path", [str(folder)] + [p for p in sys.path
                                                          if os.path.abspath(p or ".") != str(REPO)])
        return folder / "Config.py"
    yield write


@pytest.mark.parametrize("text, line, what", [
    ("seed = 0\nnum_epochs = = 3\n", 2, "invalid syntax"),
    ("seed = 0\nbatch_size_train = 64\ntile_size = tile * 2\n", 3, "NameError: name 'tile' is not defined"),
])
def test_a_broken_config_is_one_line_naming_the_file_and_line(own_config, text, line, what):
    path = own_config(text)
    with pytest.raises(UserError) as info:
        load_config([], "training", "mse")
    message = str(info.value)
    assert message.startswith(f"{path} line {line}: ") and what in message and "\n" not in message


def test_a_missing_config_is_one_line(own_config):
    own_config(None)
    with pytest.raises(UserError, match=r"^Config.py not found in .*: restore it from the repository$"):
        load_config([], "evaluation", "mse")


def test_a_broken_config_through_a_script_is_exit_2_and_no_traceback(tmp_path):
    (tmp_path / "Config.py").write_text('GPUs = "0"\nnum_workers = 4 +\n')
    code = (f"import runpy, sys; sys.path[:0] = [{str(tmp_path)!r}, {str(REPO)!r}]; "
            f"runpy.run_path({str(REPO / 'Evaluation_MSE.py')!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=script_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"error: {tmp_path / 'Config.py'} line 2: invalid syntax: fix that line " \
                                  "(each setting is name = value)"


@pytest.mark.parametrize("script, loss, key", [
    ("evaluation", "mse", "recon_output_mse"), ("evaluation", "ssim", "reconstruction_metrics_ssim"),
    ("evaluation", "mse", "model_path_mse"), ("training", "mse", "training_loss_file_mse"),
    ("training", "ssim", "model_saved_location_ssim"), ("features", None, "features_output"),
    ("features", None, "folder_path_features"), ("tiles", None, "tiles_output_folder"),
])
def test_an_empty_path_names_the_setting(script, loss, key):
    for value in ("", "   "):
        with pytest.raises(UserError) as info:
            load_config([f"--{key}={value}"], script, loss)
        assert str(info.value) == f"--{key}={value}: expected a path (text, not empty, no NUL character)"


def test_settings_where_empty_has_a_meaning_still_take_it():
    assert load_config(["--GPUs="], "training", "mse").GPUs == ""
    assert load_config(["--exclude_tiles_in="], "tiles").exclude_tiles_in == ""


@pytest.mark.parametrize("count, val_fraction, left", [(1, 0.0, 1), (2, 0.5, 1), (3, 0.9, 0)])
def test_too_few_training_tiles_name_the_settings_to_change(tmp_path, count, val_fraction, left):
    folder = tiles(tmp_path / "tiles", count)
    with pytest.raises(UserError) as info:
        training_engine.train(load_config(train_args(folder, tmp_path, f"--val_fraction={val_fraction}"),
                                          "training", "mse"), "mse")
    message = str(info.value)
    assert f"holds {count} tile(s) and val_fraction={val_fraction} leaves {left} for training" in message
    assert "BatchNorm needs at least 2" in message and "lower val_fraction" in message
    assert not (tmp_path / "ckpt" / "Final_Model_AE_MSE.pth").exists()


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_under_torchrun_an_error_is_printed_once_with_exit_2(tmp_path):
    folder = tiles(tmp_path / "tiles", 6)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", str(REPO / "Training_MSE.py"),
                           *train_args(folder, tmp_path, "--learning_rate=0")],
                          cwd=tmp_path, env=script_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=180)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --learning_rate=0: expected a finite number (float) above 0"], done.stderr
    assert "exitcode  : 2" in done.stderr and done.returncode != 0


# --- read-only outputs --------------------------------------------------------------------------------------

def test_a_read_only_workbook_is_refused_before_any_work(tmp_path, model_file):
    folder = tiles(tmp_path / "tiles", 2)
    out = tmp_path / "out"
    out.mkdir()
    workbook = out / "metrics.xlsx"
    workbook.write_bytes(b"kept")
    workbook.chmod(0o444)
    with pytest.raises(UserError) as info:
        evaluation_engine.evaluate(load_config(eval_args(folder, model_file, out), "evaluation", "mse"), "mse")
    assert str(info.value) == (f"refusing to replace {str(workbook)!r}: it is read-only (mode 0444); make it "
                               "writable (chmod u+w) or choose another file name")
    assert workbook.read_bytes() == b"kept" and not list(out.glob("*.png"))


def test_a_read_only_features_csv_is_refused(tmp_path, model_file):
    folder = tiles(tmp_path / "tiles", 2)
    csv_path = tmp_path / "features" / "features.csv"
    csv_path.parent.mkdir()
    csv_path.write_text("kept")
    csv_path.chmod(0o400)
    cfg = load_config([f"--folder_path_features={folder}", f"--model_path_ssim={model_file}",
                       f"--features_output={csv_path}", f"--tile_size={TILE}", "--num_workers=0", "--GPUs=cpu"],
                      "features")
    with pytest.raises(UserError, match="it is read-only \\(mode 0400\\)"):
        Extract_Features.extract_features(cfg)
    assert csv_path.read_text() == "kept" and not (csv_path.parent / "features.npy").exists()


def test_a_read_only_checkpoint_is_not_replaced(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(b"kept")
    path.chmod(0o444)
    with pytest.raises(UserError, match="read-only"):
        checkpoint_io.save({"w": torch.zeros(1)}, path)
    assert path.read_bytes() == b"kept"


def test_a_read_only_final_model_stops_training_before_the_first_epoch(tmp_path, capsys):
    folder = tiles(tmp_path / "tiles", 4)
    final = tmp_path / "ckpt" / "Final_Model_AE_MSE.pth"
    final.parent.mkdir()
    final.write_bytes(b"kept")
    final.chmod(0o444)
    with pytest.raises(UserError, match="Final_Model_AE_MSE.pth.*read-only"):
        training_engine.train(load_config(train_args(folder, tmp_path, "--val_fraction=0"), "training", "mse"), "mse")
    assert "Epoch 1/1" not in capsys.readouterr().out and final.read_bytes() == b"kept"


def test_a_read_only_periodic_checkpoint_is_not_pruned(tmp_path):
    from core import training_state
    for epoch in (1, 2, 3):
        (tmp_path / f"Model_AE_epoch_{epoch:03d}.pth").write_bytes(b"x")
    (tmp_path / "Model_AE_epoch_001.pth").chmod(0o444)
    training_state.prune_checkpoints(str(tmp_path), 1, 3)
    assert sorted(os.listdir(tmp_path)) == ["Model_AE_epoch_001.pth", "Model_AE_epoch_003.pth"]


# --- one run at a time --------------------------------------------------------------------------------------

def holder(output, folder=False):
    """A process that holds the run lock of output until it is killed; returns it once it holds it."""
    code = ("import sys, time; from core import run_lock; "
            f"ctx = run_lock.hold(sys.argv[1], 'x', folder={folder}); ctx.__enter__(); print('held', flush=True); "
            "time.sleep(120)")
    process = subprocess.Popen([sys.executable, "-c", code, str(output)], cwd=REPO, env=script_env(),
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def killed(process):
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def test_a_second_evaluation_on_the_same_outputs_is_refused_while_the_first_lives(tmp_path, model_file):
    folder = tiles(tmp_path / "tiles", 2)
    out = tmp_path / "out"
    out.mkdir()
    first = holder(out / "metrics.xlsx")
    try:
        done = subprocess.run([sys.executable, str(REPO / "Evaluation_MSE.py"), *eval_args(folder, model_file, out)],
                              cwd=tmp_path, env=script_env(), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2 and done.stderr.strip() == (
            f"error: reconstruction_metrics_mse={str(out / 'metrics.xlsx')!r} is in use by another run (process "
            f"{first.pid}): wait for it to finish, or give reconstruction_metrics_mse another path")
        assert not (out / "metrics.xlsx").exists()
    finally:
        killed(first)
    # The first run died by SIGKILL: its lock went with it.
    rows = evaluation_engine.evaluate(load_config(eval_args(folder, model_file, out), "evaluation", "mse"), "mse")
    assert len(rows) == 2 and openpyxl.load_workbook(out / "metrics.xlsx")["Metrics"].max_row == 3


def test_a_second_training_on_one_checkpoint_folder_is_refused(tmp_path):
    folder = tiles(tmp_path / "tiles", 4)
    (tmp_path / "ckpt").mkdir()
    first = holder(tmp_path / "ckpt", folder=True)
    try:
        with pytest.raises(UserError, match=r"^model_saved_location_mse=.* is in use by another run \(process "
                                            f"{first.pid}\\)"):
            training_engine.train(load_config(train_args(folder, tmp_path, "--val_fraction=0"), "training", "mse"),
                                  "mse")
    finally:
        killed(first)
    training_engine.train(load_config(train_args(folder, tmp_path, "--val_fraction=0"), "training", "mse"), "mse")
    assert (tmp_path / "ckpt" / "Final_Model_AE_MSE.pth").is_file()


def test_a_second_feature_extraction_on_one_output_is_refused(tmp_path, model_file):
    folder = tiles(tmp_path / "tiles", 2)
    csv_path = tmp_path / "features" / "features.csv"
    first = holder(csv_path)
    try:
        done = subprocess.run([sys.executable, str(REPO / "Extract_Features.py"), f"--folder_path_features={folder}",
                               f"--model_path_ssim={model_file}", f"--features_output={csv_path}",
                               f"--tile_size={TILE}", "--num_workers=0", "--GPUs=cpu"],
                              cwd=tmp_path, env=script_env(), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2 and "features_output=" in done.stderr and "is in use by another run" in done.stderr
        assert not csv_path.exists()
    finally:
        killed(first)


def test_the_lock_is_taken_again_in_the_same_process_once_released(tmp_path):
    with run_lock.hold(tmp_path / "a.csv", "features_output"):
        pass
    with run_lock.hold(tmp_path / "a.csv", "features_output"):
        with pytest.raises(UserError, match=f"in use by another run \\(process {os.getpid()}\\)"):
            with run_lock.hold(tmp_path / "a.csv", "features_output"):
                pass
    assert os.listdir(tmp_path) == []  # the lock file goes with the run that ends
