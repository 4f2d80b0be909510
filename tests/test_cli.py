"""cli.load_config per script (the keys each reads, --help, every setting checked before work) and
cli.run_main's exit codes (error 2, interrupt 128 + signal, stdout closed by its reader 141)."""
import signal
import subprocess
import sys

import pytest

import Config
from core import cli, settings
from core.cli import SCRIPT_KEYS, _config_values, load_config, script_keys
from core.errors import UserError
from conftest import REPO, script_env

SCRIPTS = [("Training_MSE.py", "training", "mse"), ("Training_SSIM.py", "training", "ssim"),
           ("Evaluation_MSE.py", "evaluation", "mse"), ("Evaluation_SSIM.py", "evaluation", "ssim"),
           ("Extract_Features.py", "features", None), ("Prepare_Tiles.py", "tiles", None)]


def one_error_line(result):
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# --- which keys each script reads -------------------------------------------------------------------------

# Every Config key has a rule and a script: tests/test_settings.py (the table they come from).

def test_loss_picks_its_own_keys():
    mse = vars(load_config([], "evaluation", "mse"))
    assert {"model_path_mse", "recon_output_mse", "reconstruction_metrics_mse"} <= set(mse)
    assert not any(key.endswith("_ssim") for key in mse)
    training = vars(load_config([], "training", "ssim"))
    assert {"model_saved_location_ssim", "training_loss_file_ssim", "keep_checkpoints", "cache_tiles"} <= set(training)
    assert "model_saved_location_mse" not in training and "folder_path_test" not in training
    assert set(vars(load_config([], "tiles"))) == set(SCRIPT_KEYS["tiles"])


@pytest.mark.parametrize("script, loss, arg, message", [
    ("evaluation", "mse", "--model_path_ssim=my.pth",
     "--model_path_ssim is not read by Evaluation_MSE.py (did you mean --model_path_mse?); "
     "python Evaluation_MSE.py --help lists the settings it reads"),
    ("tiles", None, "--GPUs=cpu",
     "--GPUs is not read by Prepare_Tiles.py; python Prepare_Tiles.py --help lists the settings it reads"),
    ("features", None, "--model_path_mse=m.pth",
     "--model_path_mse is not read by Extract_Features.py (did you mean --model_path_ssim?); "
     "python Extract_Features.py --help lists the settings it reads"),
    ("training", "ssim", "--folder_path_test=x",
     "--folder_path_test is not read by Training_SSIM.py; python Training_SSIM.py --help lists the settings it reads"),
])
def test_a_key_the_script_does_not_read_is_an_error(script, loss, arg, message):
    with pytest.raises(UserError) as info:
        load_config([arg], script, loss)
    assert str(info.value) == message


@pytest.mark.parametrize("script, arg", [("Evaluation_MSE.py", "--model_path_ssim=my.pth"),
                                         ("Training_SSIM.py", "--model_saved_location_mse=x"),
                                         ("Extract_Features.py", "--recon_output_ssim=x"),
                                         ("Prepare_Tiles.py", "--num_workers=0")])
