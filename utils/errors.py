"""Errors that are the user's to fix, not the program's.

The entry points catch :class:`UserError` and print its message as one line on
stderr with exit code 2, without a traceback. Raise it (never ``assert``) for a
config typo, a wrong type, a missing dataset or a damaged checkpoint; let real
bugs raise ordinary exceptions so that their traceback reaches the developer.
"""


class UserError(Exception):
    """A problem in the user's input. ``str(err)`` is the whole message: one or more lines, each complete."""

    def __init__(self, *problems: str):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class ConfigError(UserError):
    """One or more problems in a config; each problem is one line naming the key and what would be valid."""
