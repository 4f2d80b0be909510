"""Command-line plumbing shared by the scripts: Config overrides, one-line errors."""
import ast
import ctypes
import os
import sys
import types


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


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the kernel.

    A forward pass allocates and frees tensors of several MB many times per batch. By default glibc
    returns most of them to the kernel, and each reuse page-faults the memory back in: on a 2-core CPU
    that made inference and training about 15% slower (README, Performance). With these settings the
    process keeps its peak heap for its lifetime. Skipped off glibc, when KEEP_FREED_MEMORY=0, and when
    the user has tuned malloc already (GLIBC_TUNABLES, MALLOC_*_ variables, or LD_PRELOAD of another
    allocator). True if applied.
    """
    if not sys.platform.startswith("linux") or os.environ.get("KEEP_FREED_MEMORY", "1") == "0":
        return False
    if any(key in os.environ for key in ("GLIBC_TUNABLES", "LD_PRELOAD")) or any(
            key.startswith("MALLOC_") and key.endswith("_") for key in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    # Blocks above 32 MB (the largest threshold glibc accepts) still come from mmap and go back at once.
    # Trimming off (-1): the heap never shrinks. A 1 GB top pad: the heap grows in large steps; 256 MB
    # gave back only half of the gain in the measurement.
    return all(mallopt(option, value) == 1 for option, value in (
        (_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, -1), (_M_TOP_PAD, 1 << 30)))


def run_main(main, keep_memory=True):
    """Run main(); a UserError becomes one line on stderr and exit code 2, Ctrl-C exit code 130.
    Before it, malloc is set to keep freed memory (keep_freed_memory) unless keep_memory is False."""
    if keep_memory:
        keep_freed_memory()
    # A file name the terminal's encoding cannot show (bytes from another system) must not crash a
    # progress message: show it escaped, as stderr already does.
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as err:
        print("interrupted", file=sys.stderr)
        sys.exit(128 + getattr(err, "signum", 2))


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
