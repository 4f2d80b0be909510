"""Training_MSE.py / Training_SSIM.py run as a user runs them, on a few tiny generated tiles."""
import csv
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from core import losses
from core import training_engine
from core import training_state
from Auto_encoder import AutoEncoder
from core.cli import load_config
from conftest import REPO, run_repo_script, script_env, tile_array

TILE_NAMES = [f"slide{i // 4}/tile_{i}.png" for i in range(6)] + ["extra/deeper/tile_6.jpg", "tile_7.png"]
CHECKPOINT_KEYS = {"epoch", "model_state_dict", "optimizer_state_dict", "loss"}


def settings(tiles, out, loss, epochs, *extra):
    return [f"--folder_path_train={tiles}", "--tile_size=64", "--batch_size_train=4", f"--num_epochs={epochs}",
            "--save_interval=1", "--num_workers=0", "--GPUs=cpu",
            f"--model_saved_location_{loss}={out / 'checkpoints' / loss.upper()}",
            f"--training_loss_file_{loss}={out / 'logs' / f'training_loss_{loss}.csv'}", *extra]


def paths(out, loss):
    return {"checkpoints": out / "checkpoints" / loss.upper(), "csv": out / "logs" / f"training_loss_{loss}.csv",
            "plot": out / "logs" / f"training_loss_{loss}.png",
            "final": out / "checkpoints" / loss.upper() / f"Final_Model_AE_{loss.upper()}.pth"}


def read_csv(path):
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], [dict(zip(rows[0], row)) for row in rows[1:]]


def assert_succeeded(result):
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    folder = tmp_path_factory.mktemp("training_tiles")
    for index, name in enumerate(TILE_NAMES):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(tile_array(index, 80)).save(folder / name, quality=95)  # 80: resized to tile_size
    return folder


def two_epoch_run(loss, tiles, tmp_path_factory):
    """A 2-epoch run of Training_<LOSS>.py in a fresh working folder: (loss, folder, CompletedProcess)."""
    out = tmp_path_factory.mktemp(f"run_{loss}")
    result = run_repo_script(f"Training_{loss.upper()}.py", *settings(tiles, out, loss, 2), cwd=out)
    assert_succeeded(result)
    return loss, out, result


@pytest.fixture(scope="module")
def mse_run(tiles, tmp_path_factory):
    return two_epoch_run("mse", tiles, tmp_path_factory)


@pytest.fixture(scope="module")
def ssim_run(tiles, tmp_path_factory):
    return two_epoch_run("ssim", tiles, tmp_path_factory)


@pytest.fixture(params=["mse", "ssim"])
def trained(request):
    return request.getfixturevalue(f"{request.param}_run")


def test_prints_average_loss_per_epoch(trained):
    loss, _, result = trained
    assert "Epoch 1/2, Average Loss:" in result.stdout
    assert "Epoch 2/2, Average Loss:" in result.stdout
    assert "Resuming" not in result.stdout


def test_loss_log_csv(trained):
    loss, out, result = trained
    header, rows = read_csv(paths(out, loss)["csv"])
    assert header[:2] == ["Epoch", "Loss"]
    assert [int(row["Epoch"]) for row in rows] == [1, 2]
    for row in rows:
        value = float(row["Loss"])
        assert math.isfinite(value) and 0 < value < (1 if loss == "mse" else 2)
        assert f"Epoch {row['Epoch']}/2, Average Loss: {row['Loss']}" in result.stdout


def test_loss_curve_png_beside_csv(trained):
    loss, out, _ = trained
    with Image.open(paths(out, loss)["plot"]) as image:
        image.verify()
    with Image.open(paths(out, loss)["plot"]) as image:
        assert image.format == "PNG" and min(image.size) > 100


