"""core/losses.py: one record per loss, which the Config keys, the scripts, the Best-model score and the
loss curve all follow."""
import os

import pytest
import torch

import Config
from core import losses
from core import training_engine
from core.cli import PATH, RULES, load_config, script_keys
from conftest import REPO


@pytest.mark.parametrize("loss", losses.RECORDS, ids=lambda loss: loss.name)
def test_each_loss_owns_its_config_keys_and_scripts(loss):
    for key in loss.keys():
        assert hasattr(Config, key), f"Config.py lacks {key}"
        assert RULES[key] == PATH
    assert set(loss.keys("training")) <= script_keys("training", loss.name)
    assert set(loss.keys("evaluation")) <= script_keys("evaluation", loss.name)
    others = [key for other in losses.RECORDS if other is not loss for key in other.keys()]
    assert not set(others) & (script_keys("training", loss.name) | script_keys("evaluation", loss.name))
    with open(os.path.join(REPO, f"Training_{loss.tag}.py")) as handle:
        assert f'main("{loss.name}")' in handle.read()


def test_validation_score_follows_the_direction_of_the_metric():
    assert losses.get("mse").val_loss(0.25) == 0.25
    assert losses.get("ssim").val_loss(0.75) == pytest.approx(0.25)
    assert losses.get("ssim").log_column == "Val_SSIM" and losses.get("mse").log_column == "Val_MSE"


def test_the_loss_functions_are_those_of_the_records():
    x = torch.rand(2, 3, 64, 64)
    for loss in losses.RECORDS:
        assert losses.LOSSES[loss.name] is loss.function
        assert loss.function(x, x).item() == pytest.approx(0.0, abs=1e-6)


def test_an_unknown_loss_is_refused_not_scored_as_another():
    with pytest.raises(ValueError, match=r"unknown loss 'l1': one of mse, ssim\b"):
        losses.get("l1")
    with pytest.raises(ValueError, match="unknown loss"):
        training_engine.run_paths(load_config([], "training", "mse"), "l1")
    with pytest.raises(ValueError, match="not a per-loss Config key"):
        losses.get("mse").key("tile_size")


@pytest.mark.parametrize("name", losses.NAMES)
def test_l1_loss_weight_adds_the_mean_absolute_error(name):
    torch.manual_seed(0)
    output, target = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    assert losses.training_loss(name, 0.0) is losses.LOSSES[name]
    plain = losses.LOSSES[name](output, target)
    mixed = losses.training_loss(name, 0.5)(output, target)
    assert mixed.item() == pytest.approx(plain.item() + 0.5 * (output - target).abs().mean().item(), rel=1e-6)
    assert losses.training_loss(name, 0.5)(target, target).item() == pytest.approx(0.0, abs=1e-6)


def test_training_minimises_the_loss_with_its_l1_weight(monkeypatch, tmp_path, make_tiles):
    """One epoch of Training_SSIM.py's engine with --l1_loss_weight: every step's loss is the SSIM loss plus
    that weight times the L1 error (the function training_loss builds for the run)."""
    calls, values = [], []
    real = losses.training_loss

    def recording(name, weight):
        calls.append((name, weight))
        function = real(name, weight)
        return lambda output, target: values.append((function(output, target), output, target)) or values[-1][0]

    monkeypatch.setattr(losses, "training_loss", recording)
    make_tiles(tmp_path / "tiles", [f"{i}.png" for i in range(4)], size=64)
    training_engine.train(load_config([
        f"--folder_path_train={tmp_path / 'tiles'}", "--tile_size=64", "--batch_size_train=2", "--num_epochs=1",
        "--num_workers=0", "--GPUs=cpu", "--augment=false", "--val_fraction=0", "--l1_loss_weight=0.25",
        f"--model_saved_location_ssim={tmp_path / 'ckpt'}", f"--training_loss_file_ssim={tmp_path / 'loss.csv'}"],
        "training", "ssim"), "ssim")
    assert calls == [("ssim", 0.25)] and len(values) == 2
    saved = torch.load(tmp_path / "ckpt" / "Model_AE_epoch_001.pth", weights_only=True)["settings"]
    assert saved["l1_loss_weight"] == 0.25 and saved["loss"] == "ssim"  # the run's record says how it trained
    for loss, output, target in values:
        expected = losses.LOSSES["ssim"](output, target) + 0.25 * (output.float() - target.float()).abs().mean()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
