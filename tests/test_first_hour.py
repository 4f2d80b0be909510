"""What a new user meets in the first hour: the warning for a training set too small for the settings, a
resume refused when the checkpoint folder's run trained on another folder, an evaluation folder that
holds one run, and the running loss on the progress bar from the first step on a CPU."""
import os
import re
import shutil
import types

import openpyxl
import torch

from core import training_state
from core.training_engine import warn_if_too_few

SMALL = ["--tile_size=64", "--num_workers=0", "--val_fraction=0", "--GPUs=cpu", "--save_interval=1"]


def train_args(folder, epochs, batch=2):
    return [f"--folder_path_train={folder}", f"--num_epochs={epochs}", f"--batch_size_train={batch}",
            "--model_saved_location_ssim=ckpt", "--training_loss_file_ssim=loss.csv", *SMALL]


def warnings_of(tiles, batch, epochs):
    said = []
    warn_if_too_few(types.SimpleNamespace(batch_size_train=batch, num_epochs=epochs), tiles, said.append)
    return said


def test_small_training_set_gets_one_warning_line_naming_what_to_change(tmp_path, make_tiles, run_script):
    make_tiles(tmp_path / "tiles", [f"t{i}.png" for i in range(6)])
    result = run_script("Training_SSIM.py", *train_args("tiles", 1, batch=4), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1, result.stdout
    assert all(key in warnings[0] for key in ("tile_stride", "batch_size_train", "num_epochs")), warnings[0]
    assert lines.index(warnings[0]) < next(i for i, line in enumerate(lines) if line.startswith("Training on"))


def test_warning_thresholds():
    assert warnings_of(793, 4, 4) == []  # the demo recipe: 198 steps per epoch, 792 in all
    assert len(warnings_of(793, 64, 20)) == 1  # 12 steps per epoch, 240 in all
    assert len(warnings_of(10, 4, 1000)) == 1  # 2 batches per epoch, however many epochs
    assert "1 step(s) per epoch" in warnings_of(3, 64, 500)[0]


def test_resume_onto_another_training_folder_is_refused_and_old_checkpoints_still_resume(tmp_path, make_tiles,
                                                                                        run_script):
    make_tiles(tmp_path / "first", [f"t{i}.png" for i in range(4)])
    make_tiles(tmp_path / "second", [f"u{i}.png" for i in range(4)])
    assert run_script("Training_SSIM.py", *train_args("first", 1), cwd=tmp_path).returncode == 0
    checkpoint = tmp_path / "ckpt" / "Model_AE_epoch_001.pth"
    state = torch.load(checkpoint, weights_only=True)
    assert state["settings"]["folder_path_train"] == os.path.realpath(tmp_path / "first")
    assert state["settings"]["tiles"] == 4
    before = sorted(os.listdir(tmp_path / "ckpt"))

    refused = run_script("Training_SSIM.py", *train_args("second", 2), cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and refused.stderr.startswith("error: "), refused.stderr
    assert "--resume=false" in refused.stderr and "model_saved_location_ssim" in refused.stderr
    assert str(tmp_path / "first") in refused.stderr and str(tmp_path / "second") in refused.stderr
    assert sorted(os.listdir(tmp_path / "ckpt")) == before

    # A checkpoint written before settings named the folder resumes, whatever folder this run reads.
    del state["settings"]["folder_path_train"], state["settings"]["tiles"]
    torch.save(state, checkpoint)
    resumed = run_script("Training_SSIM.py", *train_args("second", 2), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from" in resumed.stdout and "Epoch 2/2, Average Loss" in resumed.stdout


def comparison_pngs(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*_comparison.png"))


def evaluate(run_script, cwd, tiles, model):
    return run_script("Evaluation_SSIM.py", f"--folder_path_test={tiles}", f"--model_path_ssim={model}",
                      "--recon_output_ssim=out", "--reconstruction_metrics_ssim=metrics.xlsx", "--tile_size=64",
                      "--num_workers=0", "--GPUs=cpu", cwd=cwd)


def test_evaluation_folder_holds_one_run(tmp_path, make_tiles, run_script, model_file):
    make_tiles(tmp_path / "all", ["a.png", "b.png", "sub/c.png"])
    (tmp_path / "one").mkdir()
    shutil.copy(tmp_path / "all" / "b.png", tmp_path / "one" / "b.png")
    first = evaluate(run_script, tmp_path, "all", model_file)
    assert first.returncode == 0, first.stderr
    assert comparison_pngs(tmp_path / "out") == ["a_comparison.png", "b_comparison.png", "sub/c_comparison.png"]

    second = evaluate(run_script, tmp_path, "one", model_file)
    assert second.returncode == 0, second.stderr
    assert "Replacing" not in second.stdout  # the same model: nothing of another model's is replaced
    aside = [p for p in (tmp_path / "out").iterdir() if p.name.startswith("previous_run_")]
    assert len(aside) == 1 and comparison_pngs(aside[0]) == ["a_comparison.png", "sub/c_comparison.png"]
    current = [p for p in comparison_pngs(tmp_path / "out") if not p.startswith("previous_run_")]
    book = openpyxl.load_workbook(tmp_path / "metrics.xlsx", read_only=True)
    evaluated = [row[0] for row in book["Metrics"].iter_rows(min_row=2, values_only=True)]
    book.close()
    assert current == ["b_comparison.png"] and evaluated == ["one/b.png"]

    other = tmp_path / "other_model.pth"
    shutil.copy(model_file, other)
    third = evaluate(run_script, tmp_path, "one", other)
    assert third.returncode == 0, third.stderr
    assert re.search(r"^Replacing the results of .*model\.pth in out and metrics\.xlsx", third.stdout, re.M), \
        third.stdout


def test_progress_bar_shows_the_loss_from_the_first_step_on_a_cpu(tmp_path, make_tiles, run_script):
    make_tiles(tmp_path / "tiles", [f"t{i}.png" for i in range(4)])
    result = run_script("Training_SSIM.py", *train_args("tiles", 1), "--finite_check_interval=50", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert re.search(r"\| 1/2 \[[^\]]*loss=\d\.\d+\]", result.stderr), result.stderr


def adam_after_resume(saved_layout):
    """A parameter after two fused Adam steps, the second after a resume whose moments were saved in
    saved_layout (the parameter itself is contiguous, as fp32 training on a CPU keeps it)."""
    param = torch.nn.Parameter(torch.ones(8, 4, 3, 3))
    optimizer = torch.optim.Adam([param], lr=1e-3, fused=True)
    param.grad = torch.linspace(-1, 1, param.numel()).view_as(param)
    optimizer.step()
    state = optimizer.state_dict()
    for key in ("exp_avg", "exp_avg_sq"):
        state["state"][0][key] = state["state"][0][key].contiguous(memory_format=saved_layout)
    resumed = torch.optim.Adam([param], lr=1e-3, fused=True)
    training_state.load_optimizer_state(resumed, state)
    param.grad = torch.linspace(1, -2, param.numel()).view_as(param)
    resumed.step()
    return param.detach().clone()


def test_moments_saved_channels_last_resume_into_a_contiguous_model_exactly():
    assert torch.equal(adam_after_resume(torch.channels_last), adam_after_resume(torch.contiguous_format))


def demo_command(markdown):
    """The README's CPU demo command (python Training_SSIM.py --train_crop_size=... \\ continued) as arguments."""
    text = open(os.path.join(os.path.dirname(__file__), "..", markdown)).read()
    match = re.search(r"^python Training_SSIM\.py (--train_crop_size=.*?)$(?<!\\)", text.replace("\\\n    ", ""),
                      re.MULTILINE)
    assert match, f"no demo command in {markdown}"
    return match.group(1).split()


def test_the_demo_command_is_one_and_runs(tmp_path, make_tiles, run_script):
    """README and docs/first_hour.md give the same demo command, and its settings train (one epoch here, on
    64-px crops of generated tiles) with its SSIM + L1 loss."""
    args = demo_command("README.md")
    assert args == demo_command("docs/first_hour.md")
    assert "--l1_loss_weight=1" in args and "--num_epochs=72" in args
    make_tiles(tmp_path / "tiles", [f"t{i}.png" for i in range(32)], size=128)
    args = [a for a in args if not a.startswith("--num_epochs=")] + [
        "--num_epochs=1", "--folder_path_train=tiles", "--tile_size=128", "--num_workers=0", "--GPUs=cpu",
        "--model_saved_location_ssim=ckpt", "--training_loss_file_ssim=loss.csv"]
    result = run_script("Training_SSIM.py", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ckpt" / "Final_Model_AE_SSIM.pth").is_file()
    assert "Epoch 1/1, Average Loss:" in result.stdout
