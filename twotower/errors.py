"""The project's own errors. Each says what was wrong and where (the argument, the file and its
line or key); the command line prints them as one line and exits with 2. Any other exception
is a bug and keeps its traceback.

They subclass ValueError, so code that caught the ValueErrors of earlier versions still does.
"""

from __future__ import annotations


class TwoTowerError(ValueError):
    """Base of every error twotower reports to a user as a one-line message."""


class UsageError(TwoTowerError):
    """An invalid argument or request: a wrong type, a value out of range, an empty prompt."""


class CheckpointError(TwoTowerError):
    """A model name or checkpoint that cannot be resolved or read."""


class DataError(TwoTowerError):
    """A data file (text, JSONL, shards, a prompt set) that cannot be read as expected."""
