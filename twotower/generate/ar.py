"""Plain autoregressive decoding with our KV/Mamba cache: the quality reference and the speed
baseline for every other mode."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..model.backbone import Backbone
from .sampling import Sampler

TokenCallback = Callable[[int, int], None]  # (row, token), called as each row's tokens are final


@dataclass
class GenerationStats:
    nfe: int = 0  # batched forward passes that produced new tokens (the prompt pass yields the first one)
    row_nfe: list[int] = field(default_factory=list)  # per row: the passes made while it was unfinished
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    new_tokens: list[int] = field(default_factory=list)  # per row, EOS included, nothing after it

    @property
    def total_new_tokens(self) -> int:
        return sum(self.new_tokens)

    @property
    def tokens_per_nfe(self) -> float:
        """Tokens per forward pass of a row (so batch size does not inflate it: AR is 1.0)."""
        passes = sum(self.row_nfe)
        return self.total_new_tokens / passes if passes else 0.0

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens (prompt excluded) per second of the whole call, prompt pass included."""
        return self.total_new_tokens / self.seconds if self.seconds else 0.0


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # generated tokens per row, up to and including EOS
    stats: GenerationStats


@dataclass
class Prompts:
    """A batch of prompts, left-padded into one tensor."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor | None  # (B, T), None when no row is padded
    lengths: list[int]


def prepare_prompts(
    input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int = 0,
) -> Prompts:
    """Accept one prompt (1-D), a padded batch (2-D + optional left-padding mask) or a list of
    token lists of any lengths, and return a left-padded batch."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be 1-D or 2-D, got shape {tuple(input_ids.shape)}")
        rows = [
            row[mask.bool()].tolist() if mask is not None else row.tolist()
            for row, mask in zip(input_ids, attention_mask if attention_mask is not None else [None] * len(input_ids))
        ]
    else:
        seq = list(input_ids)
        rows = [list(r) for r in seq] if seq and not isinstance(seq[0], int) else [seq]
    if not rows:
        raise ValueError("no prompts given")
    for i, r in enumerate(rows):
        if not r:
            raise ValueError(f"prompt {i} is empty: give at least one token")
    lengths = [len(r) for r in rows]
    width = max(lengths)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = True
    return Prompts(ids, None if bool(mask.all()) else mask, lengths)


def check_generation_args(model: Backbone, prompts: Prompts, max_new_tokens: int) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    context = model.config.max_position_embeddings
    longest = max(prompts.lengths)
    if longest + max_new_tokens > context:
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's context of {context} tokens"
        )
    model.check_token_ids(prompts.input_ids)


def eos_set(model: Backbone, eos_token_id: int | Sequence[int] | None) -> set[int]:
    if eos_token_id is None:
        return set(model.config.eos_token_ids)
    return {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)


@torch.inference_mode()
def generate_ar(
    model: Backbone,
    input_ids,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    seed: int | None = None,
    callback: TokenCallback | None = None,
) -> GenerationOutput:
    """Decode token by token with the cache; every row stops at its own EOS.

    ``eos_token_id`` defaults to the model's EOS ids; pass ``[]`` to never stop early."""
    prompts = prepare_prompts(input_ids, attention_mask)
    check_generation_args(model, prompts, max_new_tokens)
    batch = len(prompts.lengths)
    device = model.device
    sampler = Sampler(batch, temperature, top_k, top_p, seed, device)
    stops = eos_set(model, eos_token_id)
    cache = model.new_cache(batch, prompts.input_ids.shape[1] + max_new_tokens)
    stats = GenerationStats(new_tokens=[0] * batch)
    out: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch

    start = time.perf_counter()
    mask = prompts.attention_mask.to(device) if prompts.attention_mask is not None else None
    logits = model(prompts.input_ids.to(device), cache, attention_mask=mask, last_only=True)
    stats.nfe = 1
    stats.prefill_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for step in range(max_new_tokens):
        tokens = sampler(logits[:, -1])
        # one transfer per step, then plain Python: per-row tensor indexing costs milliseconds
        # a step at distillation's batch sizes
        for row, tok in enumerate(tokens.tolist()):
            if done[row]:
                continue
            out[row].append(tok)
            if callback is not None:
                callback(row, tok)
            if tok in stops:
                done[row] = True
        if all(done) or step == max_new_tokens - 1:
            break
        logits = model(tokens[:, None], cache, last_only=True)
        stats.nfe += 1
    stats.decode_seconds = time.perf_counter() - start
    stats.new_tokens = [len(r) for r in out]
    stats.row_nfe = list(stats.new_tokens)  # one pass per token, the prompt pass included
    return GenerationOutput(out, stats)
