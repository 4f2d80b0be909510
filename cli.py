"""Command-line plumbing shared by the scripts: Config overrides, one-line errors, device choice."""
import ast
import os
import sys
import types

import torch


class UserError(Exception):
    """A problem the user can fix (bad path, bad file, bad setting): printed as one line, exit code 2."""


def _config_values(module):
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and not isinstance(v, (types.ModuleType, types.FunctionType, type))}


def _parse_bool(text):
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError


def _coerce(key, text, default):
    """Turn the text of --key=value into the type of the Config default, or raise UserError."""
    kind = type(default)
    try:
        if kind is bool:
            return _parse_bool(text)
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is str:
            return text
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise UserError(f"--{key}={text}: expected a value of type {kind.__name__} (Config default: {default!r})")
    if default is not None and not isinstance(value, kind):
        raise UserError(f"--{key}={text}: expected a value of type {kind.__name__} (Config default: {default!r})")
    return value


def load_config(argv=None):
    """Config.py as a namespace, with --key=value overrides from argv applied and type-checked."""
    import Config
    values = _config_values(Config)
    argv = sys.argv[1:] if argv is None else argv
    for arg in argv:
        if arg in ("-h", "--help"):
            print("Every Config.py value can be overridden as --key=value. Current values:")
            for key, value in values.items():
                print(f"  --{key}={value}")
            sys.exit(0)
        if not arg.startswith("--") or "=" not in arg:
            raise UserError(f"unrecognised argument {arg!r}: use --key=value with a key from Config.py "
                            f"({', '.join(values)})")
        key, text = arg[2:].split("=", 1)
        if key not in values:
            raise UserError(f"unknown Config key {key!r}; valid keys: {', '.join(values)}")
        values[key] = _coerce(key, text, values[key])
    return types.SimpleNamespace(**values)


def run_main(main):
    """Run main(); a UserError becomes one line on stderr and exit code 2, Ctrl-C exit code 130."""
    # A file name the terminal's encoding cannot show (bytes from another system) must not crash a
    # progress message: show it escaped, as stderr already does.
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def gpu_ids(gpus):
    """Parse Config.GPUs ("0", "2,3", "cpu") into a list of ints; [] means CPU."""
    text = str(gpus).strip().lower()
    if text in ("", "cpu", "none"):
        return []
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"GPUs={gpus!r}: use GPU ids such as \"0\" or \"2,3\", or \"cpu\"")


def select_device(gpus, local_rank=0):
    """The torch.device for this process: the local_rank-th listed GPU, or the CPU (said once)."""
    ids = gpu_ids(gpus)
    if not ids:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if os.environ.get("AE_CPU_NOTICE_SHOWN") != "1":
            print(f"CUDA is not available; running on the CPU (GPUs={gpus!r} ignored).")
            os.environ["AE_CPU_NOTICE_SHOWN"] = "1"
        return torch.device("cpu")
    count = torch.cuda.device_count()
    gpu = ids[local_rank % len(ids)]
    if gpu >= count:
        raise UserError(f"GPUs={gpus!r}: GPU {gpu} does not exist; this machine has {count} (ids 0..{count - 1})")
    torch.cuda.set_device(gpu)
    return torch.device("cuda", gpu)


def worker_count(requested):
    """Loader processes to start: num_workers from Config, but no more than the CPUs this process may use
    (more only add start-up time and memory)."""
    if requested < 0:
        raise UserError(f"num_workers={requested} must be 0 or more")
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows
        cpus = os.cpu_count() or 1
    return min(requested, cpus)


def autocast_dtype(device):
    """bf16 where the GPU supports it, else fp16 (with a GradScaler); None means fp32 (CPU)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def check_writable(folder):
    """Create folder if needed and prove a file can be written there, before any work starts."""
    folder = folder or "."
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write_test_{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        # "File exists" or "Not a directory" alone hides the cause: a file where a folder must go.
        existing = os.path.abspath(folder)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        reason = f"{existing} is a file" if os.path.isfile(existing) else err.strerror
        raise UserError(f"cannot write to output folder {folder!r} ({reason}): "
                        "choose another folder or fix its permissions")