def test_epoch_checkpoints(trained):
    loss, out, _ = trained
    _, rows = read_csv(paths(out, loss)["csv"])
    reference_keys = list(AutoEncoder().state_dict())
    for epoch in (1, 2):
        state = torch.load(paths(out, loss)["checkpoints"] / f"Model_AE_epoch_{epoch:03d}.pth", weights_only=True)
        assert CHECKPOINT_KEYS <= set(state)
        assert state["epoch"] == epoch
        assert list(state["model_state_dict"]) == reference_keys
        assert state["optimizer_state_dict"]["state"], "optimizer moments are saved for resuming"
        assert state["loss"] == pytest.approx(float(rows[epoch - 1]["Loss"]), abs=1e-6)
    assert not (paths(out, loss)["checkpoints"] / "Model_AE_epoch_003.pth").exists()


def test_final_model_loads_and_is_the_last_epoch(trained):
    loss, out, _ = trained
    final = torch.load(paths(out, loss)["final"], weights_only=True)
    model = AutoEncoder()
    model.load_state_dict(final, strict=True)
    last = torch.load(paths(out, loss)["checkpoints"] / "Model_AE_epoch_002.pth", weights_only=True)
    for key, value in last["model_state_dict"].items():
        assert torch.equal(final[key], value), key
    first = torch.load(paths(out, loss)["checkpoints"] / "Model_AE_epoch_001.pth", weights_only=True)
    assert not torch.equal(first["model_state_dict"]["encoder.0.weight"], final["encoder.0.weight"])
    with torch.no_grad():
        output = model.eval()(torch.rand(1, 3, 64, 64))
    assert output.shape == (1, 3, 64, 64) and 0 <= output.min() and output.max() <= 1


def test_nothing_written_outside_the_given_paths(trained):
    _, out, _ = trained
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "logs"]


@pytest.fixture
def resumable(mse_run, tmp_path):
    """A copy of the finished 2-epoch MSE run (hard links: the engine replaces files, never rewrites them)."""
    _, out, _ = mse_run
    shutil.copytree(out, tmp_path / "run", copy_function=os.link)
    return tmp_path / "run"


def test_resume_continues_with_the_next_epoch(resumable, tiles, run_script):
    result = run_script("Training_MSE.py", *settings(tiles, resumable, "mse", 3), cwd=resumable)
    assert_succeeded(result)
    assert "Resuming from" in result.stdout and "Model_AE_epoch_002.pth" in result.stdout
    assert "Epoch 3/3, Average Loss:" in result.stdout
    assert "Epoch 1/3" not in result.stdout and "Epoch 2/3" not in result.stdout
    _, rows = read_csv(paths(resumable, "mse")["csv"])
    assert [int(row["Epoch"]) for row in rows] == [1, 2, 3]
    state = torch.load(paths(resumable, "mse")["checkpoints"] / "Model_AE_epoch_003.pth", weights_only=True)
    assert state["epoch"] == 3 and state["loss"] == pytest.approx(float(rows[2]["Loss"]), abs=1e-6)

    again = run_script("Training_MSE.py", *settings(tiles, resumable, "mse", 3), cwd=resumable)
    assert_succeeded(again)
    assert "Average Loss" not in again.stdout
    assert [int(row["Epoch"]) for row in read_csv(paths(resumable, "mse")["csv"])[1]] == [1, 2, 3]


