"""Training never loses work: exact resume, kill -9, Ctrl-C / SIGTERM, a non-finite loss, the validation split."""
import csv
import errno
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from core import checkpoint_io
from core import loss_log
from core import losses
from core import metrics
from core import training_data
from core import training_engine
from core import training_state
from Auto_encoder import AutoEncoder
from Dataset import ImageFolder
from core.errors import UserError
from core.cli import load_config
from conftest import REPO, run_repo_script, script_env, tile_array

LONG_EPOCH_STEPS = 10  # long_tiles / batch 2: long enough to land a signal in the middle of an epoch


def make_folder(folder, count, size):
    folder.mkdir(parents=True)
    for index in range(count):
        Image.fromarray(tile_array(index, size)).save(folder / f"tile_{index:02d}.png")
    return folder


@pytest.fixture(scope="module")
def small_tiles(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("small") / "tiles", 10, 64)


@pytest.fixture(scope="module")
def long_tiles(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("long") / "tiles", 2 * LONG_EPOCH_STEPS, 32)


def settings(tiles, out, epochs, *extra):
    """Command-line settings of a small CPU run writing under out; later arguments override earlier ones."""
    return [f"--folder_path_train={tiles}", "--tile_size=32", "--batch_size_train=4", f"--num_epochs={epochs}",
            "--save_interval=100", "--num_workers=0", "--GPUs=cpu", "--augment=false", "--val_fraction=0",
            f"--model_saved_location_mse={out / 'checkpoints'}", f"--training_loss_file_mse={out / 'loss.csv'}",
            *extra]


def long_settings(tiles, out, epochs, *extra):
    return settings(tiles, out, epochs, "--batch_size_train=2", *extra)


def train(tiles, out, epochs, *extra):
    return training_engine.train(load_config(settings(tiles, out, epochs, *extra)), "mse")


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def without_seconds(rows):
    return [{key: value for key, value in row.items() if key != "Seconds"} for row in rows]


def epochs_of(rows):
    return [int(row["Epoch"]) for row in rows]


def weights(path):
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state["model_state_dict"] if "model_state_dict" in state else state


def assert_same_weights(a, b):
    assert list(a) == list(b)
    differing = [key for key in a if not torch.equal(a[key], b[key])]
    assert not differing, f"{len(differing)} tensors differ, first {differing[0]}"


def final(out):
    return weights(out / "checkpoints" / "Final_Model_AE_MSE.pth")


def file_bytes(folder):
    """Every file under folder (temporary ones included) and its bytes."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture
def start_training():
    """start_training(args, cwd, log) runs Training_MSE.py in the background, stdout and stderr into log,
    and kills it when the test ends if it is still running. SIGINT is restored to its default so Python
    turns it into KeyboardInterrupt even when the test runner was started with SIGINT ignored."""
    processes = []

    def start(args, cwd, log):
        with open(log, "w") as handle:
            processes.append(subprocess.Popen(
                [sys.executable, str(REPO / "Training_MSE.py"), *args], cwd=cwd, env=script_env(),
                stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                preexec_fn=lambda: (os.setpgrp(), signal.signal(signal.SIGINT, signal.SIG_DFL))))
        return processes[-1]

    yield start
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # its own process group: loader workers included
            process.wait()


def wait_until(condition, process, what, timeout=180):
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"training ended (exit code {process.returncode}) before {what}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def resume_in_process(args, capsys):
    """The interrupted command's settings, rerun in this process (a fresh interpreter only adds the torch
    import): (stdout, CSV rows)."""
    capsys.readouterr()
    cfg = load_config(args)
    training_engine.train(cfg, "mse")
    return capsys.readouterr().out, read_rows(cfg.training_loss_file_mse)


@pytest.fixture(scope="module")
def uninterrupted(long_tiles, tmp_path_factory):
    """A 4-epoch run on long_tiles that nothing stopped: (folder, CSV rows)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    training_engine.train(load_config(long_settings(long_tiles, out, 4, "--save_interval=1")), "mse")
    return out, read_rows(out / "loss.csv")


@pytest.mark.parametrize("extra", [[], ["--augment=true", "--tile_size=64", "--train_crop_size=32",
                                         "--val_fraction=0.25"], ["--mixed_precision=off"], ["--mixed_precision=bf16"]],
                         ids=["plain", "augment-crop-validation", "fp32", "bf16"])
