"""core/settings.py: one table entry per Config key (its rule, its scripts, its meaning), from which the
command line's rules and key lists, --help and docs/configuration.md (tools/config_doc.py) all come."""
import importlib.util
import subprocess
import sys
from dataclasses import replace

import pytest

import Config
from core import cli, losses, settings
from core.cli import RULES, SCRIPT_KEYS, _config_values, script_keys
from conftest import REPO, script_env


def config_doc():
    """tools/config_doc.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("config_doc", REPO / "tools" / "config_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_config_key_has_exactly_one_entry_and_every_entry_a_key():
    keys = set(_config_values(Config))
    per_loss = [loss.key(stem) for stem in settings.PER_LOSS for loss in losses.RECORDS]
    declared = list(settings.KEYS) + per_loss
    assert len(declared) == len(set(declared)), "a key declared twice"
    assert set(declared) == keys == set(settings.table())
    assert set(per_loss) == set(losses.config_keys())
    # what the command line derives from the table
    assert keys == set(RULES)
    assert set().union(*(script_keys(script) for script in SCRIPT_KEYS)) == keys
    assert {"keep_freed_memory", "keep_checkpoints", "cache_tiles"} <= keys


def test_each_entry_has_its_rule_scripts_and_meaning():
    for key, setting in settings.table().items():
        assert isinstance(setting.rule, settings.Rule) and RULES[key] == setting.rule, key
        assert setting.scripts and set(setting.scripts) <= set(settings.SCRIPTS), key
        assert set(setting.modes) <= set(setting.scripts), key
        assert setting.doc and "\n" not in setting.doc and "{LOSS}" not in setting.doc, key
        for script in setting.scripts:
            assert key in script_keys(script, setting.loss), (key, script)


def test_per_loss_keys_follow_the_loss_records():
    table = settings.table()
    for loss in losses.RECORDS:
        for script in losses.KEY_STEMS:
            for key in loss.keys(script):
                assert table[key].loss == loss.name and table[key].scripts[0] == script
        assert table[loss.key("model_saved_location")].doc == f"folder for {loss.tag}-loss checkpoints"
    assert table["model_path_ssim"].scripts == ("evaluation", "features")
    assert table["model_path_ssim"].doc.endswith(", and the encoder `Extract_Features.py` uses")
    assert table["model_path_mse"].scripts == ("evaluation",)


def test_mixed_precision_choices_are_the_runtimes():
    from core.devices import PRECISIONS
    assert RULES["mixed_precision"] == settings.Rule(PRECISIONS)


def test_table_refuses_stems_the_loss_records_do_not_have(monkeypatch):
    monkeypatch.setitem(settings.PER_LOSS, "model_colour", settings.PER_LOSS["model_path"])
    with pytest.raises(ValueError, match="PER_LOSS"):
        settings.table()


def test_table_refuses_extra_readers_of_an_unknown_loss(monkeypatch):
    model_path = settings.PER_LOSS["model_path"]
    monkeypatch.setitem(settings.PER_LOSS, "model_path", replace(
        model_path, also={**model_path.also, "l1": settings.Also("features", "")}))
    with pytest.raises(ValueError, match="'l1', not a loss"):
        settings.table()


def test_table_refuses_an_unknown_script(monkeypatch):
    monkeypatch.setitem(settings.KEYS, "seed", settings._key(settings.COUNT, "training slides", "x"))
    with pytest.raises(ValueError, match="unknown script kind 'slides'"):
        settings.table()


def test_importing_the_table_imports_no_torch():
    code = "import sys, core.settings; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=script_env(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_help_shows_the_meaning_as_plain_text():
    assert settings.plain("see [training.md](training.md#memory), `True` or `\"auto\"`") == \
        'see training.md, True or "auto"'
    assert cli.help_text(Config, ["GPUs"], {"GPUs": "0"}, "X.py").splitlines()[-1] == (
        '  --GPUs=0  GPU ids: "0", "2,3", or "cpu". Without CUDA the scripts use the CPU and say so once. '
        "Training with several ids starts one process per GPU (training.md).")


# --- docs/configuration.md -----------------------------------------------------------------------------------

def test_committed_configuration_page_is_the_generated_text():
    with open(REPO / "docs" / "configuration.md", encoding="utf-8") as handle:
        assert handle.read() == config_doc().page(), "run python tools/config_doc.py"


def test_configuration_page_rows():
    text = config_doc().page()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(settings.descriptions(Config.__file__))  # source order
    assert "| `learning_rate` | `1e-4` | Training_\\* | Adam step size |" in rows
    assert any(row.startswith("| `keep_freed_memory` | `\"auto\"` | every script |") for row in rows)
    assert any(row.startswith("| `model_path_ssim` | `\"sample_models/model_auto_encoder_reconstruction_ssim.pth\"` "
                              "| Evaluation_SSIM, Extract_Features |") for row in rows)
    assert any(row.startswith("| `tile_stride` | `256` | Prepare_Tiles, Extract_Features (slide mode) |")
               for row in rows)
    assert "## Training (Training_MSE.py, Training_SSIM.py)" in text.splitlines()


def test_check_exits_1_when_the_page_is_stale(tmp_path, monkeypatch, capsys):
    module = config_doc()
    stale = tmp_path / "configuration.md"
    stale.write_text(module.page().replace("Adam step size", "Adam step"), encoding="utf-8")
    monkeypatch.setattr(module, "DOC", str(stale))
    monkeypatch.setattr(sys, "argv", ["config_doc.py", "--check"])
    with pytest.raises(SystemExit) as info:
        module.main()
    assert info.value.code == 1 and "not the generated text" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["config_doc.py"])
    module.main()
    assert stale.read_text(encoding="utf-8") == module.page()
    monkeypatch.setattr(sys, "argv", ["config_doc.py", "--check"])
    module.main()  # up to date: returns, exit 0


def test_a_config_key_without_an_entry_is_refused(tmp_path):
    config = tmp_path / "Config.py"
    config.write_text((REPO / "Config.py").read_text(encoding="utf-8") + "extra_key = 1  # new\n", encoding="utf-8")
    with pytest.raises(ValueError, match="extra_key"):
        config_doc().page(str(config))
