"""Token choice shared by every decoding mode: greedy, or Gumbel-max sampling with one random
generator per row, so that a row's samples never depend on its batch mates."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers.generation.logits_process import LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper

from ..errors import UsageError


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 <= temperature < math.inf:
        raise UsageError(f"temperature must be a finite number >= 0, got {temperature!r}")  # NaN too
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise UsageError(f"top_k must be an integer >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1):
        raise UsageError(f"top_p must be a number in (0, 1], got {top_p!r}")


class Sampler:
    def __init__(
        self,
        batch: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | Sequence[int | None] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        """``seed``: row i draws from seed + i; or a list of one seed per row (rows that came from
        different requests: each draws what it would alone); None draws a random seed."""
        check_sampling_args(temperature, top_k, top_p)
        self.temperature = temperature
        warpers = []
        if top_k is not None:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1:
            warpers.append(TopPLogitsWarper(top_p))
        self.warpers = LogitsProcessorList(warpers)
        self.generators = []
        if isinstance(seed, Sequence):
            if len(seed) != batch:
                raise UsageError(f"seed: {len(seed)} seeds for {batch} rows")
            seeds = list(seed)
        else:
            seeds = [None if seed is None else seed + i for i in range(batch)]
        self.device = device
        self.add(seeds)

    def add(self, seeds: Sequence[int | None]) -> None:
        """Streams for rows that join (a server's batch), after every row so far."""
        for s in seeds:
            if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 0):
                raise UsageError(f"a seed must be a non-negative integer, got {s!r}")
        if self.temperature > 0:
            # Row i draws from its own stream: batch mates cannot shift its random numbers.
            self.generators += [
                torch.Generator(device=self.device).manual_seed(s if s is not None else int(torch.randint(0, 2**62, ())))
                for s in seeds
            ]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def warped(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) after temperature, top-k and top-p: what sampling draws from."""
        flat = logits.float().reshape(-1, logits.shape[-1]) / self.temperature
        if len(self.warpers):
            flat = self.warpers(None, flat)
        return flat.view(logits.shape)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The sampling distribution (..., V) (sampling only; greedy has none)."""
        return self.warped(logits).softmax(-1)

    def uniform(self, row: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Uniform numbers from row ``row``'s own stream (acceptance tests of verified decoding)."""
        return torch.rand(shape, generator=self.generators[row], device=self.generators[row].device)

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """Choose one token per row of ``logits`` (R, ..., V). ``rows`` maps logits rows to batch
        rows (default: identity), so subsets of the batch keep their own random streams."""
        if self.greedy:
            return logits.argmax(-1)
        flat = self.warped(logits).reshape(logits.shape[0], -1, logits.shape[-1])
        row_ids = range(logits.shape[0]) if rows is None else rows.tolist() if isinstance(rows, torch.Tensor) else rows
        noise = torch.stack(
            [torch.rand(flat.shape[1:], generator=self.generators[r], device=flat.device) for r in row_ids]
        )
        gumbel = -torch.log(-torch.log(noise.clamp_min(1e-20)))
        return (flat + gumbel).argmax(-1).view(logits.shape[:-1])