def test_resume_is_exact(small_tiles, tmp_path, capsys, extra):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(small_tiles, straight, 4, "--save_interval=2", *extra)
    if extra and extra[0].startswith("--mixed_precision"):
        precision = "fp32" if extra[0].endswith("off") else "bf16"
        assert f"in {precision}, MSE loss" in capsys.readouterr().out
        state = torch.load(straight / "checkpoints" / "Model_AE_epoch_002.pth", weights_only=True)
        assert all(v.dtype == torch.float32 for v in state["model_state_dict"].values() if v.is_floating_point())
    assert epochs_of(train(small_tiles, split, 2, "--save_interval=2", *extra)) == [1, 2]
    capsys.readouterr()
    train(small_tiles, split, 4, "--save_interval=2", *extra)
    out = capsys.readouterr().out
    assert "Resuming from" in out and "Model_AE_epoch_002.pth (epoch 2)" in out
    assert "Epoch 1/4" not in out and "Epoch 2/4" not in out

    assert_same_weights(final(straight), final(split))
    straight_rows, split_rows = read_rows(straight / "loss.csv"), read_rows(split / "loss.csv")
    assert epochs_of(split_rows) == [1, 2, 3, 4]
    assert without_seconds(split_rows) == without_seconds(straight_rows)
    for name in ("Model_AE_epoch_002.pth", "Model_AE_epoch_004.pth"):
        a, b = (torch.load(run / "checkpoints" / name, weights_only=True) for run in (straight, split))
        assert_same_weights(a["model_state_dict"], b["model_state_dict"])
        assert a["optimizer_state_dict"]["state"][0]["step"] == b["optimizer_state_dict"]["state"][0]["step"]
    if "--val_fraction=0.25" in extra:
        assert all(row["Val_MSE"] for row in split_rows)
        assert_same_weights(weights(straight / "checkpoints" / "Best_Model_AE_MSE.pth"),
                            weights(split / "checkpoints" / "Best_Model_AE_MSE.pth"))


def test_resume_after_kill_9(long_tiles, uninterrupted, tmp_path, capsys, start_training):
    reference, reference_rows = uninterrupted
    args = long_settings(long_tiles, tmp_path, 4, "--save_interval=1")
    checkpoints = tmp_path / "checkpoints"
    process = start_training(args, tmp_path, tmp_path / "killed.log")
    wait_until(lambda: (checkpoints / "Model_AE_epoch_002.pth").exists(), process, "Model_AE_epoch_002.pth")
    process.kill()
    assert process.wait(timeout=60) == -signal.SIGKILL

    latest_epoch, latest_path = training_state.latest_checkpoint(str(checkpoints))
    assert 2 <= latest_epoch < 4
    assert torch.load(latest_path, weights_only=True)["epoch"] == latest_epoch
    # The loss log is written just after each checkpoint, so it may be one epoch behind it.
    assert epochs_of(read_rows(tmp_path / "loss.csv")) in ([*range(1, latest_epoch + 1)], [*range(1, latest_epoch)])
    assert not (checkpoints / "Final_Model_AE_MSE.pth").exists()

    out, rows = resume_in_process(args, capsys)
    assert f"Resuming from {latest_path} (epoch {latest_epoch})" in out
    assert epochs_of(rows) == [1, 2, 3, 4]
    assert without_seconds(rows) == without_seconds(reference_rows)
    assert_same_weights(final(tmp_path), final(reference))


@pytest.mark.parametrize("sig, times, group, workers", [(signal.SIGINT, 1, False, 0), (signal.SIGTERM, 2, True, 2)],
                         ids=["SIGINT", "SIGTERM-twice-to-the-group-with-loader-workers"])
