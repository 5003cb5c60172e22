"""Commit rules: which unknown targets of a block become final after a denoiser step.

Every rule sees per-row confidences (the un-tempered probability of each proposal), which
targets are still unknown, how many steps the block has left and the threshold; it returns
the targets to commit. Decisions are per row. Committed targets are never revised.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..errors import UsageError


class CommitRule(Protocol):
    name: str

    def __call__(
        self, confidence: torch.Tensor, unknown: torch.Tensor, steps_left: int, threshold: float
    ) -> torch.Tensor: ...


def _quota(unknown: torch.Tensor, steps_left: int) -> torch.Tensor:
    """At least ceil(unknown / steps_left) per row (so the block ends in time), and at least 1."""
    n = unknown.sum(1)
    return torch.where(n > 0, ((n + steps_left - 1) // max(steps_left, 1)).clamp_min(1), n)


class ThresholdRule:
    """The released rule: every unknown target with confidence > threshold, anywhere in the
    block, and at least the quota of the most confident ones."""

    name = "threshold"

    def __call__(self, confidence, unknown, steps_left, threshold):
        conf = confidence.masked_fill(~unknown, -1.0)
        rank = conf.argsort(dim=1, descending=True).argsort(dim=1)  # 0 = most confident
        return unknown & ((conf > threshold) | (rank < _quota(unknown, steps_left)[:, None]))


class LeftPrefixRule:
    """Only a contiguous run starting at the leftmost unknown target: the quota from the left,
    then further targets while each is confident. An early confident '.' or newline at the
    block's end cannot be committed before the text leading to it."""

    name = "left_prefix"

    def __call__(self, confidence, unknown, steps_left, threshold):
        order = unknown.long().cumsum(1)  # 1, 2, ... over unknown targets from the left
        allowed = unknown & ((order <= _quota(unknown, steps_left)[:, None]) | (confidence > threshold))
        # keep the run: stop at the first unknown target that is not allowed
        return unknown & (allowed | ~unknown).long().cumprod(1).bool()


COMMIT_RULES: dict[str, CommitRule] = {"threshold": ThresholdRule(), "left_prefix": LeftPrefixRule()}


def get_commit_rule(rule: str | CommitRule) -> CommitRule:
    if isinstance(rule, str):
        if rule not in COMMIT_RULES:
            raise UsageError(f"unknown commit rule {rule!r} (choose from {', '.join(COMMIT_RULES)})")
        return COMMIT_RULES[rule]
    return rule
