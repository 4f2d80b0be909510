"""Command-line plumbing shared by the scripts: Config overrides, one-line errors, device choice."""
import ast
import ctypes
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
    return min(requested, cpu_count())


def cpu_count():
    """CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows
        return os.cpu_count() or 1


PRECISIONS = ("auto", "bf16", "fp16", "off")


def cpu_has_native_bf16():
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX): only then is bf16 faster than fp32."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN, or one that renamed the check
        return False


def precision_mode(mode):
    """Config.mixed_precision, normalised and checked (a UserError names the choices)."""
    normal = str(mode).strip().lower()
    if normal not in PRECISIONS:
        raise UserError(f"mixed_precision={mode!r}: use one of {', '.join(repr(p) for p in PRECISIONS)}")
    return normal


def autocast_dtype(device, mode="auto", training=False):
    """The torch.autocast dtype for Config.mixed_precision on device; None means plain fp32.

    "auto": on CUDA, bf16 where the GPU supports it, else fp16 (training adds a GradScaler); on a CPU,
    bf16 for training when the CPU computes bf16 natively, and fp32 for inference, so that metric
    workbooks and features are the same on every CPU. "bf16" / "fp16" force one everywhere (fp16 only
    on CUDA); "off" is fp32. Weights, optimiser state, losses and metrics stay fp32 in every mode."""
    mode = precision_mode(mode)
    on_gpu = device.type == "cuda"
    if mode == "off":
        return None
    if mode == "fp16":
        if not on_gpu:
            raise UserError("mixed_precision='fp16' needs a CUDA GPU; on the CPU use 'bf16', 'auto' or 'off'")
        return torch.float16
    if mode == "bf16":
        if on_gpu and not torch.cuda.is_bf16_supported():
            raise UserError(f"mixed_precision='bf16': {torch.cuda.get_device_name(device)} has no bf16; "
                            "use 'fp16', 'auto' or 'off'")
        return torch.bfloat16
    if on_gpu:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if training and device.type == "cpu" and cpu_has_native_bf16() else None


def autocast(device_type, amp_dtype):
    """torch.autocast to amp_dtype, or a no-op context for None (fp32): the one way every script enters it."""
    return torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None)


def precision_name(amp_dtype):
    """How logs and workbooks name the precision autocast_dtype chose."""
    return "fp32" if amp_dtype is None else {torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