def test_interrupt_checkpoint_and_exact_resume(long_tiles, uninterrupted, tmp_path, capsys, start_training, sig, times,
                                               group, workers):
    """Ctrl-C, or a scheduler's SIGTERM to the whole process group (loader workers included), once or twice:
    the step finishes, the interrupt checkpoint is written and the same command resumes exactly."""
    reference, reference_rows = uninterrupted
    args = long_settings(long_tiles, tmp_path, 2)  # save_interval 100: only the interrupt checkpoint saves work
    checkpoints, log = tmp_path / "checkpoints", tmp_path / "interrupted.log"
    process = start_training([*args, f"--num_workers={workers}"], tmp_path, log)
    mid_epoch_2 = re.compile(rf"Epoch 2/2:[^\r\n|]*\|[^\r\n|]*\| *[1-9]\d*/{LONG_EPOCH_STEPS}\b")
    wait_until(lambda: mid_epoch_2.search(log.read_text(errors="replace")), process, "a step of epoch 2")
    for _ in range(times):
        if group:
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)
    assert process.wait(timeout=120) == 128 + sig, log.read_text(errors="replace")
    output = log.read_text(errors="replace")
    assert "Traceback" not in output and "exited unexpectedly" not in output

    state = torch.load(checkpoints / training_state.INTERRUPT_NAME, weights_only=True)
    assert {"epoch", "step", "model_state_dict", "optimizer_state_dict"} <= set(state)
    assert state["epoch"] == 2 and 0 < state["step"] < LONG_EPOCH_STEPS
    assert f"Interrupted at epoch 2, step {state['step']}" in output
    assert not re.search(r"(^|[\r\n])interrupted\s*$", output), output[-300:]  # the message is the last line
    assert training_state.latest_checkpoint(str(checkpoints)) is None
    assert epochs_of(read_rows(tmp_path / "loss.csv")) == [1]

    out, rows = resume_in_process(args, capsys)
    assert f"(epoch 2, after step {state['step']})" in out
    assert "Epoch 1/2" not in out
    assert without_seconds(rows) == without_seconds(reference_rows[:2])
    assert_same_weights(final(tmp_path), weights(reference / "checkpoints" / "Model_AE_epoch_002.pth"))
    assert not (checkpoints / training_state.INTERRUPT_NAME).exists()


def test_signal_in_the_middle_of_a_step_waits_for_the_step(small_tiles, tmp_path, monkeypatch):
    """The forward pass has already moved BatchNorm statistics when the signal lands: stopping there would
    checkpoint half a step, and the resumed run would differ from an uninterrupted one."""
    train(small_tiles, tmp_path / "reference", 2)
    real, calls = losses.LOSSES["mse"], []

    def signalled_at_third_step(output, target):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGTERM)
        return real(output, target)

    def unhandled(signum, frame):
        pytest.fail("training did not handle SIGTERM")

    previous = signal.signal(signal.SIGTERM, unhandled)  # never let the test runner itself be terminated
    try:
        with monkeypatch.context() as patch:
            patch.setitem(losses.LOSSES, "mse", signalled_at_third_step)
            with pytest.raises(KeyboardInterrupt):
                train(small_tiles, tmp_path / "run", 2)
    finally:
        signal.signal(signal.SIGTERM, previous)
    state = torch.load(tmp_path / "run" / "checkpoints" / training_state.INTERRUPT_NAME, weights_only=True)
    assert (state["epoch"], state["step"]) == (2, 1)

    train(small_tiles, tmp_path / "run", 2)
    rows = read_rows(tmp_path / "run" / "loss.csv")
    assert without_seconds(rows) == without_seconds(read_rows(tmp_path / "reference" / "loss.csv"))
    assert_same_weights(final(tmp_path / "run"), final(tmp_path / "reference"))


WRAP_UP = ("--val_fraction=0.25", "--save_interval=100")  # only an interrupt checkpoint can keep unsaved epochs


@pytest.fixture(scope="module")
def wrapped_up(small_tiles, tmp_path_factory):
    out = tmp_path_factory.mktemp("wrapped_up")
    train(small_tiles, out, 3, *WRAP_UP)
    return out


@pytest.mark.parametrize("where, epoch", [("validation", 2), ("best model", 1), ("loss curve", 1)])
def test_interrupt_while_an_epoch_is_wrapped_up_keeps_it(small_tiles, wrapped_up, tmp_path, monkeypatch, where,
                                                         epoch):
    """Ctrl-C after an epoch's last step, while it is validated, its best model saved or its curve drawn."""
    best_path = str(tmp_path / "checkpoints" / "Best_Model_AE_MSE.pth")
    module, name = {"validation": (training_engine, "validation_metrics"), "best model": (checkpoint_io, "save"),
                    "loss curve": (loss_log, "plot_history")}[where]
    real, calls = getattr(module, name), []

    def interrupted(*args):
        if where != "best model" or args[1] == best_path:
            calls.append(1)
            if len(calls) == epoch:
                raise KeyboardInterrupt
        return real(*args)

    with monkeypatch.context() as patch:
        patch.setattr(module, name, interrupted)
        with pytest.raises(KeyboardInterrupt):
            train(small_tiles, tmp_path, 3, *WRAP_UP)
    state = torch.load(tmp_path / "checkpoints" / training_state.INTERRUPT_NAME, weights_only=True)
    assert state["epoch"] == epoch

    train(small_tiles, tmp_path, 3, *WRAP_UP)
    assert without_seconds(read_rows(tmp_path / "loss.csv")) == without_seconds(read_rows(wrapped_up / "loss.csv"))
    assert_same_weights(final(tmp_path), final(wrapped_up))
    assert_same_weights(weights(best_path), weights(wrapped_up / "checkpoints" / "Best_Model_AE_MSE.pth"))


