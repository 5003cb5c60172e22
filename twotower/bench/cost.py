"""A cost model of decoding: what one forward over n token rows costs on this device, relative to
one AR step, and the speed-up over AR that a strategy's pass counts predict from it.

A strategy's decode is a sequence of forwards of different widths (AR: 1 row each; verified
drafting: a denoiser block of S rows, then the context tower over the anchor and the draft; the
fused step: both at once). Its predicted speed-up is

    tokens x cost(1) / sum over its forwards of cost(rows)

(the prompt pass and the per-step Python are left out: they are what the prediction misses). On
a GPU a forward's cost is flat up to far more rows than these passes use, so there the
prediction is tokens / forwards; ``flat`` predicts that for any device whose cost is flat up to
``FLAT_ROWS`` rows.
"""

from __future__ import annotations

import torch

from ..model.backbone import Backbone
from .timing import interleaved

FLAT_ROWS = 64  # a GPU forward costs about the same up to here (DESIGN.md §2)


def measure_row_costs(backbone: Backbone, widths: list[int], context_tokens: int = 256, repeats: int = 5,
                      synchronize=None) -> dict[int, float]:
    """Median seconds of a cached forward over each number of new tokens in ``widths`` after a
    ``context_tokens`` context, interleaved (every width once per round), batch 1."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, backbone.config.vocab_size, (1, context_tokens + max(widths)), generator=gen)
    ids = ids.to(backbone.device)
    cache = backbone.new_cache(1, context_tokens + max(widths))
    with torch.inference_mode():
        backbone(ids[:, :context_tokens], cache)
    base = cache.lengths.clone()

    def forward(width: int):
        def run() -> None:
            with torch.inference_mode():
                backbone(ids[:, context_tokens : context_tokens + width], cache, last_only=width == 1, record=True)
            if synchronize is not None:
                synchronize()
            cache.rollback(base)

        return run

    timings = interleaved({w: forward(w) for w in widths}, repeats, warmup=1)
    return {w: timings.median(w) for w in widths}


def cost_of(width: int, costs: dict[int, float]) -> float:
    """The cost of a forward of ``width`` rows: measured, or linearly interpolated (and
    extrapolated from the two widest) between measured widths."""
    if width in costs:
        return costs[width]
    known = sorted(costs)
    lower = max((w for w in known if w < width), default=known[0])
    upper = min((w for w in known if w > width), default=None)
    if upper is None:  # beyond the widest: continue the last slope
        lower, upper = known[-2], known[-1]
    slope = (costs[upper] - costs[lower]) / (upper - lower)
    return costs[lower] + slope * (width - lower)


def predicted_speedup(forward_widths: dict[int, int], tokens_per_row: float, costs: dict[int, float]) -> float | None:
    """AR's predicted time for the tokens over the strategy's predicted time for its forwards."""
    spent = sum(n * cost_of(width, costs) for width, n in forward_widths.items())
    return tokens_per_row * cost_of(1, costs) / spent if spent else None


def flat(forward_widths: dict[int, int]) -> dict[int, float]:
    """Relative costs of a device where every forward up to FLAT_ROWS rows costs one AR step."""
    return {w: 1.0 if w <= FLAT_ROWS else w / FLAT_ROWS for w in set(forward_widths) | {1}}
