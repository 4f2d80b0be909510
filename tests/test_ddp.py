"""Training in two CPU processes (DistributedDataParallel over gloo), started by torchrun or by cli.launch_training()."""
import csv
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from PIL import Image

import torch

from core import training_engine
from core import training_state
from core.cli import load_config
from conftest import REPO, script_env, tile_array

LOSS_LINE = "Epoch {}/{}, Average Loss:"


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp_tiles")
    for index in range(18):
        Image.fromarray(tile_array(index, 32)).save(folder / f"tile_{index}.png")
    return folder


def settings(tiles, out, epochs, *extra):
    """14 training tiles (4 held out for validation), batch 4 = 2 per process: three steps an epoch."""
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
    env["PYTHONPATH"] = str(REPO)  # launch_training() re-imports the engine in each spawned process
    result = subprocess.run(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result


def torchrun(tiles, out, epochs, *extra):
    return run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                str(REPO / "Training_MSE.py"), *settings(tiles, out, epochs, *extra)], out)


def launched(tiles, out, epochs, *extra):
    code = ("import sys; from core import cli; "
            "cli.run_main(lambda: cli.launch_training('mse', sys.argv[1:], processes=2))")
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
    yield files(out)
    shutil.rmtree(out)  # its checkpoints: not kept past the module, even when a test of the session fails


def assert_two_process_run(result, out, epochs, single_files):
    for epoch in range(1, epochs + 1):
        assert result.stdout.count(LOSS_LINE.format(epoch, epochs)) == 1, result.stdout
    assert result.stdout.count("Training on 14 tiles (4 more for validation)") == 1
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


@pytest.fixture(scope="module")
def launched_run(tiles, tmp_path_factory):
    """An uninterrupted 2-epoch run in two processes started by cli.launch_training(), with augmentation (sync_batchnorm
    has no effect on the CPU): (folder, CompletedProcess)."""
    out = tmp_path_factory.mktemp("launched")
    yield out, launched(tiles, out, 2, "--sync_batchnorm=true", "--augment=true")
    shutil.rmtree(out)


def test_launch_with_sync_batchnorm(launched_run, single):
    out, result = launched_run
    assert "Starting 2 training processes" in result.stdout
    assert result.stdout.count("sync_batchnorm ignored") == 1
    assert_two_process_run(result, out, 2, single)


# A launcher whose training steps are slow (0.3 s more each), so that a signal lands in the middle of an epoch:
# spawned processes import this file as their __main__ too, so they get the slow loss as well.
SLOW_LAUNCHER = """
import sys, time
from core import losses
real = losses.LOSSES["mse"]
def slow(output, target):
    time.sleep(0.3)
    return real(output, target)
losses.LOSSES["mse"] = slow
from core import cli
if __name__ == "__main__":
    cli.run_main(lambda: cli.launch_training("mse", sys.argv[1:], processes=2))
"""


def test_sigterm_to_the_process_group_stops_both_processes_and_resumes_exactly(tiles, launched_run, tmp_path):
    reference, _ = launched_run
    launcher = tmp_path / "slow_launcher.py"
    launcher.write_text(SLOW_LAUNCHER)
    log = tmp_path / "interrupted.log"
    env = dict(script_env(), PYTHONPATH=str(REPO))
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, str(launcher),
                                    *settings(tiles, tmp_path, 2, "--augment=true", "--num_workers=1")],
                                   cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=handle,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        mid_epoch_2 = re.compile(r"Epoch 2/2:[^\r\n|]*\|[^\r\n|]*\| *1/3\b")
        deadline = time.monotonic() + 180
        while not mid_epoch_2.search(log.read_text(errors="replace")):
            assert process.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, "timed out waiting for a step of epoch 2"
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGTERM)  # as a scheduler does: launcher, training and loader processes
        assert process.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text(errors="replace")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    output = log.read_text(errors="replace")
    assert "Traceback" not in output and "exited unexpectedly" not in output
    state = torch.load(tmp_path / "checkpoints" / training_state.INTERRUPT_NAME, weights_only=True)
    step = state["step"]  # the step running when the signal came: normally 2 of 3
    assert state["epoch"] == 2 and 0 < step < 3 and state["world"] == 2
    assert output.count(f"Interrupted at epoch 2, step {step}") == 1
    assert not torch.equal(*state["aug_rng_states"]), "each process's own augmentation state"
    assert state["rank_loss_counts"] == [2 * step, 2 * step] and state["loss_count"] == 4 * step

    resumed = launched(tiles, tmp_path, 2, "--augment=true")
    assert f"(epoch 2, after step {step})" in resumed.stdout and "Epoch 1/2" not in resumed.stdout
    without_seconds = [{k: v for k, v in row.items() if k != "Seconds"}
                       for row in read_rows(tmp_path / "logs" / "loss.csv")]
    assert without_seconds == [{k: v for k, v in row.items() if k != "Seconds"}
                               for row in read_rows(reference / "logs" / "loss.csv")]
    final, expected = (torch.load(out / "checkpoints" / "Final_Model_AE_MSE.pth", weights_only=True)
                       for out in (tmp_path, reference))
    assert all(torch.equal(final[key], expected[key]) for key in expected)
