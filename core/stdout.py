"""Standard output whose reader has gone (`python Training_MSE.py | head -1`): training keeps going with
its output discarded (keep_going_without_stdout); the other scripts stop quietly (cli.run_main, exit 141)."""
import os
import select
import sys


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


class _Stdout:
    """sys.stdout that, once the reader has gone, sends the rest of the output to /dev/null."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            discard()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            discard()
            self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def keep_going_without_stdout():
    """Training must not stop (without its checkpoint) because the reader of its output went away: from
    then on its prints go nowhere."""
    if not isinstance(sys.stdout, _Stdout) and hasattr(sys.stdout, "fileno"):
        sys.stdout = _Stdout(sys.stdout)
