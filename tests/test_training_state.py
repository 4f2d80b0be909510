"""training_state.py: what a resume accepts and refuses, the loss log after a spreadsheet, starting over,
old checkpoints pruned, precision changed between runs."""
import copy
import csv
import os
import shutil

import pytest
import torch
from PIL import Image

from core import checkpoint_io
from core import loss_log
from core import training_engine
from core import training_state
from core.errors import UserError
from core.cli import load_config
from conftest import tile_array

CHECKPOINT = "Model_AE_epoch_{:03d}.pth"


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    folder = tmp_path_factory.mktemp("state_tiles")
    for index in range(8):
        Image.fromarray(tile_array(index, 32)).save(folder / f"tile_{index}.png")
    return folder


def settings(tiles, out, epochs, *extra):
    """8 tiles of 32 px, batch 4: two steps an epoch; later arguments override earlier ones."""
    return [f"--folder_path_train={tiles}", "--tile_size=32", "--batch_size_train=4", f"--num_epochs={epochs}",
            "--save_interval=1", "--num_workers=0", "--GPUs=cpu", "--augment=false", "--val_fraction=0",
            f"--model_saved_location_mse={out / 'checkpoints'}", f"--training_loss_file_mse={out / 'loss.csv'}",
            f"--model_saved_location_ssim={out / 'checkpoints'}", f"--training_loss_file_ssim={out / 'loss.csv'}",
            *extra]


def train(tiles, out, epochs, *extra, loss="mse"):
    return training_engine.train(load_config(settings(tiles, out, epochs, *extra)), loss)


def rows_of(path):
    with open(path, newline="", encoding="utf-8-sig") as handle:
        return list(csv.DictReader(handle))


def without_seconds(rows):
    return [{key: str(value) for key, value in row.items() if key != "Seconds"} for row in rows]


def file_bytes(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tiles, tmp_path_factory):
    """A finished 3-epoch run (a checkpoint every epoch): its folder."""
    out = tmp_path_factory.mktemp("finished")
    train(tiles, out, 3)
    return out


@pytest.fixture
def run_copy(finished, tmp_path):
    """A copy of the finished run, its checkpoint folder holding epochs 1 and 2 only (the run stopped there)."""
    shutil.copytree(finished, tmp_path / "run", copy_function=os.link)
    for name in (CHECKPOINT.format(3), "Final_Model_AE_MSE.pth"):
        (tmp_path / "run" / "checkpoints" / name).unlink()
    return tmp_path / "run"


def rewrite(path, state):
    """torch.save as a new file: run_copy's files are hard links to the finished run's."""
    path.unlink()
    torch.save(state, path)


def as_earlier_version(path):
    """Rewrite a checkpoint without the keys this version added (settings, history)."""
    state = torch.load(path, weights_only=True)
    rewrite(path, {key: value for key, value in state.items() if key not in ("settings", "history")})


EXCEL_LOG = ("\ufeffEpoch;Loss;Val_MSE;Val_PSNR;Val_SSIM;Learning_Rate;Images_Seen;Seconds\r\n"
             "1.0;0,052345;n/a;;;0,0001;8;1,5\r\n"
             "2;0,041234;n/a;;;1E-04;16.0;1,4\r\n"
             ";;;;;;;\r\n")


def test_read_history_after_excel(tmp_path):
    log = tmp_path / "loss.csv"
    log.write_bytes(EXCEL_LOG.encode("utf-8"))
    assert loss_log.read_history(str(log), 5) == [
        {"Epoch": 1, "Loss": "0.052345", "Val_MSE": "", "Val_PSNR": "", "Val_SSIM": "", "Learning_Rate": "0.0001",
         "Images_Seen": "8", "Seconds": "1.5"},
        {"Epoch": 2, "Loss": "0.041234", "Val_MSE": "", "Val_PSNR": "", "Val_SSIM": "", "Learning_Rate": "0.0001",
         "Images_Seen": "16", "Seconds": "1.4"}]
    assert [row["Epoch"] for row in loss_log.read_history(str(log), 1)] == [1]


def test_read_history_keeps_our_own_log_as_it_is(finished):
    rows = rows_of(finished / "loss.csv")
    assert without_seconds(loss_log.read_history(str(finished / "loss.csv"), 3)) == without_seconds(rows)


def test_resume_keeps_the_history_of_a_spreadsheet_saved_log(run_copy, finished, tiles):
    """A checkpoint of an earlier version (no rows inside) and a log re-saved by Excel: the history survives."""
    as_earlier_version(run_copy / "checkpoints" / CHECKPOINT.format(2))
    reference = rows_of(finished / "loss.csv")
    (run_copy / "loss.csv").unlink()
    with open(run_copy / "loss.csv", "w", encoding="utf-8-sig", newline="") as handle:
        writer = csv.writer(handle, delimiter=";")
        writer.writerow(list(reference[0]))
        for row in reference[:2]:
            writer.writerow([value.replace(".", ",") if key != "Epoch" else value + ".0" for key, value in row.items()])
    train(tiles, run_copy, 3)
    assert without_seconds(rows_of(run_copy / "loss.csv")) == without_seconds(reference)


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00garbage\xff\xfe", b"When;What\n1;ok\n",
                                     b"Epoch,Loss\n1," + b"9" * 200_000 + b"\n"],
                         ids=["not-text", "no-epoch-column", "field-too-long"])
