"""The glibc malloc switch (Config.keep_freed_memory): keep freed memory for reuse instead of handing it
back to the kernel. A process-wide setting, so it is applied only by a script's entry point (cli.run_main)."""
import ctypes
import os
import sys

import torch

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4


def user_tuned_malloc():
    """Whether the environment already sets malloc up (GLIBC_TUNABLES, MALLOC_*_ variables, or LD_PRELOAD of
    another allocator): then we leave it alone."""
    return any(key in os.environ for key in ("GLIBC_TUNABLES", "LD_PRELOAD")) or any(
        key.startswith("MALLOC_") and key.endswith("_") for key in os.environ)


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the kernel.

    A forward pass allocates and frees tensors of several MB many times per batch. By default glibc
    returns most of them to the kernel, and each reuse page-faults the memory back in; with these settings
    the process keeps its peak heap for its lifetime (the gain on a CPU is measured by benchmark.py).
    Skipped off glibc and when the user has tuned malloc already (user_tuned_malloc). True if applied.
    """
    if not sys.platform.startswith("linux") or user_tuned_malloc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    # No block comes from mmap (M_MMAP_MAX 0; the threshold is set too, for a malloc that ignores the
    # maximum): an mmap'd block goes back to the kernel when freed, so every 256-px activation of a training
    # step (16 x 32 x 256 x 256 floats, 134 MB, above the largest threshold glibc accepts) would page-fault
    # its memory in again, about half of a fp32 training step on a 2-core CPU. Trimming off (-1): the heap
    # never shrinks. A 1 GB top pad: the heap grows in large steps (a smaller pad gives back part of the gain).
    return all(mallopt(option, value) == 1 for option, value in (
        (_M_MMAP_THRESHOLD, 32 << 20), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_TOP_PAD, 1 << 30)))


def apply(setting, cuda_available=None):
    """Apply Config.keep_freed_memory (True, False or "auto"); True if malloc was tuned.

    "auto" tunes malloc only where CUDA is not available: on CPU-only runs the gain was measured, while on
    a GPU node the CPU side does little allocation and the 1 GB top pad (reserved address space, counted in
    full where the kernel's overcommit is strict) is a risk without a measured benefit."""
    if setting == "auto":
        setting = not (torch.cuda.is_available() if cuda_available is None else cuda_available)
    return keep_freed_memory() if setting else False
