"""Command-line plumbing shared by the scripts: the Config.py settings each script reads (from the table in
core/settings.py), their --key=value overrides and checks, --help, and the exit codes of run_main."""
import atexit
import math
import os
import signal
import sys
import threading
import traceback
import time
import types

from core import losses
from core import malloc_tuning
from core import settings
from core import signals
from core import streams
from core.errors import RankError, UserError, exhausted
from core.settings import PATH, Rule, descriptions  # noqa: F401 (also cli's names, as before the table)


QUIET_RANK_EXIT_DELAY = 5.0  # seconds a process that does not report a UserError waits before exiting
SETTINGS = settings.table()  # every Config key: its rule, the scripts that read it, its meaning
RULES = {key: setting.rule for key, setting in SETTINGS.items()}


def _read_by(script):
    """The keys script reads whatever its loss: the shared ones, and a loss's key it reads besides that loss's
    own script (Extract_Features.py's model_path_ssim)."""
    of_its_loss = {key for record in losses.RECORDS for key in record.keys(script)}
    return [key for key, setting in SETTINGS.items() if script in setting.scripts and key not in of_its_loss]


# The Config keys each script reads, besides the keys of its loss (losses.KEY_STEMS). A key given on the command
# line that the script does not read is an error, not a warning: a silently ignored key evaluates the wrong
# model (Evaluation_MSE.py --model_path_ssim=... would report the MSE model's metrics, exit 0).
SCRIPT_KEYS = {script: _read_by(script) for script in settings.SCRIPTS}
SCRIPT_FILES = settings.SCRIPTS
LOSS_NAMES = losses.NAMES
_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _parse(rule, text):
    """The value of --key=text as rule's kind, ValueError if it is not one (_check then checks the value)."""
    if rule.kind is bool:
        if text.strip().lower() not in _WORDS:
            raise ValueError
        return _WORDS[text.strip().lower()]
    if rule.kind in (int, float):
        return rule.kind(text)
    return text


def _check(rule, value):
    """value if rule allows it, normalised (an int for a float key becomes a float; a choice or switch word
    loses case and spaces); ValueError otherwise. The same check for Config.py and command-line values."""
    word = value.strip().lower() if isinstance(value, str) else None
    if isinstance(rule.kind, tuple) and word in rule.kind:
        return word
    if rule.kind == "switch" and (isinstance(value, bool) or word == "auto" or word in _WORDS):
        return value if isinstance(value, bool) else "auto" if word == "auto" else _WORDS[word]
    if rule.kind is bool and isinstance(value, bool):
        return value
    if rule.kind is str and isinstance(value, str) and "\0" not in value:
        return value
    if rule.kind == "path" and isinstance(value, str) and value.strip() and "\0" not in value:
        return value
    numbers = (int, float) if rule.kind is float else (int,)
    if rule.kind not in numbers or isinstance(value, bool) or not isinstance(value, numbers):
        raise ValueError
    value = rule.kind(value)
    too_low = (rule.low is not None and value < rule.low) or (rule.above is not None and value <= rule.above)
    too_high = (rule.high is not None and value > rule.high) or (rule.below is not None and value >= rule.below)
    if not math.isfinite(value) or too_low or too_high:
        raise ValueError
    return value


def _config_values(module):
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and not isinstance(v, (types.ModuleType, types.FunctionType, type))}


def script_keys(script=None, loss=None):
    """The Config keys script reads (one of SCRIPT_KEYS; every key for None); loss None means both losses."""
    if script is None:
        return set(RULES)
    if script not in SCRIPT_KEYS or loss not in (None, *LOSS_NAMES):
        raise ValueError(f"script={script!r}, loss={loss!r}: script is one of {', '.join(SCRIPT_KEYS)}, "
                         f"loss one of {', '.join(LOSS_NAMES)} or None")
    records = [losses.get(loss)] if loss else losses.RECORDS
    return set(SCRIPT_KEYS[script]).union(*(record.keys(script) for record in records))


def script_name(script=None, loss=None):
    """How messages name the script: its file (Training_MSE.py); the program's name without a script."""
    if script is None:
        return os.path.basename(sys.argv[0]) or "python"
    return SCRIPT_FILES[script].format(LOSS=losses.get(loss).tag if loss else "/".join(
        record.tag for record in losses.RECORDS))


def help_text(config, keys, values, name):
    """--help: the keys name reads in Config.py's order and sections, with their values and meanings (the
    table's, as plain text)."""
    headings = descriptions(config.__file__)
    shown = [f"--{key}={values[key]}" for key in keys]
    width = min(40, max(map(len, shown), default=0))
    lines = [f"usage: python {name} [--key=value ...]", "",
             f"The settings {name} reads. Their values come from Config.py; each can be overridden for one run "
             "as --key=value."]
    section = None
    for key, text in zip(keys, shown):
        heading = headings.get(key, ("", ""))[0]
        description = settings.plain(SETTINGS[key].doc)
        if heading != section:
            lines += ["", heading or "Other"]
            section = heading
        lines.append(f"  {text:<{width}}  {description}".rstrip())
    return "\n".join(lines)


