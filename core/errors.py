"""The error a user can fix. Kept apart from everything else so that any module can raise it without
importing the command line, torch or the image libraries."""


class UserError(Exception):
    """A problem the user can fix (bad path, bad file, bad setting): printed as one line, exit code 2."""


class RankError(UserError):
    """A UserError of one process of a multi-process run alone (the GPU of its LOCAL_RANK): reported by every
    process that meets it, where other UserErrors, the same in every process, are reported by rank 0 only."""