def nan_loss_at_step(step, monkeypatch):
    """Make the MSE loss NaN at its step-th call from now on; returns the list that counts the calls."""
    real, calls = losses.LOSSES["mse"], []

    def nan_at_step(output, target):
        calls.append(1)
        loss = real(output, target)
        return loss * math.nan if len(calls) == step else loss

    monkeypatch.setitem(losses.LOSSES, "mse", nan_at_step)
    return calls


def test_non_finite_loss_stops_and_keeps_checkpoints(small_tiles, tmp_path, monkeypatch):
    train(small_tiles, tmp_path, 1, "--save_interval=1")
    checkpoints = tmp_path / "checkpoints"
    before = file_bytes(checkpoints)
    nan_loss_at_step(3, monkeypatch)
    # 8 training tiles, batch 4: epoch 2 is steps 1-2 of this run, so the third is epoch 3, step 1.
    with pytest.raises(UserError, match=r"loss became nan at epoch 3, step 1\b"):
        train(small_tiles, tmp_path, 3, "--save_interval=1")

    after = file_bytes(checkpoints)
    assert sorted(after) == sorted([*before, "Model_AE_epoch_002.pth"])
    assert all(after[name] == data for name, data in before.items())
    epoch_2 = torch.load(checkpoints / "Model_AE_epoch_002.pth", weights_only=True)
    assert all(torch.isfinite(value).all() for value in epoch_2["model_state_dict"].values())
    assert epochs_of(read_rows(tmp_path / "loss.csv")) == [1, 2]


def test_non_finite_loss_exits_2_with_one_error_line(small_tiles, tmp_path):
    """A run that diverges (an absurd learning rate) stops with one error line, exit 2, and saves no model."""
    result = run_repo_script("Training_MSE.py", *settings(small_tiles, tmp_path, 3, "--learning_rate=1e30",
                                                          "--finite_check_interval=1"), cwd=tmp_path)
    assert result.returncode == 2, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    assert re.search(r"error: the (loss became (nan|inf)|model's weights became non-finite) at epoch 1", errors[0]), errors
    assert not list((tmp_path / "checkpoints").glob("*.pth"))


def test_validation_split_metrics_and_best_model(small_tiles, tmp_path, monkeypatch):
    real, targets = losses.LOSSES["mse"], []

    def recording_loss(output, target):
        targets.extend(target.detach().clone())
        return real(output, target)

    monkeypatch.setitem(losses.LOSSES, "mse", recording_loss)
    # fp32, so that the logged validation metrics can be recomputed exactly from the checkpoints below.
    train(small_tiles, tmp_path, 3, "--val_fraction=0.25", "--save_interval=1", "--mixed_precision=off")
    rows = read_rows(tmp_path / "loss.csv")
    assert epochs_of(rows) == [1, 2, 3]

    dataset = ImageFolder(str(small_tiles), 32)
    train_idx, val_idx = training_data.split_indices(len(dataset), 0.25, 0)
    tiles = [dataset[i]["image"].float().div(255.0) for i in range(len(dataset))]
    used = set()
    for target in targets:  # augment=false, no crop: each training target is a whole tile
        matches = [i for i, tile in enumerate(tiles) if torch.equal(target, tile)]
        assert len(matches) == 1
        used.add(matches[0])
    assert used == set(train_idx)

    originals = torch.stack([tiles[i] for i in val_idx])
    model = AutoEncoder().eval()
    for row in rows:
        assert 0 < float(row["Val_MSE"]) < 1 and 0 < float(row["Val_PSNR"]) < 100
        assert -1 <= float(row["Val_SSIM"]) <= 1
        model.load_state_dict(weights(tmp_path / "checkpoints" / f"Model_AE_epoch_{int(row['Epoch']):03d}.pth"))
        with torch.no_grad():
            values = metrics.per_image(model(originals).clamp(0, 1), originals)
        assert float(row["Val_MSE"]) == pytest.approx(values["MSE"].mean().item(), abs=2e-6)
        assert float(row["Val_PSNR"]) == pytest.approx(values["PSNR"].mean().item(), abs=1e-4)
        assert float(row["Val_SSIM"]) == pytest.approx(values["SSIM"].mean().item(), abs=2e-6)

    val_mse = [float(row["Val_MSE"]) for row in rows]
    best_epoch = val_mse.index(min(val_mse)) + 1
    best = weights(tmp_path / "checkpoints" / "Best_Model_AE_MSE.pth")
    AutoEncoder().load_state_dict(best, strict=True)
    for epoch in (1, 2, 3):
        epoch_weights = weights(tmp_path / "checkpoints" / f"Model_AE_epoch_{epoch:03d}.pth")
        same = all(torch.equal(best[key], epoch_weights[key]) for key in best)
        assert same == (epoch == best_epoch), f"Best_Model_AE_MSE.pth vs epoch {epoch}, best epoch {best_epoch}"


