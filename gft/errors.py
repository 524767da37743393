"""The project's own error types.

Every error a user can cause (bad data, bad config, a broken reward function, a bad
model directory) is raised as a `GFTError` subclass with a one-line message that names
the file, line and field where there is one. The CLI prints the message and exits
non-zero instead of showing a traceback.
"""
from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of another library's exception message (its name when empty): what
    a one-line error quotes of it."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class GFTError(Exception):
    """Base class: a problem the user can fix, reported as one clear line."""


class ConfigError(GFTError):
    """A bad configuration key or value."""


class DataError(GFTError):
    """A bad data file, row or field."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        if field is not None:
            where += f"field '{field}': "
        super().__init__(where + message)
        self.path, self.line, self.field = path, line, field


class RewardError(GFTError):
    """A reward function that raised, or returned something unusable."""


class ModelError(GFTError):
    """A model or checkpoint directory that cannot be used."""
