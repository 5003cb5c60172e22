"""Device and dtype names checked up front, so a typo or a missing GPU is one clear error."""

from __future__ import annotations

import functools
import logging

import torch

from ..errors import UsageError
from .linear import packing_available

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # what the command line offers
DTYPE_CHOICES = ("auto", *DTYPES)  # auto: auto_dtype


def auto_dtype(device: str | torch.device = "cpu") -> tuple[torch.dtype, str]:
    """bf16 where the device has native bf16 kernels, fp32 elsewhere, and why, in words: a CPU
    needs oneDNN's bf16 kernels (AVX512 or AVX-NE-CONVERT; without them bf16 runs on plain
    kernels, slower than fp32: see warn_if_slow), a GPU bf16 support (Ampere or newer)."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: this GPU has bf16"
        return torch.float32, "auto: this GPU lacks bf16"
    if dev.type == "cpu":
        if packing_available(torch.bfloat16):
            return torch.bfloat16, "auto: this CPU has oneDNN bf16 kernels"
        return torch.float32, "auto: oneDNN has no bf16 kernels for this CPU (it needs AVX512 or AVX-NE-CONVERT)"
    return torch.float32, f"auto: fp32 on {dev.type}"


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A dtype given by name (``"bfloat16"``) or as a torch.dtype, one of those we run."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise UsageError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"invalid device {device!r}: {e}") from e
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise UsageError(f"device {device!r} is not available on this machine")
    if dev.index is not None and dev.index >= backend.device_count():
        raise UsageError(f"device {device!r} does not exist: this machine has {backend.device_count()} {dev.type} device(s)")
    return dev


@functools.cache
def warn_if_slow(dtype: torch.dtype, device_type: str) -> None:
    """Say once when bf16 runs on a CPU without oneDNN's bf16 kernels (no AVX512-BW/VL/DQ or
    AVX-NE-CONVERT): there a block forward costs many token forwards (measured on a 2-core AVX2
    EPYC: 16 tokens 6.4x one token in bf16 against 1.6x in fp32), which undoes what block
    decoding saves."""
    if dtype == torch.bfloat16 and device_type == "cpu" and not packing_available(torch.bfloat16):
        log.warning("twotower: bfloat16 on this CPU has no oneDNN bf16 kernels, so multi-token forwards are slow: "
                    "float32 is the faster choice here")
