"""Deterministic batches and masks: what step k sees is a pure function of (seed, k, row), so
a resumed run continues exactly, and N processes each taking their rows of the global batch
see what one process taking all rows sees."""

from __future__ import annotations

import numpy as np
import torch

from ..data.shards import TokenShards
from ..errors import DataError, UsageError

_T_STREAM = 2**31 - 1  # stream id of the shared t stratification (row ids are smaller)


def _seed(*parts: int) -> int:
    """A torch seed from integers, stable across processes (unlike hash())."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


def data_row(row: int, complementary: bool) -> int:
    """The data a global row holds: with complementary masks rows come in pairs."""
    return row - row % 2 if complementary else row


def sample_rows(
    shards: TokenShards, seed: int, step: int, rows: range, length: int, complementary: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Windows of ``length`` tokens, one per global row index in ``rows``, and where the shards
    carry a loss mask, which of those tokens are training targets (else None: all are)."""
    sizes = np.array([len(s) for s in shards.shards])
    if sizes.max() < length:
        raise DataError(f"no shard holds {length} tokens: prepare more data or shorten seq_len")
    usable = np.where(sizes >= length, sizes - length + 1, 0)
    out = np.empty((len(rows), length), dtype=np.int64)
    trained = np.empty((len(rows), length), dtype=bool) if shards.trained is not None else None
    for i, row in enumerate(rows):
        rng = np.random.default_rng([seed, step, data_row(row, complementary)])
        shard = rng.choice(len(sizes), p=usable / usable.sum())
        start = rng.integers(usable[shard])
        out[i] = shards.shards[shard][start : start + length]
        if trained is not None:
            trained[i] = shards.trained[shard][start : start + length]
    return torch.from_numpy(out), None if trained is None else torch.from_numpy(trained)


MASK_PATTERNS = ("random", "suffix")


def sample_masks(
    seed: int, step: int, rows: range, global_rows: int, blocks: int, size: int, t_eps: float, complementary: bool,
    pattern: str = "random",
) -> torch.Tensor:
    """(len(rows), blocks, size) bool masks. One t per block, stratified over all blocks of the
    global batch: the i-th block takes t in the i-th of N equal slices of (eps, 1), slices
    shuffled. ``pattern`` "random" hides each input with probability t; "suffix" hides the
    last floor(t * size) inputs, the only states left-to-right decoding (the left_prefix commit
    rule) ever shows the denoiser. With ``complementary`` odd rows mask exactly what the even
    row before hides not."""
    if pattern not in MASK_PATTERNS:
        raise UsageError(f"mask pattern must be one of {', '.join(MASK_PATTERNS)}, got {pattern!r}")
    n = global_rows * blocks
    shared = torch.Generator().manual_seed(_seed(seed, step, _T_STREAM))
    order = torch.randperm(n, generator=shared).view(global_rows, blocks)
    out = torch.empty(len(rows), blocks, size, dtype=torch.bool)
    for i, row in enumerate(rows):
        base = data_row(row, complementary)
        gen = torch.Generator().manual_seed(_seed(seed, step, base))
        u = (order[base].double() + torch.rand(blocks, generator=gen, dtype=torch.float64)) / n
        t = t_eps + (1 - t_eps) * u
        if pattern == "random":
            masked = torch.rand(blocks, size, generator=gen, dtype=torch.float64) < t[:, None]
        else:
            hidden = (t * size).floor().long()
            masked = torch.arange(size) >= size - hidden[:, None]
        out[i] = ~masked if base != row else masked
    return out