def test_scripts_refuse_keys_they_do_not_read(run_script, tmp_path, script, arg):
    """Before, Evaluation_MSE.py --model_path_ssim=... evaluated the MSE model and exited 0."""
    result = run_script(script, arg, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    key = arg[2:].split("=")[0]
    assert one_error_line(result).startswith(f"error: --{key} is not read by {script}")
    assert list(tmp_path.iterdir()) == []


def test_unknown_key_lists_the_scripts_keys():
    with pytest.raises(UserError) as info:
        load_config(["--num_epoch=3"], "training", "mse")
    message = str(info.value)
    assert message.startswith("unknown Config key 'num_epoch'; valid keys: GPUs, num_workers, seed")
    assert "num_epochs" in message and "folder_path_test" not in message


# --- --help ----------------------------------------------------------------------------------------------

def help_lines(capsys, script, loss):
    with pytest.raises(SystemExit) as info:
        load_config(["--num_epochs=3", "--help"], script, loss)
    assert info.value.code == 0
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("name, script, loss", SCRIPTS)
def test_help_lists_only_the_scripts_keys_with_value_and_description(capsys, name, script, loss):
    lines = help_lines(capsys, script, loss)
    assert lines[0] == f"usage: python {name} [--key=value ...]"
    shown = {line.split()[0].split("=")[0][2:] for line in lines if line.startswith("  --")}
    assert shown == script_keys(script, loss)
    for key in shown:
        line = next(line for line in lines if line.startswith(f"  --{key}="))
        assert line.split()[0] == f"--{key}={getattr(Config, key)}"
        described = settings.plain(cli.SETTINGS[key].doc)  # the table's meaning (core/settings.py)
        assert line.endswith(described) and described


def test_help_shows_config_sections(capsys):
    lines = help_lines(capsys, "tiles", None)
    assert "Cutting a slide into tiles (Prepare_Tiles.py)" in lines
    assert lines.index("System") < lines.index("Cutting a slide into tiles (Prepare_Tiles.py)")


def test_every_config_key_has_a_one_line_description():
    described = cli.descriptions(Config.__file__)
    assert set(described) == set(_config_values(Config))
    for key, (heading, text) in described.items():
        assert heading and text and "\n" not in text, key


def test_descriptions_come_from_the_source_tokens(tmp_path):
    """A # inside a value is not a comment; the trailing comment is; sections come from comment lines."""
    source = tmp_path / "Config.py"
    source.write_text('"""Doc # not a section."""\n# ----\n# Paths\n# ----\n'
                      'folder = "tiles#1"   # where # the tiles are\nplain = 3\n'
                      '# Numbers\nrate = 1e-4  # step size\n', encoding="utf-8")
    assert cli.descriptions(source) == {"folder": ("Paths", "where # the tiles are"), "plain": ("Paths", ""),
                                        "rate": ("Numbers", "step size")}


def test_script_help_exits_0_with_its_keys_only(run_script, tmp_path):
    result = run_script("Evaluation_MSE.py", "--help", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--model_path_mse=" in result.stdout and "model evaluated by Evaluation_MSE.py" in result.stdout
    assert "--model_path_ssim=" not in result.stdout and "--num_epochs=" not in result.stdout


# --- every setting checked before work ---------------------------------------------------------------------

@pytest.mark.parametrize("arg, message", [
    ("--learning_rate=nan", "--learning_rate=nan: expected a finite number (float) above 0"),
    ("--learning_rate=inf", "--learning_rate=inf: expected a finite number (float) above 0"),
    ("--learning_rate=-0.001", "--learning_rate=-0.001: expected a finite number (float) above 0"),
    ("--learning_rate=0", "--learning_rate=0: expected a finite number (float) above 0"),
    ("--weight_decay=-1", "--weight_decay=-1: expected a finite number (float) of at least 0"),
    ("--seed=-1", "--seed=-1: expected a whole number (int) from 0 to 4294967295"),
    ("--seed=18446744073709551616", "--seed=18446744073709551616: expected a whole number (int) from 0 to 4294967295"),
    ("--train_crop_size=-32", "--train_crop_size=-32: expected a whole number (int) from 0 to 65536"),
    ("--tile_size=0", "--tile_size=0: expected a whole number (int) from 1 to 65536"),
    ("--tile_size=99999999999999999999", "--tile_size=99999999999999999999: expected a whole number (int) from 1 to 65536"),
    ("--batch_size_train=0", "--batch_size_train=0: expected a whole number (int) of at least 1"),
    ("--num_epochs=-3", "--num_epochs=-3: expected a whole number (int) of at least 1"),
    ("--save_interval=0", "--save_interval=0: expected a whole number (int) of at least 1"),
    ("--keep_checkpoints=-1", "--keep_checkpoints=-1: expected a whole number (int) of at least 0"),
    ("--num_workers=-1", "--num_workers=-1: expected a whole number (int) of at least 0"),
    ("--val_fraction=1", "--val_fraction=1: expected a finite number (float) of at least 0 and below 1"),
    ("--val_fraction=-0.1", "--val_fraction=-0.1: expected a finite number (float) of at least 0 and below 1"),
    ("--lr_schedule=linear", "--lr_schedule=linear: expected one of 'constant', 'cosine'"),
    ("--mixed_precision=fp8", "--mixed_precision=fp8: expected one of 'auto', 'bf16', 'fp16', 'off'"),
    ("--cache_tiles=sometimes", "--cache_tiles=sometimes: expected 'auto', true or false"),
    ("--keep_freed_memory=2", "--keep_freed_memory=2: expected 'auto', true or false"),
    ("--augment=maybe", "--augment=maybe: expected true or false (bool)"),
])
def test_bad_training_setting_is_one_line(arg, message):
    with pytest.raises(UserError) as info:
        load_config([arg], "training", "mse")
    assert str(info.value) == message


@pytest.mark.parametrize("script, arg, message", [
    ("tiles", "--tissue_fraction=1.5", "--tissue_fraction=1.5: expected a finite number (float) from 0 to 1"),
    ("tiles", "--tile_stride=-64", "--tile_stride=-64: expected a whole number (int) from 1 to 65536"),
    ("tiles", "--background_gray=300", "--background_gray=300: expected a whole number (int) from 0 to 255"),
    ("evaluation", "--batch_size_test=0", "--batch_size_test=0: expected a whole number (int) of at least 1"),
])
def test_bad_other_setting_is_one_line(script, arg, message):
    with pytest.raises(UserError) as info:
        load_config([arg], script, "mse" if script == "evaluation" else None)
    assert str(info.value) == message


@pytest.mark.parametrize("key, value, allowed", [
    ("num_epochs", "10", "a whole number (int) of at least 1"),
    ("num_epochs", None, "a whole number (int) of at least 1"),
    ("num_epochs", 10.0, "a whole number (int) of at least 1"),
    ("batch_size_train", True, "a whole number (int) of at least 1"),
    ("learning_rate", None, "a finite number (float) above 0"),
    ("learning_rate", "1e-4", "a finite number (float) above 0"),
    ("learning_rate", float("nan"), "a finite number (float) above 0"),
    ("seed", 2**63, "a whole number (int) from 0 to 4294967295"),
    ("folder_path_train", None, "a path (text, not empty, no NUL character)"),
    ("folder_path_train", 5, "a path (text, not empty, no NUL character)"),
    ("folder_path_train", "tiles\0", "a path (text, not empty, no NUL character)"),
    ("GPUs", 0, "text (str, no NUL character)"),
    ("augment", "False", "true or false (bool)"),
    ("resume", None, "true or false (bool)"),
    ("lr_schedule", None, "one of 'constant', 'cosine'"),
    ("cache_tiles", 2, "'auto', true or false"),
    ("keep_checkpoints", -1, "a whole number (int) of at least 0"),
])
def test_bad_value_typed_into_config_is_one_line(monkeypatch, key, value, allowed):
    monkeypatch.setattr(Config, key, value)
    with pytest.raises(UserError) as info:
        load_config([], "training", "mse")
    assert str(info.value) == f"{key} = {value!r} in Config.py: expected {allowed}"


def test_command_line_replaces_a_bad_config_value(monkeypatch):
    monkeypatch.setattr(Config, "num_epochs", None)
    assert load_config(["--num_epochs=3"], "training", "mse").num_epochs == 3


def test_a_script_checks_only_the_keys_it_reads(monkeypatch):
    monkeypatch.setattr(Config, "slide_path", None)
    assert load_config([], "evaluation", "mse").batch_size_test == Config.batch_size_test
    with pytest.raises(UserError, match="slide_path = None in Config.py"):
        load_config([], "tiles")


def test_a_setting_removed_from_config_is_named(monkeypatch):
    monkeypatch.delattr(Config, "keep_checkpoints")
    with pytest.raises(UserError) as info:
        load_config([], "training", "mse")
    assert str(info.value) == "Config.py has no setting 'keep_checkpoints' (read by Training_MSE.py): restore its line"


@pytest.mark.parametrize("script, argv, key, expected", [
    ("training", ["--seed=4294967295"], "seed", 4294967295),
    ("training", ["--val_fraction=0"], "val_fraction", 0.0),
    ("training", ["--mixed_precision= BF16 "], "mixed_precision", "bf16"),
    ("training", ["--lr_schedule=Cosine"], "lr_schedule", "cosine"),
    ("training", ["--cache_tiles=AUTO"], "cache_tiles", "auto"),
    ("training", ["--cache_tiles=false"], "cache_tiles", False),
    ("training", ["--keep_freed_memory=on"], "keep_freed_memory", True),
    ("tiles", ["--tissue_fraction=1"], "tissue_fraction", 1.0),
    ("tiles", ["--exclude_tiles_in="], "exclude_tiles_in", ""),
])
def test_allowed_values_are_normalised(script, argv, key, expected):
    value = getattr(load_config(argv, script, "mse" if script == "training" else None), key)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("key, value, expected", [("learning_rate", 1, 1.0), ("keep_freed_memory", "off", False),
                                                  ("cache_tiles", True, True), ("mixed_precision", "BF16", "bf16")])
def test_config_values_are_normalised(monkeypatch, key, value, expected):
    monkeypatch.setattr(Config, key, value)
    normal = getattr(load_config([], "training", "mse"), key)
    assert normal == expected and type(normal) is type(expected)


@pytest.mark.parametrize("script, args, message", [
    ("Training_MSE.py", ["--learning_rate=nan"], "error: --learning_rate=nan: expected a finite number (float) above 0"),
    ("Prepare_Tiles.py", ["--slide_path=slide.png", "--tile_stride=0"],
     "error: --tile_stride=0: expected a whole number (int) from 1 to 65536"),
])
def test_scripts_check_settings_before_work(run_script, tmp_path, script, args, message):
    result = run_script(script, *args, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert one_error_line(result) == message
    assert list(tmp_path.iterdir()) == []


# --- run_main's exit codes ---------------------------------------------------------------------------------

def run_python(code, **kwargs):
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=script_env(), stdin=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)


def raising(error):
    def main():
        raise error
    return main


def interrupt(signum=None):
    error = KeyboardInterrupt()
    if signum is not None:
        error.signum = signum
    return error


@pytest.mark.parametrize("error, code, line", [
    (UserError("bad thing: do this"), 2, "error: bad thing: do this"),
    (interrupt(), 130, "interrupted"),
    (interrupt(signal.SIGINT), 130, "interrupted"),
    (interrupt(signal.SIGTERM), 143, "interrupted"),
])
def test_run_main_exit_codes(capsys, error, code, line):
    with pytest.raises(SystemExit) as info:
        cli.run_main(raising(error))
    assert info.value.code == code
    assert capsys.readouterr().err == line + "\n"


def test_ctrl_c_is_one_line_and_130():
    process = run_python("import os, signal\nfrom core import cli\n"
                         "cli.run_main(lambda: os.kill(os.getpid(), signal.SIGINT))", stdout=subprocess.DEVNULL)
    assert process.wait(timeout=120) == 130
    assert process.stderr.read() == "interrupted\n"


def read_one_line_then_close(process):
    first = process.stdout.readline()
    process.stdout.close()  # as `| head -1` does
    return first, process.wait(timeout=300), process.stderr.read()


def test_stdout_closed_by_its_reader_is_a_quiet_exit():
    process = run_python("from core import cli\n"
                         "cli.run_main(lambda: [print(i) for i in range(10**6)])", stdout=subprocess.PIPE)
    first, code, errors = read_one_line_then_close(process)
    assert first == "0\n"
    assert (code, errors) == (141, "")


def test_evaluation_piped_into_head(tmp_path, make_tiles):
    """python Evaluation_SSIM.py | head -1: before, a BrokenPipeError traceback and exit 1."""
    make_tiles(tmp_path / "tiles", [f"t{i}.png" for i in range(4)], size=64)
    process = subprocess.Popen(
        [sys.executable, str(REPO / "Evaluation_SSIM.py"), "--folder_path_test=tiles", "--tile_size=64",
         f"--model_path_ssim={REPO / 'sample_models' / 'model_auto_encoder_reconstruction_ssim.pth'}",
         "--recon_output_ssim=out/", "--reconstruction_metrics_ssim=out/metrics.xlsx", "--GPUs=cpu",
         "--num_workers=0"], cwd=tmp_path, env=script_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    first, code, errors = read_one_line_then_close(process)
    assert first.startswith("Evaluating ")
    assert code == 141
    assert "Traceback" not in errors and "Error" not in errors, errors


def test_a_broken_pipe_elsewhere_is_not_hidden():
    """Only stdout's reader going away is quiet: a BrokenPipeError from another pipe (a loader worker's)
    still shows, while stdout is open."""
    process = run_python("from core import cli\n"
                         "def main():\n"
                         "    raise BrokenPipeError(32, 'Broken pipe')\n"
                         "cli.run_main(main)", stdout=subprocess.PIPE)
    code = process.wait(timeout=120)
    assert code == 1 and "BrokenPipeError" in process.stderr.read()
