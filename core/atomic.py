"""Writing output files safely.

Every output (checkpoint, workbook, CSV, PNG, tile) is written to a new file beside its target and renamed
into place, so a crash, a kill or a full disk leaves either the previous file or the new one, never half of
one. Nothing is written through a symbolic link or onto a device or other special file. A set of files that
belong together (the feature files) is replaced together or not at all.
"""
import contextlib
import errno
import os
import secrets
import stat

from core.errors import UserError
from core.names import special_kind

MIN_FREE_BYTES = 1 << 20  # an output folder with less free space than this is on a full disk
_FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


def check_target(path):
    """Refuse (UserError) an output path that is an existing folder, symbolic link, device or other special
    file: writing there would follow the link or replace the device node."""
    try:
        kind = special_kind(os.lstat(path).st_mode)
    except OSError:  # nothing there yet (or an unreachable folder, which the write itself reports)
        return
    if kind == "folder":
        raise UserError(f"cannot write {path!r}: it is a folder; give a file name")
    if kind:
        raise UserError(f"refusing to write {path!r}: it is a {kind}, not a regular file; "
                        "remove it or choose another file name")
    check_not_read_only(path)


def is_read_only(path):
    """Whether path is an existing regular file whose permission bits grant nobody write access (chmod a-w,
    mode 444): the user made it read-only to keep it. The mode bits are read directly, since os.access says
    yes to root whatever they are."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISREG(mode) and not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)


def check_not_read_only(path):
    """Refuse (UserError) to replace a read-only file (is_read_only)."""
    if is_read_only(path):
        mode = os.stat(path).st_mode
        raise UserError(f"refusing to replace {path!r}: it is read-only (mode {stat.S_IMODE(mode):04o}); "
                        "make it writable (chmod u+w) or choose another file name")


def _new_file(folder, name, record=None):
    """Create an empty, new file in folder, named after name; returns its path. The kernel applies the
    umask (mode 0666 asked), so outputs get the same permissions as any file the user creates. record(path),
    when given, is called before the file is created (and record(None) if that name was taken): an interrupt
    arriving while the file is being created still finds its name, to delete it."""
    stem = os.fsdecode(os.fsencode(name)[:180])  # room for the suffix within the 255-byte name limit
    while True:
        path = os.path.join(folder, f".{stem}.{secrets.token_hex(4)}.tmp")
        if record:
            record(path)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666))
            return path
        except FileExistsError:
            if record:
                record(None)
            continue


def _write_error(path, err):
    """The one-line UserError for an OSError while writing path."""
    reason = err.strerror or str(err)
    if err.errno in _FULL_DISK:
        return UserError(f"cannot write {path!r} ({reason}): the disk is full; free some space and rerun "
                         "(files written before it are complete, earlier versions of this one unchanged)")
    return UserError(f"cannot write {path!r} ({reason}): check the folder's permissions and free space")


def _fsync(path):
    with open(path, "rb") as written:
        os.fsync(written.fileno())


def replace_together(writes, remove=(), durable=True):
    """writes: {path: write}, where write(tmp_path) writes the file's content to tmp_path. Every file is
    written beside its target first; only when all are written are they renamed into place, and then the
    paths in remove are deleted. On any failure the new files are deleted and every target keeps its old
    content; an OSError (a full disk) becomes a UserError naming the file. durable: flush each file to the
    disk before renaming (skip it only for files a rerun recreates, such as PNGs: it costs a disk sync each)."""
    for path in [*writes, *remove]:
        check_target(path)
    temps = {}
    current = None
    try:
        for current, write in writes.items():
            folder = os.path.dirname(os.path.abspath(current))
            os.makedirs(folder, exist_ok=True)
            _new_file(folder, os.path.basename(current), record=lambda path: temps.__setitem__(current, path))
            write(temps[current])
            if durable:
                _fsync(temps[current])
        for current, temp in list(temps.items()):
            check_target(current)  # again: a link planted while the files were written is still refused
            os.replace(temp, current)
            del temps[current]
        for current in remove:
            if os.path.lexists(current):
                os.remove(current)
    except OSError as err:
        raise _write_error(current, err) from None
    finally:
        for temp in filter(None, temps.values()):  # None: a name _new_file found taken
            with contextlib.suppress(OSError):  # the error that brought us here is the one to report
                os.remove(temp)


def atomic_write(path, write, durable=True):
    """Write one file through write(tmp_path) and rename it into place (replace_together)."""
    replace_together({path: write}, durable=durable)


def check_writable(folder):
    """Create folder if needed and prove a file can be written there, before any work starts: a few bytes
    are written and flushed to the disk, and the disk must have MIN_FREE_BYTES free."""
    folder = folder or "."
    try:
        os.makedirs(folder, exist_ok=True)
        probe = _new_file(folder, "write_test")
        try:
            with open(probe, "wb") as handle:
                handle.write(b"probe\n")
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            os.remove(probe)
        space = os.statvfs(folder) if hasattr(os, "statvfs") else None
    except OSError as err:
        # "File exists" or "Not a directory" alone hides the cause: a file where a folder must go.
        existing = os.path.abspath(folder)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        reason = f"{existing} is a file" if os.path.isfile(existing) else err.strerror
        raise UserError(f"cannot write to output folder {folder!r} ({reason}): "
                        "choose another folder or fix its permissions") from None
    # f_blocks 0: a file system that reports no sizes (some network and virtual ones), so nothing to check.
    if space is not None and space.f_blocks and space.f_bavail * space.f_frsize < MIN_FREE_BYTES:
        raise UserError(f"output folder {folder!r} is on a full disk ({space.f_bavail * space.f_frsize // 1024} KB "
                        "free): free some space or choose another folder")


def write_bytes(path, data):
    with open(path, "wb") as handle:
        handle.write(data)
