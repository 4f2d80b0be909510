"""Showing file names safely: in messages, workbooks and on the terminal, whatever bytes a name holds."""
import os
import stat


def printable(text):
    """text (a file name, or a message holding one) as one line that is safe to show anywhere: bytes that
    are not UTF-8 become \\xNN and control characters (newline, tab, terminal escape sequences) become
    Python-style escapes such as \\n, \\t or \\x1b. Names that need neither come out unchanged."""
    text = os.fsencode(text).decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def special_kind(mode):
    """What a file that is not a regular file is, in words; None for a regular file."""
    for test, kind in ((stat.S_ISREG, None), (stat.S_ISDIR, "folder"), (stat.S_ISLNK, "symbolic link"),
                       (stat.S_ISFIFO, "named pipe"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return "device"
