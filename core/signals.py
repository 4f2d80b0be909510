"""The stop signals (Ctrl-C, a scheduler's SIGTERM, SIGHUP) in every process of a run: the handler that turns
them into an interrupt (Interrupts, stop_signals_interrupt), the guard that holds them while loader
processes start (interrupts_blocked), and the hook that leaves them to the main process in loader and
writer processes (ignore_interrupts).

Imports no torch and no other module of the project: the command line, the tile reader and the loaders
all take their signal handling from here.
"""
import contextlib
import os
import signal
import sys
import threading

# The signals that stop a run as Ctrl-C does (an interrupt checkpoint in training, the line `interrupted`, exit
# 128 + the signal): Ctrl-C, a scheduler's SIGTERM, and SIGHUP (the terminal closed, the ssh session dropped).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupts:
    """Ctrl-C (SIGINT), a job scheduler's SIGTERM and SIGHUP (STOP_SIGNALS) stop training with an
    interrupt checkpoint, and every other script with the line `interrupted` (cli.run_main). The first
    signal counts; later ones are ignored, so nothing cuts the save short (kill -9 stops at once). Inside
    deferred() (one optimisation step) the signal waits for the step to end: the checkpoint never holds half
    a step. In one process (immediate) a signal elsewhere stops at once; with several, where all agree to
    stop (before each step), so none is left waiting in a collective op the others have left."""

    def __init__(self, immediate, notice=None):
        self.immediate, self.notice = immediate, notice
        self.signum, self.deferring = None, False

    def interrupt(self):
        """The KeyboardInterrupt to raise, with the signal that caused it (cli.run_main exits 128 + signum)."""
        error = KeyboardInterrupt()
        error.signum = self.signum or signal.SIGINT
        return error

    def stopping(self):
        """Called while the interrupt checkpoint is written: from now on every signal is ignored."""
        self.signum = self.signum or signal.SIGINT

    def _handle(self, signum, frame):
        if self.signum is not None:
            return
        self.signum = signum
        if self.immediate and not self.deferring:
            raise self.interrupt()
        if self.notice:
            with contextlib.suppress(OSError):  # os.write: print() may not be re-entered from a handler
                os.write(2, f"\n{signal.Signals(signum).name}: {self.notice}\n".encode())

    @contextlib.contextmanager
    def installed(self, unblock=True):
        """unblock=False leaves the stop signals blocked where they are (in a process runtime.spawn started,
        until training installs its own handler)."""
        signals = [s for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]
        previous = {s: signal.signal(s, self._handle) for s in signals}
        if not self.immediate:
            for s in signals:  # a signal must not break off a blocking call inside a collective op
                signal.siginterrupt(s, False)
        mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, signals if unblock else [])
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    @contextlib.contextmanager
    def deferred(self):
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.immediate and self.signum is not None:
            raise self.interrupt()


@contextlib.contextmanager
def stop_signals_interrupt():
    """The stop signals (STOP_SIGNALS: Ctrl-C, SIGTERM, SIGHUP) raise KeyboardInterrupt with their
    signum; later ones are ignored until the process ends (training installs its own handler inside). Signals a
    process was started with blocked stay blocked (runtime.spawn's processes, until training unblocks them)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    interrupts = Interrupts(immediate=True)
    try:
        with interrupts.installed(unblock=False):
            yield
    finally:
        # From the first signal on they stay ignored: loader processes are shut down (which takes seconds) only
        # once the interrupt's traceback is freed, after this.
        if interrupts.signum is not None:
            ignore_stop_signals()


def ignore_stop_signals():
    """Once a run is interrupted, further presses of Ctrl-C while the process ends (loader processes shutting
    down, multiprocessing's exit hook) are not a KeyboardInterrupt traceback."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


@contextlib.contextmanager
def interrupts_blocked():
    """The stop signals wait while loader workers start (iter(loader)): the workers start with them
    blocked, and ignore them from worker_init_fn on (ignore_interrupts)."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


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
