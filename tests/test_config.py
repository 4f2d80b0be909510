"""--key=value overrides of Config.py: type checking, helpful errors, and how the scripts report them."""
import pytest
import torch

import Config
from core import devices
from core.errors import UserError
from core.cli import _config_values, load_config


def test_no_arguments_gives_config_values():
    cfg = load_config([])
    assert vars(cfg) == _config_values(Config)
    assert cfg.tile_size == Config.tile_size and cfg.folder_path_test == Config.folder_path_test


@pytest.mark.parametrize("arg, key, expected", [
    ("--num_epochs=7", "num_epochs", 7),
    ("--tile_size=64", "tile_size", 64),
    ("--learning_rate=0.003", "learning_rate", 0.003),
    ("--learning_rate=1e-5", "learning_rate", 1e-5),
    ("--augment=false", "augment", False),
    ("--augment=False", "augment", False),
    ("--augment=0", "augment", False),
    ("--resume=true", "resume", True),
    ("--resume=1", "resume", True),
    ("--GPUs=cpu", "GPUs", "cpu"),
    ("--GPUs=2,3", "GPUs", "2,3"),
    ("--folder_path_train=my tiles/a=b", "folder_path_train", "my tiles/a=b"),
])
def test_override_is_typed(arg, key, expected):
    value = getattr(load_config([arg]), key)
    assert value == expected
    assert type(value) is type(getattr(Config, key))


def test_integer_text_for_float_key_becomes_float():
    value = load_config(["--learning_rate=1"]).learning_rate
    assert value == 1.0 and type(value) is float


def test_bool_override_flips_the_default():
    flipped = load_config([f"--augment={str(not Config.augment).lower()}"]).augment
    assert flipped is (not Config.augment)


def test_several_overrides_and_config_module_untouched():
    before = _config_values(Config)
    cfg = load_config(["--num_epochs=3", "--batch_size_train=5", "--GPUs=cpu"])
    assert (cfg.num_epochs, cfg.batch_size_train, cfg.GPUs) == (3, 5, "cpu")
    assert _config_values(Config) == before
    assert load_config([]).num_epochs == Config.num_epochs


def test_unknown_key_lists_valid_keys():
    with pytest.raises(UserError) as info:
        load_config(["--num_epoch=3"])
    message = str(info.value)
    assert "num_epoch" in message
    for key in _config_values(Config):
        assert key in message


@pytest.mark.parametrize("arg", [
    "--num_epochs=2.5", "--num_epochs=ten", "--tile_size=", "--learning_rate=fast",
    "--augment=maybe", "--resume=2",
])
def test_wrong_type_is_user_error(arg):
    key = arg[2:].split("=")[0]
    with pytest.raises(UserError) as info:
        load_config([arg])
    message = str(info.value)
    assert key in message and type(getattr(Config, key)).__name__ in message


@pytest.mark.parametrize("arg", ["--num_epochs", "num_epochs=3", "-n=3"])
def test_malformed_argument_lists_valid_keys(arg):
    with pytest.raises(UserError) as info:
        load_config([arg])
    assert "--key=value" in str(info.value) and "folder_path_train" in str(info.value)


def test_help_prints_every_key(capsys):
    with pytest.raises(SystemExit) as info:
        load_config(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for key in _config_values(Config):
        assert f"--{key}=" in out


@pytest.mark.parametrize("script, arg, names", [
    ("Training_MSE.py", "--no_such_key=1", ["no_such_key", "num_epochs", "folder_path_train"]),
    ("Evaluation_SSIM.py", "--batch_size_test=big", ["batch_size_test", "int"]),
])
def test_script_with_bad_override_exits_2_with_one_line(run_script, tmp_path, script, arg, names):
    result = run_script(script, arg, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    for name in names:
        assert name in lines[0]
    assert list(tmp_path.iterdir()) == []  # rejected before anything was written


CPU = torch.device("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_on_cpu_trains_in_native_bf16_and_infers_in_fp32(monkeypatch, native):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
    assert devices.autocast_dtype(CPU, "auto", training=True) == (torch.bfloat16 if native else None)
    assert devices.precision_name(devices.autocast_dtype(CPU, "auto", training=True)) == ("bf16" if native else "fp32")
    assert devices.autocast_dtype(CPU, "auto") is None


def test_explicit_precisions_on_cpu():
    assert devices.autocast_dtype(CPU, "off") is None
    for training in (True, False):  # forced, for inference too, even where it would be emulated
        assert devices.autocast_dtype(CPU, " BF16 ", training=training) == torch.bfloat16
    with pytest.raises(UserError, match="fp16.*CUDA"):
        devices.autocast_dtype(CPU, "fp16")
    with pytest.raises(UserError, match="mixed_precision='half'.*'auto'"):
        devices.autocast_dtype(CPU, "half")


def test_bad_precision_stops_a_script_before_work(run_script, tmp_path):
    result = run_script("Evaluation_MSE.py", "--mixed_precision=fp8", "--GPUs=cpu",
                        f"--recon_output_mse={tmp_path}/r/", f"--reconstruction_metrics_mse={tmp_path}/m.xlsx",
                        cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --mixed_precision=fp8: expected one of 'auto', 'bf16', 'fp16', 'off'"]
    assert not (tmp_path / "m.xlsx").exists()
