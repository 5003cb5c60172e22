"""Peak resident memory (RSS) of this process over a region of code.

torch's CPU allocations bypass Python's allocator, so tracemalloc would miss the KV cache and the
activations; RSS sees them. On Linux, writing "5" to /proc/self/clear_refs resets the kernel's
peak-RSS mark (VmHWM), which gives the true peak of each region. Elsewhere, we fall back to
ru_maxrss, the lifetime peak: its growth over a region is only a lower bound (0 once an earlier
region peaked higher), and the method is recorded beside the number so that nobody mistakes it.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def resident_mb() -> float:
    """This process's resident memory now (VmRSS; 0 where /proc is missing)."""
    return (_status_kb("VmRSS") or 0) / 1024


def _can_reset_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


def _maxrss_kb() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux


class PeakMemory:
    """``with PeakMemory() as m: ...`` then ``m.peak_mb`` (process peak RSS inside the region)
    and ``m.over_start_mb`` (that peak minus the RSS at entry: what the region itself needed)."""

    exact = _can_reset_peak()
    method = "VmHWM reset per region (/proc/self/clear_refs)" if exact else "ru_maxrss growth (lower bound)"

    def __enter__(self) -> PeakMemory:
        if self.exact:
            _CLEAR_REFS.write_text("5")
            self._start_kb = _status_kb("VmRSS") or 0
        else:
            self._start_kb = _maxrss_kb()
        return self

    def __exit__(self, *exc) -> None:
        peak_kb = (_status_kb("VmHWM") or 0) if self.exact else _maxrss_kb()
        self.peak_mb = peak_kb / 1024
        self.over_start_mb = max(peak_kb - self._start_kb, 0) / 1024
