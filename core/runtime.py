"""Where and how the work runs: device choice, loader processes, precision policy, several processes.

One process per GPU. Under torchrun each process takes the GPU of its LOCAL_RANK (among the GPUs
CUDA_VISIBLE_DEVICES leaves visible) unless Config.GPUs lists one GPU per process; plain
`python Training_*.py` with several GPUs listed starts one process per listed GPU itself (spawn()).
"""
import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import wait

import torch
import torch.distributed as dist

from core import streams
from core.errors import RankError, UserError

PRECISIONS = ("auto", "bf16", "fp16", "off")
_FAILED_GRACE_SECONDS = 30  # after one process fails, how long the others may take to stop before SIGKILL
_said_cpu = False


def say(*parts):
    """print() to stdout, flushed (a failing stdout is handled by streams.guard)."""
    print(*parts, flush=True)


def keep_going_without_stdout():
    """Training must not stop (without its checkpoint) because of its own output: stdout's reader gone
    (`python Training_MSE.py | head -1`), stdout or stderr closed or on a full disk. From then on that
    output goes nowhere."""
    streams.guard(keep_going_without_stdout=True)


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


def worker_count(requested):
    """Loader processes to start: num_workers from Config, but no more than the CPUs this process may use
    (more only add start-up time and memory), nor than the open-file limit allows (open_file_share)."""
    if requested < 0:
        raise UserError(f"num_workers={requested} must be 0 or more")
    return open_file_share(min(requested, cpu_count()))


_FILES_BASE, _FILES_PER_WORKER = 16, 6  # open files of this process, and the pipes and batches of each worker
_said_files = False


def open_file_share(workers):
    """How many of workers loader processes the open-file limit (ulimit -n) leaves room for, raising the limit
    to its ceiling first where that helps (any process may). Too few files for a worker's batches make it fail
    in a thread whose error is only printed, and the run waits forever; fewer workers are said once."""
    global _said_files
    try:
        import resource
    except ImportError:  # Windows: no such limit
        return workers
    need = _FILES_BASE + _FILES_PER_WORKER * workers
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if workers == 0 or soft == resource.RLIM_INFINITY or soft >= need:
        return workers
    if hard == resource.RLIM_INFINITY or hard > soft:
        soft = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    allowed = max(0, min(workers, (soft - _FILES_BASE) // _FILES_PER_WORKER))
    if allowed < workers and not _said_files and launch_slot()[0] == 0:
        say(f"warning: the open-file limit ({soft}, ulimit -n) is too low for {workers} loader processes: using "
            f"{allowed}; raise it (ulimit -n 4096) to use num_workers={workers}")
        _said_files = True
    return allowed


def cpu_count():
    """CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows
        return os.cpu_count() or 1


# The signals that stop a run as Ctrl-C does (an interrupt checkpoint in training, the line `interrupted`, exit
# 128 + the signal): Ctrl-C, a scheduler's SIGTERM, and SIGHUP (the terminal closed, the ssh session dropped).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def interrupts_blocked():
    """The stop signals wait while loader workers start (iter(loader)): the workers start with them
    blocked, and ignore them from worker_init_fn on (ignore_interrupts)."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def loader_start_method():
    """How loader processes start: forked where possible, also in processes runtime.spawn started (which would
    otherwise spawn them too, each importing torch anew)."""
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else None


def ignore_interrupts(worker_id=None):
    """DataLoader worker_init_fn: Ctrl-C and a scheduler's SIGTERM reach the whole process group; the loader
    workers leave them to the main process, which stops cleanly and then shuts them down."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    threading.excepthook = _quiet_once_main_is_gone
    sys.excepthook = _quiet_thread_excepthook(sys.excepthook)


def _main_is_gone(exc_type):
    return issubclass(exc_type, (ConnectionError, EOFError))


def _quiet_once_main_is_gone(args):
    """A worker's fd-passing thread loses its connection when the interrupted main process stops mid-batch:
    not worth a traceback on the user's terminal."""
    if not _main_is_gone(args.exc_type):
        threading.__excepthook__(args)


def _quiet_thread_excepthook(hook):
    """The same for multiprocessing's resource sharer, whose serving thread reports through sys.excepthook."""
    def excepthook(exc_type, value, traceback):
        if threading.current_thread() is threading.main_thread() or not _main_is_gone(exc_type):
            hook(exc_type, value, traceback)
    return excepthook


def stop_loader_workers(*loaders):
    """End the persistent loader processes now. Left to the end of the process, they would be sent SIGTERM,
    which they ignore (ignore_interrupts), and the process would wait for them forever."""
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)  # where DataLoader keeps its persistent workers' iterator
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


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


def training_layout(device, amp_dtype):
    """Memory format of the training network and its batches: channels_last where it is faster (GPUs, and
    bf16 on CPUs), plain contiguous for fp32 on a CPU, where oneDNN's channels_last convolutions and their
    backward passes on AVX2 take longer than the contiguous ones."""
    if torch.device(device).type == "cpu" and amp_dtype is None:
        return torch.contiguous_format
    return torch.channels_last


def autocast(device_type, amp_dtype):
    """torch.autocast to amp_dtype, or a no-op context for None (fp32): the one way every script enters it."""
    return torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None)


