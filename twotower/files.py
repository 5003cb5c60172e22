"""Reading and writing the files twotower takes from users and leaves for them.

Readers name the file and, for JSONL, the line, and say what was expected (DataError, or the
error class the caller passes). Writers are atomic: a temporary file beside the target, then a
rename, so a killed run leaves the previous version and never half of a new one; the temporary
names are fixed (``.NAME.tmp``), so a kill leaves at most one, which the next write replaces.
Output locations are made before the expensive work, so a path that cannot hold the results
fails at once instead of throwing them away."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from .errors import DataError, TwoTowerError, UsageError


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


def read_json(path: Path, error: type[TwoTowerError] = DataError) -> dict:
    """A JSON file whose top level is an object, or ``error`` naming the file."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"cannot read {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from e
    if not isinstance(value, dict):
        raise error(f"{path} must hold a JSON object, not {type(value).__name__}")
    return value


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    tmp = temporary_name(path)
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_figure(fig, path: Path) -> None:
    """A matplotlib figure as a PNG, through a temporary file and a rename."""
    tmp = temporary_name(Path(path))
    fig.savefig(tmp, dpi=120, format="png")
    os.replace(tmp, path)


def write_json(path: Path, value: dict) -> None:
    atomic_write(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def remove_leftovers(directory: Path, pattern: str) -> list[Path]:
    """Remove what a killed run left under ``directory`` (temporary files and folders whose
    names match ``pattern``); returns what was removed."""
    removed = []
    for leftover in sorted(Path(directory).glob(pattern)) if Path(directory).is_dir() else []:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed


def prepare_output_dir(path: str | Path) -> Path:
    """Create an output directory before the expensive work."""
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


def prepare_output_file(path: str | Path) -> Path:
    """Check an output file's place before the expensive work: its folder exists (made if
    need be) and is writable, and the path is not a directory."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UsageError(f"{path}: is a directory, not an output file")
    prepare_output_dir(path.parent)
    return path
