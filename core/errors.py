"""The error a user can fix. Kept apart from everything else so that any module can raise it without
importing the command line, torch or the image libraries."""
import re


class UserError(Exception):
    """A problem the user can fix (bad path, bad file, bad setting): printed as one line, exit code 2."""


class RankError(UserError):
    """A UserError of one process of a multi-process run alone (the GPU of its LOCAL_RANK): reported by every
    process that meets it, where other UserErrors, the same in every process, are reported by rank 0 only."""


_ENFORCE = re.compile(r"^\[enforce fail at [^\]]*\]\s*(err == 0\.\s*)?")  # torch's prefix: no help to a user
# What the machine ran out of, recognised by the text torch, numpy and the system give (also when a loader
# process's error arrives re-raised with its traceback in the text): [(kind, phrases)], the first match counts.
_EXHAUSTED = [("shared memory", ("shared memory", "/dev/shm")),
              ("open files", ("too many open files", "received 0 items of ancdata")),
              ("memory", ("out of memory", "not enough memory", "can't allocate memory", "cannot allocate memory",
                          "unable to allocate", "memoryerror"))]


def exhausted(err):
    """(what ran out: 'memory', 'shared memory' or 'open files', the line that says so) when err is the machine
    running out of it rather than a fault of the data or the code; None otherwise."""
    if not isinstance(err, (MemoryError, RuntimeError, OSError)):
        return None
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    for kind, phrases in _EXHAUSTED:
        found = [line for line in lines if any(phrase in line.lower() for phrase in phrases)]
        if found:
            return kind, _ENFORCE.sub("", found[-1])[:160]
    return ("memory", lines[-1][:160]) if isinstance(err, MemoryError) else None
