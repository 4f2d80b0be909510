"""The loader processes of this project: how many (worker_count), how they start and what they do with a stop
signal, and the one way it builds a torch DataLoader over tiles: training, validation, evaluation, features
(tile folders and slides) and the tile cache's decoding all read their files through loader()."""
import multiprocessing

import torch

from Dataset import collate
from core.devices import cpu_count, launch_slot
from core.errors import UserError
from core.signals import ignore_interrupts
from core.streams import say


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


def loader_start_method():
    """How loader processes start: forked where possible, also in processes runtime.spawn started (which would
    otherwise spawn them too, each importing torch anew)."""
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else None


def stop_loader_workers(*loaders):
    """End the persistent loader processes now. Left to the end of the process, they would be sent SIGTERM,
    which they ignore (ignore_interrupts), and the process would wait for them forever."""
    for each in loaders:
        iterator = getattr(each, "_iterator", None)  # where DataLoader keeps its persistent workers' iterator
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


def loader(dataset, batch_size, workers, device=None, collate_fn=collate, persistent=False, **options):
    """A DataLoader of dataset in batches of batch_size, read by workers processes (0: in this one). Its
    workers start as loader_start_method says and leave interrupts to the main process
    (ignore_interrupts); batches are pinned for a CUDA device; persistent keeps the workers between
    epochs. batch_size None: each item of dataset is a batch already (the slide mode's row blocks), passed
    through collate_fn=None (torch's default) as it is. options: the DataLoader's sampler, drop_last."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_fn,
        pin_memory=device is not None and device.type == "cuda", persistent_workers=persistent and workers > 0,
        worker_init_fn=ignore_interrupts if workers else None,
        multiprocessing_context=loader_start_method() if workers else None, **options)