def test_resume_false_starts_again_at_epoch_1(resumable, tiles, run_script):
    result = run_script("Training_MSE.py", *settings(tiles, resumable, "mse", 1, "--resume=false"), cwd=resumable)
    assert_succeeded(result)
    assert "Resuming" not in result.stdout
    assert "Epoch 1/1, Average Loss:" in result.stdout
    _, rows = read_csv(paths(resumable, "mse")["csv"])
    assert [int(row["Epoch"]) for row in rows] == [1]
    assert torch.load(paths(resumable, "mse")["checkpoints"] / "Model_AE_epoch_001.pth",
                      weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("augment", [True, False])
def test_train_crop_size_in_process(tiles, tmp_path, monkeypatch, augment):
    shapes = []
    mse = losses.LOSSES["mse"]

    def recording_loss(output, target):
        shapes.append((tuple(output.shape), tuple(target.shape)))
        return mse(output, target)

    monkeypatch.setitem(losses.LOSSES, "mse", recording_loss)
    cfg = load_config(settings(tiles, tmp_path, "mse", 1, "--train_crop_size=32", f"--augment={augment}"))
    history = training_engine.train(cfg, "mse")
    assert [int(row["Epoch"]) for row in history] == [1]
    assert shapes and all(out == target and out[0] <= 4 and out[1:] == (3, 32, 32) for out, target in shapes)
    model = AutoEncoder()
    model.load_state_dict(torch.load(paths(tmp_path, "mse")["final"], weights_only=True), strict=True)
    assert float(history[0]["Loss"]) == pytest.approx(
        torch.load(paths(tmp_path, "mse")["checkpoints"] / "Model_AE_epoch_001.pth", weights_only=True)["loss"],
        abs=1e-6)


def test_cosine_schedule_ends_at_one_percent():
    cfg = load_config(["--lr_schedule=cosine", "--num_epochs=5", "--learning_rate=0.01"])
    rates = [training_engine.learning_rate(cfg, epoch) for epoch in range(1, 6)]
    assert rates[0] == pytest.approx(0.01) and rates[-1] == pytest.approx(1e-4)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    constant = load_config(["--num_epochs=5", "--learning_rate=0.01", "--lr_schedule=constant"])
    assert {training_engine.learning_rate(constant, epoch) for epoch in range(1, 6)} == {0.01}


def test_latest_checkpoint_is_the_highest_epoch(tmp_path):
    for name in ("Model_AE_epoch_002.pth", "Model_AE_epoch_010.pth", "Model_AE_epoch_009.pth", "Final_Model_AE_MSE.pth",
                 "Model_AE_epoch_011.pth.tmp"):
        (tmp_path / name).write_bytes(b"")
    assert training_state.latest_checkpoint(str(tmp_path)) == (10, str(tmp_path / "Model_AE_epoch_010.pth"))
    assert training_state.latest_checkpoint(str(tmp_path / "none")) is None


def test_training_piped_into_head_keeps_training(tiles, tmp_path):
    """python Training_MSE.py ... | head -1: the reader leaves after one line; training carries on to the end."""
    process = subprocess.Popen([sys.executable, str(REPO / "Training_MSE.py"), *settings(tiles, tmp_path, "mse", 2)],
                               cwd=tmp_path, env=script_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    assert process.stdout.readline().startswith((b"Caching the decoded tiles", b"Training on 7 tiles"))
    process.stdout.close()
    stderr = process.stderr.read().decode(errors="replace")
    assert process.wait(timeout=300) == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr
    assert paths(tmp_path, "mse")["final"].is_file()
    assert [int(row["Epoch"]) for row in read_csv(paths(tmp_path, "mse")["csv"])[1]] == [1, 2]


def test_tile_cache_gives_the_same_training(tiles, tmp_path, capsys, monkeypatch):
    """cache_tiles only changes where decoded tiles come from: the loss log is the same with and without it,
    and with it every file is decoded once: the first epoch's tiles as it reads them, the rest (here the
    tiles of the incomplete last batch) before the second epoch."""
    import Dataset
    reads, real = [], Dataset.load_image
    monkeypatch.setattr(Dataset, "load_image", lambda path, size: (reads.append(path), real(path, size))[1])
    histories, counts = {}, {}
    for cache in ("true", "false"):
        reads.clear()
        cfg = load_config(settings(tiles, tmp_path / cache, "mse", 3, f"--cache_tiles={cache}"))
        histories[cache] = [row["Loss"] for row in training_engine.train(cfg, "mse")]
        counts[cache] = {path: reads.count(path) for path in set(reads)}
        said = capsys.readouterr().out
        assert ("Caching the decoded tiles in memory" in said) == (cache == "true"), said
    assert histories["true"] == histories["false"] and len(histories["true"]) == 3
    assert len(counts["true"]) == len(TILE_NAMES) and set(counts["true"].values()) == {1}
    assert max(counts["false"].values()) == 3  # without the cache the files are read every epoch
