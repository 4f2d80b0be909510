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
