"""One run at a time per output: a second training on one checkpoint folder, or a second evaluation or
feature extraction writing the same files, would interleave their checkpoints and outputs.

The lock is fcntl.flock on a small file beside the outputs, held open for the life of the run. The kernel
releases it when the process ends, however it ends (kill -9 included), so a crashed run never leaves it
stuck. A run that ends removes the file; one killed leaves it, unlocked and harmless. Under DDP only
rank 0 takes it.
"""
import contextlib
import os

from core.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None

LOCK_NAME = ".ae_run.lock"


def lock_path(output, folder=False):
    """The lock file of an output: inside it when it is a folder, beside it (.<name>.lock) when a file."""
    if folder:
        return os.path.join(output, LOCK_NAME)
    parent, name = os.path.split(os.path.abspath(output))
    return os.path.join(parent, f".{name}.lock")


def _holder(handle):
    """The process id the current holder wrote into the lock file, as text ('' when unknown)."""
    handle.seek(0)
    return handle.read(20).strip()


def _locked_file(path, output, setting):
    """The lock file at path, opened and locked; UserError when another live process holds it. A file the
    previous holder removed while this process waited is not the lock any more: then the lock is taken anew."""
    while True:
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            handle = open(path, "a+")
        except OSError as err:
            raise UserError(f"cannot create the lock file {path!r} ({err.strerror}): check the folder's "
                            "permissions") from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(handle)
            handle.close()
            raise UserError(f"{setting}={output!r} is in use by another run{f' (process {holder})' if holder else ''}: "
                            f"wait for it to finish, or give {setting} another path") from None
        try:
            same = os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return handle
        handle.close()


@contextlib.contextmanager
def hold(output, setting, folder=False, enabled=True):
    """Hold the lock of output (a file path, or an existing folder with folder=True) for the with-block; a
    UserError naming setting when another live process holds it. enabled=False (ranks other than 0) holds
    nothing. The lock file is removed when the block ends (a killed run leaves it, unlocked and harmless)."""
    if not enabled or fcntl is None:
        yield
        return
    path = lock_path(output, folder)
    handle = _locked_file(path, output, setting)
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        with contextlib.suppress(OSError):  # removed while still locked: no other process can take it meanwhile
            os.remove(path)
        handle.close()


def call_locked(function, cfg, output, setting):
    """function(cfg) while holding the lock of the output file output (hold)."""
    with hold(output, setting):
        return function(cfg)