def precision_name(amp_dtype):
    """How logs and workbooks name the precision autocast_dtype chose."""
    return "fp32" if amp_dtype is None else {torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]


class Distributed:
    """Rank, world size, device and the collective ops; a single process is rank 0 of 1. Decisions every
    process must take together (stop now, skip a short batch) go over the CPU (gloo), so taking them
    never waits for the GPU."""

    def __init__(self, cfg):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank, _ = launch_slot()
        self.device = select_device(cfg.GPUs)
        self.cpu_group = None
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            if self.device.type == "cuda":
                self.cpu_group = dist.new_group(backend="gloo")

    @property
    def main(self):
        return self.rank == 0

    def wrap(self, model, compile_model=False):
        """The model as training calls it: under DistributedDataParallel with several processes, compiled if asked."""
        if self.world > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return torch.compile(model) if compile_model else model

    def sum(self, tensor):
        """Sum of a tensor over all processes (the tensor itself in one process)."""
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def any(self, *flags):
        """For each bool: whether it is True in any process."""
        if self.world == 1:
            return flags
        votes = torch.tensor([int(flag) for flag in flags], dtype=torch.int32)
        dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return tuple(bool(vote) for vote in votes.tolist())

    def gather(self, obj):
        """Every process's obj, in rank order (picklable objects, through the CPU)."""
        if self.world == 1:
            return [obj]
        gathered = [None] * self.world
        dist.all_gather_object(gathered, obj, group=self.cpu_group)
        return gathered

    def barrier(self):
        if self.world > 1:
            dist.barrier(group=self.cpu_group)

    def close(self):
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def _environment(**values):
    saved = dict(os.environ)
    os.environ.update({key: str(value) for key, value in values.items()})
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def spawn(processes, target, args):
    """Run target(*args) in `processes` new processes on this machine, ranks 0..processes-1, as torchrun
    would. A stop signal (STOP_SIGNALS) to this process is passed on to every process (a process reached twice, by
    a signal to the whole group, acts on the first); each finishes its step and saves, and this process
    then raises KeyboardInterrupt with that signal's signum. Returns the processes' exit codes."""
    store = dist.TCPStore("127.0.0.1", 0, processes, is_master=True, wait_for_workers=False)
    signals = {s for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    received, children = [], []

    def forward(signum, frame):
        received.append(signum)
        for child in children:
            if child.exitcode is None:
                os.kill(child.pid, received[0])

    # Blocked while the processes start, so that they start with them blocked too: a signal during their
    # start-up waits until training has its handler (Interrupts.installed) instead of killing them.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    previous = {s: signal.signal(s, forward) for s in signals}
    context = multiprocessing.get_context("spawn")
    try:
        for rank in range(processes):
            with _environment(MASTER_ADDR="127.0.0.1", MASTER_PORT=store.port, TORCHELASTIC_USE_AGENT_STORE=True,
                              WORLD_SIZE=processes, RANK=rank, LOCAL_RANK=rank, LOCAL_WORLD_SIZE=processes):
                children.append(context.Process(target=target, args=args))
                children[-1].start()
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if received:  # came while they started (through another thread of this process): tell them all
            forward(received[0], None)
        codes = _wait_for(children, received)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for s, handler in previous.items():
            signal.signal(s, handler)
    ended_by = [code - 128 if code > 0 else -code for code in codes if code > 128 or code < 0]  # 128 + n, or -n
    signum = received[0] if received else next((s for s in ended_by if s in signals), None)
    if signum is not None and any(codes):
        interrupt = KeyboardInterrupt()
        interrupt.signum = signum
        raise interrupt
    return codes


def _wait_for(children, received):
    """Wait until every child has ended; when one fails, give the others time to stop, then kill them."""
    failed_at = None
    while any(child.exitcode is None for child in children):
        wait([child.sentinel for child in children if child.exitcode is None], timeout=1.0)
        if failed_at is None and not received and any(child.exitcode not in (None, 0) for child in children):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > _FAILED_GRACE_SECONDS:
            for child in children:
                if child.exitcode is None:
                    child.kill()
    return [child.exitcode for child in children]