def _argument_error(arg, values, keys, name):
    """The UserError for a command-line argument that is not --key=value with a key name reads."""
    valid = ", ".join(keys)
    if not arg.startswith("--") or "=" not in arg:
        return UserError(f"unrecognised argument {arg!r}: use --key=value with a key from Config.py ({valid})")
    key = arg[2:].split("=", 1)[0]
    if key not in values:
        return UserError(f"unknown Config key {key!r}; valid keys: {valid}")
    stem, _, loss = key.rpartition("_")
    twins = [f"{stem}_{other}" for other in LOSS_NAMES if loss in LOSS_NAMES and f"{stem}_{other}" in keys]
    hint = f" (did you mean --{twins[0]}?)" if twins else ""
    return UserError(f"--{key} is not read by {name}{hint}; python {name} --help lists the settings it reads")


def import_config():
    """The Config module. A Config.py that is missing, or that fails to run (a syntax error, an undefined
    name), is one UserError naming the file and the line, instead of a traceback."""
    try:
        import Config
    except SyntaxError as err:
        raise UserError(f"{err.filename or 'Config.py'} line {err.lineno}: {err.msg}: fix that line "
                        "(each setting is name = value)") from None
    except ModuleNotFoundError as err:
        if err.name != "Config":
            raise
        home = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        raise UserError(f"Config.py not found in {home}: restore it from the repository") from None
    except Exception as err:  # whatever its code raised while it ran
        frames = [f for f in traceback.extract_tb(err.__traceback__) if os.path.basename(f.filename) == "Config.py"]
        where = f"{frames[-1].filename} line {frames[-1].lineno}" if frames else "Config.py"
        raise UserError(f"{where}: {type(err).__name__}: {err}: fix that line") from None
    return Config


def load_config(argv=None, script=None, loss=None):
    """The Config.py settings script reads (see SCRIPT_KEYS; all of them for None) as a namespace, with the
    --key=value overrides of argv (default sys.argv[1:]) applied. Every value, from Config.py or the command
    line, is checked against RULES first: a UserError names the key, its value and what is allowed.
    --help (or -h) prints the settings and exits."""
    Config = import_config()
    values, wanted, name = _config_values(Config), script_keys(script, loss), script_name(script, loss)
    missing = sorted(wanted - set(values))
    if missing:
        raise UserError(f"Config.py has no setting {missing[0]!r} (read by {name}): restore its line")
    keys = [key for key in values if key in wanted]
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(help_text(Config, keys, values, name))
        sys.exit(0)
    given = {}
    for arg in argv:
        key, equals, text = arg[2:].partition("=")
        if not arg.startswith("--") or not equals or key not in keys:
            raise _argument_error(arg, values, keys, name)
        given[key] = text
    settings = {}
    for key in keys:
        rule = RULES[key]
        try:
            settings[key] = _check(rule, _parse(rule, given[key]) if key in given else values[key])
        except (ValueError, OverflowError):  # OverflowError: an int too large for a float
            where = f"--{key}={given[key]}" if key in given else f"{key} = {values[key]!r} in Config.py"
            raise UserError(f"{where}: expected {rule.allowed()}") from None
    return types.SimpleNamespace(**settings)


def exhausted_line(kind, reason, cfg=None):
    """The one line for a run that found the machine out of kind (errors.exhausted): what to lower or raise."""
    if kind == "shared memory":
        return (f"the loader processes ran out of shared memory ({reason}): give the container more (docker run "
                "--shm-size=2g) or pass --num_workers=0")
    if kind == "open files":
        return f"too many open files ({reason}): raise the limit (ulimit -n 4096) or pass --num_workers=0"
    values = vars(cfg) if cfg is not None else {}
    knobs = [f"{key} (now {values[key]})" for key in ("batch_size_train", "batch_size_test", "tile_size",
                                                      "num_workers") if key in values]
    lower = f"lower {', '.join(knobs[:-1])} or {knobs[-1]}" if len(knobs) > 1 else "free memory for it"
    return f"out of memory ({reason}): {lower}, or run where more memory is available"


