"""Safetensors files as twotower writes and reads them: atomically, and with a SHA-256 of the
tensors in the file's metadata, so that a truncated file and a flipped bit alike are an error
naming the file rather than silently different weights. Files written elsewhere (transformers
checkpoints) carry no checksum and are read as they are."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError
from ..files import temporary_name

CHECKSUM_KEY = "twotower_sha256"


def tensors_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``state``, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def save_tensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``state`` to ``path`` with its checksum, through a temporary file and a rename."""
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    tmp = temporary_name(Path(path))
    save_file(state, tmp, metadata={"format": "pt", **(metadata or {}), CHECKSUM_KEY: tensors_digest(state)})
    os.replace(tmp, path)


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file and its metadata; a file that cannot be read, or whose
    tensors do not match the checksum written with them, is a CheckpointError."""
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {k: handle.get_tensor(k) for k in handle.keys()}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as e:  # safetensors raises several kinds of errors on a damaged file
        raise CheckpointError(f"checkpoint file {path} is corrupt or truncated: {e}") from e
    expected = metadata.get(CHECKSUM_KEY)
    if expected is not None and tensors_digest(state) != expected:
        raise CheckpointError(f"checkpoint file {path} is corrupt: its tensors do not match the checksum "
                              "written with them")
    return state, metadata
