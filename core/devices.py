"""Where the work runs and in what precision: the device of this process (its GPU from Config.GPUs and the
launcher's LOCAL_RANK, or the CPU), the CPUs it may use, and the precision policy (autocast dtype, memory
layout of the training network).

Under torchrun each process takes the GPU of its LOCAL_RANK (among the GPUs CUDA_VISIBLE_DEVICES leaves
visible) unless Config.GPUs lists one GPU per process.
"""
import os

import torch

from core.errors import RankError, UserError
from core.streams import say

PRECISIONS = ("auto", "bf16", "fp16", "off")
_said_cpu = False


def gpu_ids(gpus):
    """Parse Config.GPUs ("0", "2,3", "cpu") into a list of ints; [] means CPU."""
    text = str(gpus).strip().lower()
    if text in ("", "cpu", "none"):
        return []
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"GPUs={gpus!r}: use GPU ids such as \"0\" or \"2,3\", or \"cpu\"")
    if len(set(ids)) < len(ids) or min(ids) < 0:
        raise UserError(f"GPUs={gpus!r}: list each GPU once, by its id (0, 1, ...)")
    return ids


def launch_slot():
    """(local rank, processes on this node) from torchrun's or spawn()'s environment; (0, 1) otherwise."""
    return int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def _gpu_for(gpus, ids, local_rank, local_world):
    """Which listed GPU this process takes: one listed GPU per process, or with the default single "0",
    the GPU of its LOCAL_RANK (torchrun's own assignment)."""
    if len(ids) == local_world:
        return ids[local_rank]
    if ids == [0]:
        return local_rank
    raise UserError(f"GPUs={gpus!r} lists {len(ids)} GPU(s) but {local_world} training processes were started "
                    f"on this node (torchrun --nproc_per_node={local_world}): list {local_world} GPU ids, or set "
                    "GPUs=\"0\" to give each process the GPU of its LOCAL_RANK")


def select_device(gpus, local_rank=None, local_world=None):
    """The torch.device of this process: its GPU (see _gpu_for), or the CPU (said once). local_rank and
    local_world default to the launcher's environment (launch_slot)."""
    global _said_cpu
    env_rank, env_world = launch_slot()
    local_rank = env_rank if local_rank is None else local_rank
    local_world = env_world if local_world is None else local_world
    ids = gpu_ids(gpus)
    if not ids:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if not _said_cpu and local_rank == 0:
            say(f"CUDA is not available; running on the CPU (GPUs={gpus!r} ignored).")
        _said_cpu = True
        return torch.device("cpu")
    gpu = _gpu_for(gpus, ids, local_rank, local_world)
    count = torch.cuda.device_count()
    if gpu >= count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        raise RankError(f"GPUs={gpus!r}, LOCAL_RANK={local_rank}: GPU {gpu} does not exist; this machine shows "
                        f"{count} GPU(s){where}, ids 0..{count - 1}")
    torch.cuda.set_device(gpu)
    return torch.device("cuda", gpu)


def cpu_count():
    """CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows
        return os.cpu_count() or 1


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
        if on_gpu and not torch.cuda.is_bf16_supported(including_emulation=False):
            raise UserError(f"mixed_precision='bf16': {torch.cuda.get_device_name(device)} has no bf16; "
                            "use 'fp16', 'auto' or 'off'")
        return torch.bfloat16
    if on_gpu:
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.bfloat16 if training and device.type == "cpu" and cpu_has_native_bf16() else None


# Memory format of the training network and its batches, on every device and in every precision: on GPUs, on
# CPUs with native bf16, and in fp32 on AVX2 CPUs (where a 256-px step at batch 16 took 0.65 times as long
# as in the contiguous format, a 64-px one 0.8 times) oneDNN's and cuDNN's channels_last kernels are faster.
TRAINING_LAYOUT = torch.channels_last


def autocast(device_type, amp_dtype):
    """torch.autocast to amp_dtype, or a no-op context for None (fp32): the one way every script enters it."""
    return torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None)


def precision_name(amp_dtype):
    """How logs and workbooks name the precision autocast_dtype chose."""
    return "fp32" if amp_dtype is None else {torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
