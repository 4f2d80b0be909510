"""The process's own output streams: stdout and stderr closed (`>&-`), on a full disk (a log file, /dev/full)
or with their reader gone are never a reason to lose work. From the first failed write on, what would have
gone to that stream goes to /dev/null, and the run finishes its outputs."""
import os
import select
import sys


def reopen_closed_standard_fds():
    """Point a closed standard stream (`python Evaluation_SSIM.py >&-`) at /dev/null. Left closed, its number
    would be the next one open() hands out, and whatever is written to stdout or stderr (by a library, from C,
    or by a loader process) would land in that file: a workbook, a checkpoint."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:  # a lower number was closed too and took it: reopened in order, so never
                os.dup2(null, fd)
                os.close(null)
    # Python leaves sys.stdout / sys.stderr as None when they were closed at its start.
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w")
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")


class _Guarded:
    """sys.stdout or sys.stderr that, once a write to it fails, sends the rest of the output to /dev/null.
    A BrokenPipeError of a stream whose broken pipe ends the run (evaluation's stdout under `| head`, see
    cli.run_main) is raised as before."""

    def __init__(self, stream, broken_pipe_ends_run):
        self._stream = stream
        self._broken_pipe_ends_run = broken_pipe_ends_run

    def _failed(self, err):
        if isinstance(err, BrokenPipeError) and self._broken_pipe_ends_run:
            raise err
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())  # its buffered text then goes to /dev/null too
            os.close(null)
        except (OSError, ValueError, AttributeError):  # no file behind it: replace the stream itself
            self._stream = open(os.devnull, "w")

    def write(self, text):
        try:
            return self._stream.write(text)
        except (OSError, ValueError) as err:  # ValueError: the stream object was closed
            self._failed(err)
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except (OSError, ValueError) as err:
            self._failed(err)
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._stream = open(os.devnull, "w")

    def __getattr__(self, name):
        return getattr(self._stream, name)


def guard(keep_going_without_stdout=False):
    """Make a closed, full or vanished stdout or stderr harmless for the rest of the process (idempotent).
    keep_going_without_stdout: stdout's reader going away (`| head`) drops the output too, instead of ending
    the run (training: a run stopped that way would lose the epoch)."""
    reopen_closed_standard_fds()
    if isinstance(sys.stdout, _Guarded):
        sys.stdout._broken_pipe_ends_run &= not keep_going_without_stdout
    else:
        sys.stdout = _Guarded(sys.stdout, broken_pipe_ends_run=not keep_going_without_stdout)
    if not isinstance(sys.stderr, _Guarded):
        sys.stderr = _Guarded(sys.stderr, broken_pipe_ends_run=False)


def say(*parts):
    """print() to stdout, flushed (a failing stdout is handled by guard)."""
    print(*parts, flush=True)


def keep_going_without_stdout():
    """Training must not stop (without its checkpoint) because of its own output: stdout's reader gone
    (`python Training_MSE.py | head -1`), stdout or stderr closed or on a full disk. From then on that
    output goes nowhere."""
    guard(keep_going_without_stdout=True)


def discard():
    """Point the stdout file descriptor at /dev/null: later writes and the flush at exit succeed."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def reader_gone():
    """Whether stdout is a pipe whose reader has gone, so that a BrokenPipeError came from it."""
    if not hasattr(select, "poll"):  # Windows: assume so, as Python's documented recipe does
        return True
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), 0)  # errors and hang-ups are reported whatever is asked for
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no file behind stdout
        return False