def run_main(main, script=None, loss=None, argv=None):
    """A script's entry point. With script, main(cfg) gets load_config(argv, script, loss), after the
    process-wide malloc switch Config.keep_freed_memory was applied (malloc_tuning.apply); without, main().

    Exit codes: a UserError is one line `error: ...` on stderr (under torchrun from local rank 0 only),
    exit 2; an interrupt (KeyboardInterrupt, with the signal number as its signum attribute when a stop
    signal caused it) is the line `interrupted`
    (unless the interrupt says it was reported already), exit 128 + the signal (130 for Ctrl-C, 143 for SIGTERM,
    129 for SIGHUP); stdout closed by its reader (`| head`) is a quiet exit 141, the status of a program
    ended by SIGPIPE: not 0, since the work stopped unfinished, while a plain pipeline still reports head's
    status. Any other failure of stdout or stderr (closed, a full disk) drops their output and the work goes
    on (streams.guard). Running out of memory, shared memory or open files is one line `error: ...` saying
    what to lower or raise, exit 2."""
    streams.guard()
    # A file name the terminal's encoding cannot show (bytes from another system) must not crash a
    # progress message: show it escaped, as stderr already does.
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    cfg = None
    try:
        with signals.stop_signals_interrupt():
            if script is None:
                main()
            else:
                cfg = load_config(argv, script, loss)
                malloc_tuning.apply(cfg.keep_freed_memory)
                main(cfg)
            sys.stdout.flush()  # a reader gone while the last lines were buffered shows here, not at exit
    except UserError as err:
        # Under torchrun every process meets the same problem: the first process of each machine alone
        # reports it (one line on one machine; a folder missing on one machine of several is still named),
        # unless it is one of this process alone (a RankError: its GPU).
        if os.environ.get("LOCAL_RANK", "0") == "0" or isinstance(err, RankError):
            print(f"error: {err}", file=sys.stderr)
        else:  # the other processes meet it too: exiting first, one would have torchrun stop the first process
            time.sleep(QUIET_RANK_EXIT_DELAY)  # before it said why
        sys.exit(2)
    except KeyboardInterrupt as err:
        if threading.current_thread() is threading.main_thread():
            atexit.register(signals.ignore_stop_signals)  # runs before the exit hooks registered earlier
        if not getattr(err, "reported", False):  # training has already said where it saved the run
            print("interrupted", file=sys.stderr)
        sys.exit(128 + int(getattr(err, "signum", signal.SIGINT)))
    except BrokenPipeError:
        if not streams.reader_gone():
            raise
        streams.discard()  # else Python would report the failed flush of stdout once more at exit
        sys.exit(141)
    except (MemoryError, RuntimeError, OSError) as err:
        found = exhausted(err)
        if found is None:
            raise
        print(f"error: {exhausted_line(*found, cfg)}", file=sys.stderr)
        sys.exit(2)


# ---- The scripts' entry points: cli imports the engines, never the reverse ----------------------------------
# The engines are imported inside these functions: the other scripts, which import cli too, need neither.

def training_main(loss_name):
    """Training_<NAME>.py: train with loss_name (a name in losses.RECORDS) as Config.py and the command line
    say, in this process or in one process per listed GPU (launch_training)."""
    streams.keep_going_without_stdout()
    run_main(lambda cfg: launch_training(loss_name, sys.argv[1:]), "training", loss_name)


def launch_training(loss_name, argv, processes=None):
    """Train in this process, or start one process per listed GPU (runtime.spawn). processes overrides the
    count (tests use 2 CPU processes)."""
    cfg = load_config(argv, "training", loss_name)
    import torch
    from core import devices, runtime, training_engine
    if "WORLD_SIZE" in os.environ:  # started by torchrun
        return training_engine.train(cfg, loss_name)
    if processes is None:
        processes = len(devices.gpu_ids(cfg.GPUs)) if torch.cuda.is_available() else 1
    if processes <= 1:
        return training_engine.train(cfg, loss_name)
    streams.say(f"Starting {processes} training processes (DistributedDataParallel).")
    if any(runtime.spawn(processes, _training_worker, (loss_name, argv))):
        raise UserError("a training process failed (its message is above); fix it and run the same command "
                        "again to resume")


def _training_worker(loss_name, argv):
    """Entry point of one process started by runtime.spawn: as training_main, but an interrupt only sets the
    exit code (the launching process reports it)."""
    from core import training_engine
    streams.keep_going_without_stdout()

    def quietly_interrupted(cfg):
        try:
            training_engine.train(cfg, loss_name)
        except KeyboardInterrupt as interrupt:
            sys.exit(128 + getattr(interrupt, "signum", 2))
    run_main(quietly_interrupted, "training", loss_name, argv)


def evaluation_main(loss_name):
    """Evaluation_<NAME>.py: evaluate the model of loss_name (a name in losses.RECORDS) as Config.py and the
    command line say."""
    from core import evaluation_engine
    run_main(lambda cfg: evaluation_engine.evaluate(cfg, loss_name), "evaluation", loss_name)
