"""Rows that join a decoding call while it runs (a server's continuous batching).

A decoding loop given ``on_boundary`` calls it between steps (AR: between tokens; verified:
between drafts; the dial: between blocks) with the ids of the rows that go on; finished rows
have left the batch by then. It answers with the rows to add, which share the call's strategy,
dial and sampling (``decode.batch_key``) and bring their own prompt, length limit, seed and stop
strings. Rows are named by ids that never change: the call's prompts are 0..B-1, and joined
rows take the next ids in the order they were given. Every row's tokens are what it would get
alone (the inference is batch invariant, model/exact.py), so joining changes no answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NewRow:
    prompt_ids: Sequence[int]
    max_new_tokens: int
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()


OnBoundary = Callable[[list[int]], Sequence[NewRow]]  # (ids of the rows going on) -> rows to join


def regrouped(tensor: torch.Tensor | None, keep: torch.Tensor, joined: int) -> torch.Tensor | None:
    """A per-row tensor with the rows ``keep``, then ``joined`` zero rows (a fresh row's state)."""
    if tensor is None:
        return None
    return torch.cat([tensor[keep], tensor.new_zeros((joined, *tensor.shape[1:]))])