def test_unreadable_log_is_one_line_before_anything_is_written(run_copy, tiles, content):
    as_earlier_version(run_copy / "checkpoints" / CHECKPOINT.format(2))
    (run_copy / "loss.csv").unlink()
    (run_copy / "loss.csv").write_bytes(content)
    before = file_bytes(run_copy)
    with pytest.raises(UserError, match=r"loss log .*loss\.csv.*nothing was changed") as error:
        train(tiles, run_copy, 3)
    assert "\n" not in str(error.value)
    assert file_bytes(run_copy) == before


def test_run_stopped_before_its_final_model_finishes_log_and_model(finished, tmp_path, tiles, capsys):
    """The last epoch's checkpoint was written, its loss row and the Final model were not (disk full, kill)."""
    shutil.copytree(finished, tmp_path / "run")
    run = tmp_path / "run"
    (run / "checkpoints" / "Final_Model_AE_MSE.pth").unlink()
    rows = rows_of(run / "loss.csv")
    with open(run / "loss.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[:1])
    train(tiles, run, 3)
    out = capsys.readouterr().out
    assert "Nothing to do: already trained for 3 of num_epochs=3 epochs." in out
    assert rows_of(run / "loss.csv") == rows and (run / "checkpoints" / "Final_Model_AE_MSE.pth").is_file()


def test_resume_false_moves_the_previous_run_aside(run_copy, tiles, capsys):
    """A fresh start that stops early must not let a later plain run 'resume' the previous, longer run."""
    train(tiles, run_copy, 1, "--resume=false")
    out = capsys.readouterr().out
    aside = [p for p in (run_copy / "checkpoints").iterdir() if p.is_dir()]
    assert len(aside) == 1 and aside[0].name.startswith("previous_run_")
    assert f"Starting over (resume=False): moved the previous run's 4 file(s) to {aside[0]}" in out
    assert sorted(p.name for p in aside[0].iterdir()) == [CHECKPOINT.format(1), CHECKPOINT.format(2), "loss.csv",
                                                          "loss.png"]
    assert sorted(p.name for p in (run_copy / "checkpoints").glob("*.pth")) == ["Final_Model_AE_MSE.pth",
                                                                                CHECKPOINT.format(1)]

    train(tiles, run_copy, 2)
    out = capsys.readouterr().out
    assert "Nothing to do" not in out and "Epoch 2/2, Average Loss" in out
    assert [row["Epoch"] for row in rows_of(run_copy / "loss.csv")] == ["1", "2"]


@pytest.mark.parametrize("change, words", [
    (["--tile_size=64"], "tile_size=32 there, 64 now"),
    (["--train_crop_size=32", "--tile_size=64"], "train_crop_size=0 there, 32 now"),
    ("ssim", "loss='mse' there, 'ssim' now"),
])
def test_resume_refuses_another_experiment(run_copy, tiles, change, words):
    before = file_bytes(run_copy)
    with pytest.raises(UserError) as error:
        if change == "ssim":
            train(tiles, run_copy, 3, loss="ssim")
        else:
            train(tiles, run_copy, 3, *change)
    message = str(error.value)
    assert words in message and "another experiment" in message and "--resume=false" in message
    assert "\n" not in message and file_bytes(run_copy) == before


def test_resume_allows_what_may_change(run_copy, tiles, capsys):
    train(tiles, run_copy, 3, "--mixed_precision=off", "--batch_size_train=8", "--num_workers=1")
    out = capsys.readouterr().out
    assert f"Resuming from {run_copy / 'checkpoints' / CHECKPOINT.format(2)} (epoch 2)" in out
    assert "in fp32" in out and "Epoch 3/3, Average Loss" in out


def test_optimizer_state_that_does_not_fit_is_one_line(run_copy, tiles):
    path = run_copy / "checkpoints" / CHECKPOINT.format(2)
    state = torch.load(path, weights_only=True)
    state["optimizer_state_dict"]["state"][0]["exp_avg"] = torch.zeros(7)
    rewrite(path, state)
    with pytest.raises(UserError, match=r"optimizer state does not fit the model \(the moments of parameter 0 .*"
                                        r"--resume=false"):
        train(tiles, run_copy, 3)
    state["optimizer_state_dict"]["param_groups"][0]["params"] = [0, 1]
    rewrite(path, state)
    with pytest.raises(UserError, match=r"optimizer state does not fit the model \(2 parameters, the model has"):
        train(tiles, run_copy, 3)


def test_broken_interrupt_file_falls_back_to_the_periodic_checkpoint(run_copy, tiles, capsys):
    interrupt = run_copy / "checkpoints" / training_state.INTERRUPT_NAME
    interrupt.write_bytes(b"PK\x03\x04 half a checkpoint")
    train(tiles, run_copy, 3)
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning:") and "too few" not in line]
    assert len(warnings) == 1 and str(interrupt) in warnings[0]  # besides the small training set's warning
    assert f"resuming from {run_copy / 'checkpoints' / CHECKPOINT.format(2)} instead" in warnings[0]
    assert "Epoch 3/3, Average Loss" in out and not interrupt.exists()


def test_broken_interrupt_file_without_a_periodic_checkpoint_is_an_error(tmp_path, tiles):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / training_state.INTERRUPT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="is truncated or not a PyTorch checkpoint"):
        train(tiles, tmp_path, 1)


