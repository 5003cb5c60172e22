"""A cost model of decoding: what one forward of each shape costs on this device, relative to one
AR step, and the speed-up over AR that a strategy's pass counts predict from it.

A strategy's decode is a sequence of forwards of a few shapes (``GenerationStats.forward_shapes``):
AR, "context 1" each; verified drafting, "denoiser S" (a block; "drafter S" where the model drafts
with a verify_drafter of its own) then "context k+1" (the anchor and the draft), or "tree N+1"
(the anchor and a tree of N drafts); the fused step, "fused W+S" (both at once). Its predicted speed-up is

    tokens x cost("context 1") / sum over its forwards of cost(shape)

(the prompt pass and the per-step Python are left out: they are what the prediction misses). On
a GPU a forward's cost is flat up to far more rows than these passes use, so there the
prediction is tokens / forwards; ``flat`` gives those costs for a device that is flat up to
FLAT_ROWS rows.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ..generate.ar import shape_rows
from ..generate.tree import ancestors
from ..model.fused import fused_forward
from ..model.twotower import TwoTower
from .timing import interleaved

FLAT_ROWS = 64  # a GPU forward costs about the same up to here (DESIGN.md §2)
AR_STEP = "context 1"


def measure_forward_costs(model: TwoTower, shapes: set[str], context_tokens: int = 256, repeats: int = 5,
                          synchronize=None) -> dict[str, float]:
    """Median seconds of a forward of each shape (and of one AR step) after a ``context_tokens``
    context, batch 1, interleaved (every shape once per round): the context tower over n new
    tokens, the denoiser (or the verify_drafter) over a block of n (as decoding runs it, merged
    adapters included), or the fused pass over w context rows and a block."""
    shapes = set(shapes) | {AR_STEP}
    widest = max(shape_rows(s) for s in shapes)
    backbone = model.context
    context_tokens = min(context_tokens, backbone.config.max_position_embeddings - 2 * widest)  # a tiny model's
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, backbone.config.vocab_size, (1, context_tokens + widest), generator=gen)
    ids = ids.to(backbone.device)
    cache = backbone.new_cache(1, context_tokens + 2 * widest)
    with torch.inference_mode():
        backbone(ids[:, :context_tokens], cache)
    base = cache.lengths.clone()
    new = ids[:, context_tokens:]

    def block(n: int) -> torch.Tensor:
        out = torch.full((1, n), model.mask_token_id, device=ids.device)
        out[0, 0] = new[0, 0]
        return out

    def forward(shape: str):
        kind, size = shape.split()
        rows = [int(n) for n in size.split("+")]

        def run() -> None:
            with torch.inference_mode():
                if kind == "context":  # greedy passes end at their picks, as decoding's do
                    backbone.argmax_tokens(backbone(new[:, : rows[0]], cache, last_only=rows[0] == 1, record=True,
                                                    head=False))
                elif kind == "tree":
                    backbone.argmax_tokens(backbone(new[:, : rows[0]], cache, tree=typical_tree(rows[0]).to(ids.device),
                                                    head=False))
                elif kind in ("denoiser", "drafter"):
                    with model.drafting_to_verify() if kind == "drafter" else nullcontext():
                        model.denoise_block(block(rows[0]), torch.ones(1, device=ids.device), cache)
                else:
                    fused_forward(model, new[:, : rows[0]], block(rows[1]), torch.ones(1, device=ids.device),
                                  torch.tensor([rows[0] - 1], device=ids.device), cache)
            if synchronize is not None:
                synchronize()
            if bool((cache.lengths != base).any()):
                cache.rollback(base)

        return run

    timings = interleaved({s: forward(s) for s in sorted(shapes)}, repeats, warmup=1)
    return {s: timings.median(s) for s in sorted(shapes)}


def typical_tree(n: int) -> torch.Tensor:
    """(1, n, n) ancestors of a token tree of n rows shaped like the drafter's: the root, a path
    of half the rest (the likeliest continuation), then the other nodes, each a second choice
    after a node of the path (the queries exact attention gathers keys for: model/exact.py)."""
    path = n // 2
    return ancestors(torch.tensor([list(range(path)) + [i % max(path, 1) for i in range(n - 1 - path)]]))


def predicted_speedup(forward_shapes: dict[str, int], tokens: float, costs: dict[str, float]) -> float | None:
    """AR's predicted time for ``tokens`` over the predicted time of the strategy's forwards."""
    spent = sum(n * costs[shape] for shape, n in forward_shapes.items())
    return tokens * costs[AR_STEP] / spent if spent else None


def flat(forward_shapes: dict[str, int]) -> dict[str, float]:
    """Relative costs on a device where any forward up to FLAT_ROWS rows costs one AR step."""
    return {s: max(1.0, shape_rows(s) / FLAT_ROWS) for s in set(forward_shapes) | {AR_STEP}}