def test_no_validation_leaves_columns_empty_and_no_best_model(small_tiles, tmp_path, capsys):
    train(small_tiles, tmp_path, 1)
    with open(tmp_path / "loss.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert {"Val_MSE", "Val_PSNR", "Val_SSIM"} <= set(header)
    rows = read_rows(tmp_path / "loss.csv")
    assert epochs_of(rows) == [1]
    assert all(row[key] == "" for row in rows for key in ("Val_MSE", "Val_PSNR", "Val_SSIM"))
    assert not (tmp_path / "checkpoints" / "Best_Model_AE_MSE.pth").exists()
    out = capsys.readouterr().out
    assert "Best_Model" not in out and "Validation" not in out and "(0 more for validation)" in out


def test_split_indices_deterministic_and_disjoint():
    train_idx, val_idx = training_data.split_indices(100, 0.2, seed=3)
    assert (train_idx, val_idx) == training_data.split_indices(100, 0.2, seed=3)
    assert len(val_idx) == 20 and not set(train_idx) & set(val_idx)
    assert sorted(train_idx + val_idx) == list(range(100))
    assert training_data.split_indices(100, 0.2, seed=4)[1] != val_idx
    assert training_data.split_indices(100, 0, seed=3) == (list(range(100)), [])
    assert len(training_data.split_indices(10, 0.01, seed=0)[1]) == 1, "any positive fraction holds out a tile"


def test_periodic_finiteness_check_stops_within_its_interval(long_tiles, tmp_path, monkeypatch):
    """The loss is read back from the device only every finite_check_interval steps: a NaN at step 4 stops
    training at the check after step 6, with the step it happened at, and nothing is saved."""
    calls = nan_loss_at_step(4, monkeypatch)
    with pytest.raises(UserError, match=r"loss became nan at epoch 1, step 4\b.*lower learning_rate"):
        training_engine.train(load_config(long_settings(long_tiles, tmp_path, 2, "--finite_check_interval=3")), "mse")
    assert len(calls) == 6
    assert list((tmp_path / "checkpoints").iterdir()) == []


@pytest.mark.parametrize("batch", [8, 2], ids=["one-step", "several-steps"])
def test_diverged_run_saves_no_model(small_tiles, tmp_path, capsys, batch):
    """learning_rate=inf: the weights are not finite after the first step. Training stops with one line,
    writes no Final model and names no Best model."""
    cfg = load_config(settings(small_tiles, tmp_path, 1, f"--batch_size_train={batch}", "--val_fraction=0.2"))
    cfg.learning_rate = math.inf  # Config validation refuses it; a learning rate far too high ends the same way
    with pytest.raises(UserError, match=r"(weights became non-finite|loss became nan) at epoch 1\b") as error:
        training_engine.train(cfg, "mse")
    assert "\n" not in str(error.value)
    assert list((tmp_path / "checkpoints").iterdir()) == []
    assert "Best_Model" not in capsys.readouterr().out


def test_failed_loss_log_write_keeps_the_finished_epoch(small_tiles, wrapped_up, tmp_path, monkeypatch, capsys):
    """Disk full while the loss log is written after epoch 2 (no periodic checkpoint due): one line, and the
    interrupt checkpoint keeps epochs 1 and 2 for the next run."""
    real, calls = loss_log.write_history, []

    def full_disk_at_epoch_2(path, rows):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(path, rows)

    with monkeypatch.context() as patch:
        patch.setattr(loss_log, "write_history", full_disk_at_epoch_2)
        with pytest.raises(UserError, match=r"cannot write .*loss\.csv.* \(No space left on device\)"):
            train(small_tiles, tmp_path, 3, *WRAP_UP)
    state = torch.load(tmp_path / "checkpoints" / training_state.INTERRUPT_NAME, weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 2
    capsys.readouterr()

    train(small_tiles, tmp_path, 3, *WRAP_UP)
    out = capsys.readouterr().out
    assert "(epoch 2, after step 2)" in out and "Epoch 1/3" not in out
    assert without_seconds(read_rows(tmp_path / "loss.csv")) == without_seconds(read_rows(wrapped_up / "loss.csv"))
    assert_same_weights(final(tmp_path), final(wrapped_up))
