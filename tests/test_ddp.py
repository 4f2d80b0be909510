"""Training in two CPU processes (DistributedDataParallel over gloo), started by torchrun or by launch()."""
import csv
import math
import socket
import subprocess
import sys

import pytest
from PIL import Image

import training_engine
from cli import load_config
from conftest import REPO, script_env, tile_array

LOSS_LINE = "Epoch {}/{}, Average Loss:"


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp_tiles")
    for index in range(10):
        Image.fromarray(tile_array(index, 32)).save(folder / f"tile_{index}.png")
    return folder


def settings(tiles, out, epochs, *extra):
    """8 training tiles (2 held out for validation), batch 4 = 2 per process: two steps an epoch."""
    return [f"--folder_path_train={tiles}", "--tile_size=32", "--batch_size_train=4", f"--num_epochs={epochs}",
            "--save_interval=1", "--num_workers=0", "--GPUs=cpu", "--augment=false", "--val_fraction=0.25",
            f"--model_saved_location_mse={out / 'checkpoints'}", f"--training_loss_file_mse={out / 'logs' / 'loss.csv'}",
            *extra]


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(command, cwd):
    env = script_env()
    env["PYTHONPATH"] = str(REPO)  # launch() re-imports training_engine in each spawned process
    result = subprocess.run(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result


def torchrun(tiles, out, epochs, *extra):
    return run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                str(REPO / "Training_MSE.py"), *settings(tiles, out, epochs, *extra)], out)


def launched(tiles, out, epochs, *extra):
    code = ("import sys, training_engine; "
            "training_engine.run_main(lambda: training_engine.launch('mse', sys.argv[1:], processes=2))")
    return run([sys.executable, "-c", code, *settings(tiles, out, epochs, *extra)], out)


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def files(out):
    return sorted(str(path.relative_to(out)) for path in out.rglob("*") if path.is_file())


@pytest.fixture(scope="module")
def single(tiles, tmp_path_factory):
    """The files of the same 2-epoch run in one process."""
    out = tmp_path_factory.mktemp("single")
    training_engine.train(load_config(settings(tiles, out, 2)), "mse")
    return files(out)


def assert_two_process_run(result, out, epochs, single_files):
    for epoch in range(1, epochs + 1):
        assert result.stdout.count(LOSS_LINE.format(epoch, epochs)) == 1, result.stdout
    assert result.stdout.count("Training on 8 tiles (2 more for validation)") == 1
    assert "x 2 processes" in result.stdout
    assert files(out) == single_files
    rows = read_rows(out / "logs" / "loss.csv")
    assert [int(row["Epoch"]) for row in rows] == list(range(1, epochs + 1))
    for row in rows:
        assert math.isfinite(float(row["Loss"])) and 0 < float(row["Loss"]) < 1
        assert 0 < float(row["Val_MSE"]) < 1
    return rows


def test_torchrun_trains_and_resumes(tiles, single, tmp_path):
    first = torchrun(tiles, tmp_path, 2)
    before = assert_two_process_run(first, tmp_path, 2, single)

    resumed = torchrun(tiles, tmp_path, 3)
    assert resumed.stdout.count("Resuming from") == 1 and "Model_AE_epoch_002.pth (epoch 2)" in resumed.stdout
    assert resumed.stdout.count(LOSS_LINE.format(3, 3)) == 1
    assert "Epoch 1/3" not in resumed.stdout and "Epoch 2/3" not in resumed.stdout
    rows = read_rows(tmp_path / "logs" / "loss.csv")
    assert [int(row["Epoch"]) for row in rows] == [1, 2, 3]
    assert rows[:2] == before
    assert (tmp_path / "checkpoints" / "Model_AE_epoch_003.pth").is_file()


def test_launch_with_sync_batchnorm(tiles, single, tmp_path):
    result = launched(tiles, tmp_path, 2, "--sync_batchnorm=true")
    assert "Starting 2 training processes" in result.stdout
    assert result.stdout.count("sync_batchnorm ignored") == 1
    assert_two_process_run(result, tmp_path, 2, single)
