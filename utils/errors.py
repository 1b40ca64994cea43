"""Errors that are the user's to fix, not the program's.

The entry points catch :class:`UserError` and print its message as one line on
stderr, without a traceback, and exit with the error's ``exit_code``. Raise it (never
``assert``) for a config typo, a wrong type, a missing dataset or a damaged checkpoint;
let real bugs raise ordinary exceptions so that their traceback reaches the developer.

Exit codes (``err.exit_code``):

- 2: a problem in the input (config, command line, checkpoint, dataset): :class:`UserError`, :class:`ConfigError`.
- 28: the disk (or the user's quota) is full: :class:`DiskFullError`. 28 is ``ENOSPC``'s number,
  so a script can tell "free some space and resume" from every other failure.
- 73: a file cannot be written for another reason the user can fix (a read-only file
  system, no write permission): :class:`WriteError` (``EX_CANTCREAT`` of ``sysexits.h``).
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
