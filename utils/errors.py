"""Errors that are the user's to fix, not the program's.

The entry points print a :class:`UserError`'s message on stderr, without a traceback, and exit with its
``exit_code``: 2, a problem in the input (config, command line, checkpoint, dataset); 28, a full disk
(``ENOSPC``'s number); 73, a file that cannot be written (``EX_CANTCREAT``). Real bugs raise ordinary
exceptions, whose traceback reaches the developer.
"""


class UserError(Exception):
    """A problem in the user's input. ``str(err)`` is the whole message: one or more lines, each complete."""

    exit_code = 2

    def __init__(self, *problems: str):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class ConfigError(UserError):
    """One or more problems in a config; each problem is one line naming the key and what would be valid."""


class WriteError(UserError):
    """A file could not be written (read-only file system, permission denied); the old file, if any, is intact."""

    exit_code = 73


class DiskFullError(WriteError):
    """No space left on the device, or the disk quota is used up; the old file, if any, is intact."""

    exit_code = 28


# The phrasing of a problem line, shared by utils/config.py and the checks imported only when needed.


def did_you_mean(name, valid):
    """``"; did you mean 'x'?"`` for the name in ``valid`` closest to ``name``, or ``""`` when none is close."""
    import difflib

    close = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def listing(valid, limit=25):
    """``valid`` sorted and joined with ", ", the first ``limit`` of them when there are more."""
    valid = sorted(valid)
    return ", ".join(valid[:limit]) + (f", ... ({len(valid)} in all)" if len(valid) > limit else "")


def shown(value, limit=60):
    """``value`` as JSON (else its repr), cut to ``limit`` characters."""
    import json

    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
