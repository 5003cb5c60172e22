"""Device and dtype names checked up front, so a typo or a missing GPU is one clear error."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # what the command line offers


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r}: {e}") from e
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise ValueError(f"device {device!r} is not available on this machine")
    if dev.index is not None and dev.index >= backend.device_count():
        raise ValueError(f"device {device!r} does not exist: this machine has {backend.device_count()} {dev.type} device(s)")
    return dev