def test_keep_checkpoints_deletes_older_periodic_ones(tiles, tmp_path):
    train(tiles, tmp_path, 4, "--keep_checkpoints=2", "--val_fraction=0.25")
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [
        "Best_Model_AE_MSE.pth", "Final_Model_AE_MSE.pth", CHECKPOINT.format(3), CHECKPOINT.format(4)]
    train(tiles, tmp_path, 6, "--keep_checkpoints=0", "--val_fraction=0.25")
    assert [p.name for p in sorted(folder.glob("Model_AE_epoch_*"))] == [CHECKPOINT.format(e) for e in range(3, 7)]


class ScalerOnTheCpu(torch.amp.GradScaler):
    def __init__(self, device="cuda", *args, **kwargs):
        super().__init__("cpu", *args, **kwargs)


@pytest.fixture
def fp16_on_this_cpu(monkeypatch):
    """Training in fp16 with a GradScaler, as on a GPU without bf16 (run by the CPU)."""
    monkeypatch.setattr(torch.amp, "GradScaler", ScalerOnTheCpu)
    monkeypatch.setattr(training_engine, "autocast_dtype", lambda device, mode, training: torch.float16)


def test_bf16_checkpoint_resumed_in_fp16(run_copy, tiles, fp16_on_this_cpu, capsys):
    """A run saved without a scaler (bf16 or fp32) carries an empty scaler state: it is not loaded."""
    assert torch.load(run_copy / "checkpoints" / CHECKPOINT.format(2), weights_only=True)["scaler_state_dict"] == {}
    train(tiles, run_copy, 3)
    assert "in fp16" in capsys.readouterr().out


def test_fp16_scaler_state_is_kept_across_a_resume(tiles, tmp_path, fp16_on_this_cpu):
    train(tiles, tmp_path, 1, "--mixed_precision=fp16")
    path = tmp_path / "checkpoints" / CHECKPOINT.format(1)
    state = torch.load(path, weights_only=True)
    state["scaler_state_dict"]["scale"] = 1024.0
    torch.save(state, path)
    restored = []
    real = torch.amp.GradScaler.load_state_dict
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.amp.GradScaler, "load_state_dict", lambda self, s: (restored.append(s), real(self, s)))
        train(tiles, tmp_path, 2, "--mixed_precision=fp16")
    assert [s["scale"] for s in restored] == [1024.0]
    assert 0 < torch.load(tmp_path / "checkpoints" / CHECKPOINT.format(2), weights_only=True)["scaler_state_dict"][
        "scale"] <= 1024.0


def test_checkpoints_carry_settings_and_history(finished):
    state = checkpoint_io.load(finished / "checkpoints" / CHECKPOINT.format(2))
    assert state["settings"]["loss"] == "mse" and state["settings"]["tile_size"] == 32
    assert [row["Epoch"] for row in state["history"]] == [1, 2]


def adam_steps(model, optimizer, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for param in model.parameters():
            param.grad = torch.randn(param.shape, generator=generator)
        optimizer.step()


def test_training_adam_is_fused_and_takes_over_a_plain_adams_state():
    """Checkpoints written by the one-tensor-at-a-time Adam resume in the fused one, which stays fused and
    continues as the plain one would have."""
    torch.manual_seed(0)
    plain_model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    fused_model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    plain = torch.optim.Adam(plain_model.parameters(), lr=1e-2, weight_decay=1e-5)
    adam_steps(plain_model, plain, 3, seed=1)
    fused_model.load_state_dict(plain_model.state_dict())
    fused = training_state.adam(fused_model, torch.device("cpu"), lr=5e-1, weight_decay=0.0)
    assert all(group["fused"] for group in fused.param_groups)
    training_state.load_optimizer_state(fused, copy.deepcopy(plain.state_dict()))  # as read from a file
    assert all(group["fused"] and group["lr"] == 1e-2 for group in fused.param_groups)
    adam_steps(plain_model, plain, 2, seed=2)
    adam_steps(fused_model, fused, 2, seed=2)
    for mine, theirs in zip(fused_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    assert float(fused.state[next(fused_model.parameters())]["step"]) == 5
