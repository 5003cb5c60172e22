"""Readers for the text files twotower takes from users (plain text, JSONL): each failure is a
DataError that names the file and, for JSONL, the line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import DataError, UsageError


def read_text(path: Path) -> str:
    """A UTF-8 text file that is not empty."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {data[e.start:e.start + 4]!r})") from e
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    return text


def jsonl_records(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line of a UTF-8 JSONL file."""
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: invalid JSON ({e.msg})") from e


def prepare_output_dir(path: str | Path) -> Path:
    """Create an output directory before the expensive work, so that a path that cannot be a
    directory fails at once instead of throwing finished results away."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UsageError(f"{path}: cannot be an output directory (a file is in the way)") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot create the output directory ({e.strerror or e})") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"{path}: the output directory is not writable")
    return path
