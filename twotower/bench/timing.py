"""Interleaved timing: run the contenders in turn (A B A B ...) so that a noisy, shared machine
slows them alike, drop warm-up rounds, report medians and the median of per-round ratios."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import UsageError


@dataclass
class Timings:
    seconds: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def ratio(self, slow: str, fast: str) -> float:
        """Median over rounds of time(slow) / time(fast): how many times faster `fast` is."""
        return statistics.median(s / f for s, f in zip(self.seconds[slow], self.seconds[fast]))


def interleaved(
    contenders: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
    on_round: Callable[[int], None] | None = None,
) -> Timings:
    if repeats < 1 or warmup < 0:
        raise UsageError("repeats must be >= 1 and warmup >= 0")
    timings = Timings({name: [] for name in contenders})
    for r in range(warmup + repeats):
        for name, fn in contenders.items():
            start = clock()
            fn()
            elapsed = clock() - start
            if r >= warmup:
                timings.seconds[name].append(elapsed)
        if on_round is not None:
            on_round(r)
    return timings
