"""Several processes of one run: the distributed set-up of each (Distributed: rank, world, device, the
collective ops) and the built-in launcher (spawn), which starts one process per listed GPU when plain
`python Training_*.py` is given several GPUs, as torchrun would.
"""
import contextlib
import multiprocessing
import os
import signal
import time
from multiprocessing.connection import wait

import torch
import torch.distributed as dist

from core.devices import launch_slot, select_device
from core.devices import precision_name  # noqa: F401 (the notebook imports it from here)
from core.signals import STOP_SIGNALS

_FAILED_GRACE_SECONDS = 30  # after one process fails, how long the others may take to stop before SIGKILL


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
