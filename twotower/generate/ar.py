"""Plain autoregressive decoding with our KV/Mamba cache: the quality reference and the speed
baseline for every other mode."""

from __future__ import annotations

import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import UsageError
from ..model.backbone import Backbone
from ..model.cache import ModelCache
from .rows import OnBoundary
from .sampling import Sampler
from .stopping import ShouldStop, Stopper, row_limits

TokenCallback = Callable[[int, int], None]  # (row, token), called as each row's tokens are final
# (row, tokens, logits (n, V)): the n tokens a row has just made final and the AR model's logits
# at each, called before their TokenCallbacks; only strategies whose tokens the AR model scores
# (``Strategy.scores_tokens``) call it, so that logprobs are always the AR model's
LogitsCallback = Callable[[int, list[int], torch.Tensor], None]


def shape_rows(shape: str) -> int:
    """Token rows per batch row of a forward shape ("context 5", "fused 1+4": 5)."""
    return sum(int(n) for n in shape.split()[1].split("+"))


@dataclass
class GenerationStats:
    nfe: int = 0  # batched forward passes that produced new tokens (the prompt pass yields the first one)
    row_nfe: list[int] = field(default_factory=list)  # per row: the passes made while it was unfinished
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    new_tokens: list[int] = field(default_factory=list)  # per row, EOS included, nothing after it
    # every forward after the prompt pass, of either tower or of both at once (a fused pass), and
    # the tokens each computed per batch row: what a step costs, beside what it yields
    forwards: int = 0
    # forwards by shape, "context 5" / "denoiser 4" / "fused 1+4" (tokens per batch row of each
    # tower): what a cost model needs to price them (bench/cost.py)
    forward_shapes: dict[str, int] = field(default_factory=dict)

    def counted(self, kind: str, rows: int, block: int = 0) -> None:
        """One more forward: the context tower over ``rows`` tokens per batch row ("context", or
        "tree": a token tree), the denoiser over a block of ``rows`` ("denoiser", or "drafter":
        the model's verify_drafter), or both at once ("fused": ``rows`` context rows and
        ``block``)."""
        self.forwards += 1
        shape = f"{kind} {rows}+{block}" if kind == "fused" else f"{kind} {rows}"
        self.forward_shapes[shape] = self.forward_shapes.get(shape, 0) + 1

    @property
    def forward_rows(self) -> int:
        return sum(shape_rows(shape) * n for shape, n in self.forward_shapes.items())

    @property
    def forwards_per_token(self) -> float:
        """Forwards per generated token of a row (batch size does not deflate it: AR is ~1.0)."""
        per_row = self.total_new_tokens / len(self.new_tokens) if self.new_tokens else 0
        return self.forwards / per_row if per_row else 0.0

    @property
    def rows_per_forward(self) -> float:
        return self.forward_rows / self.forwards if self.forwards else 0.0

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
    finish_reasons: list[str] = field(default_factory=list)  # per row: "stop" or "length"


@dataclass
class Prompts:
    """A batch of prompts, left-padded into one tensor."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor | None  # (B, T), None when no row is padded
    lengths: list[int]


def _token_list(row, where: str) -> list[int]:
    """A prompt as plain ints: Python or NumPy integers, or 0-d integer tensors."""
    if isinstance(row, str | bytes | dict) or not isinstance(row, Sequence | torch.Tensor | np.ndarray):
        raise UsageError(f"{where}: expected token ids (a list of ints), got {type(row).__name__}")
    if isinstance(row, torch.Tensor | np.ndarray) and row.ndim != 1:
        raise UsageError(f"{where}: expected a 1-D row of token ids, got shape {tuple(row.shape)}")
    out = []
    for tok in row:
        if isinstance(tok, bool) or (isinstance(tok, torch.Tensor) and tok.dtype == torch.bool):
            raise UsageError(f"{where}: token ids are integers, got a bool")
        try:
            out.append(operator.index(tok))
        except TypeError:
            raise UsageError(f"{where}: token ids are integers, got {type(tok).__name__} {tok!r}") from None
    return out


def _padding_mask(mask, shape: torch.Size) -> torch.Tensor:
    """An attention mask that marks each row's real tokens with 1 and its padding with 0, the
    padding on one side (left, as decoding wants, or right, which is read the same way)."""
    mask = torch.as_tensor(mask)
    if mask.shape != shape:
        raise UsageError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(shape)}: they must match")
    if mask.is_floating_point() or mask.is_complex() or bool(((mask != 0) & (mask != 1)).any()):
        raise UsageError("attention_mask must hold 0 or 1 (1 for a real token, 0 for padding)")
    m = mask.bool()
    changes = (m[:, 1:] != m[:, :-1]).sum(1)  # one change at most: padding at one end
    if bool((changes > 1).any()):
        raise UsageError("attention_mask must mark padding at one end of each row (zeros then ones, or ones then "
                         "zeros), not in the middle")
    return m


def prepare_prompts(
    input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int = 0,
) -> Prompts:
    """Accept one prompt (1-D), a padded batch (2-D + optional left-padding mask) or a list of
    token lists of any lengths, and return a left-padded batch."""
    if not isinstance(input_ids, torch.Tensor) and hasattr(input_ids, "__array__"):  # NumPy and the like
        input_ids = torch.as_tensor(input_ids)
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dtype == torch.bool or input_ids.is_floating_point() or input_ids.is_complex():
            raise UsageError(f"input_ids must hold integer token ids, got a {input_ids.dtype} tensor")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
            attention_mask = None if attention_mask is None else torch.as_tensor(attention_mask).reshape(1, -1)
        if input_ids.dim() != 2:
            raise UsageError(f"input_ids must be 1-D or 2-D, got shape {tuple(input_ids.shape)}")
        if attention_mask is not None:
            attention_mask = _padding_mask(attention_mask, input_ids.shape)
        rows = [
            row[mask.bool()].tolist() if mask is not None else row.tolist()
            for row, mask in zip(input_ids, attention_mask if attention_mask is not None else [None] * len(input_ids))
        ]
    elif isinstance(input_ids, (str, bytes)) or not isinstance(input_ids, Sequence):
        raise UsageError(f"input_ids must be token ids (a tensor or lists of ints), got {type(input_ids).__name__}")
    else:
        seq = list(input_ids)
        nested = bool(seq) and isinstance(seq[0], Sequence | torch.Tensor) and not (
            isinstance(seq[0], torch.Tensor) and seq[0].dim() == 0)
        rows = [_token_list(r, f"prompt {i}") for i, r in enumerate(seq)] if nested else [_token_list(seq, "prompt 0")]
    if not rows:
        raise UsageError("no prompts given")
    for i, r in enumerate(rows):
        if not r:
            raise UsageError(f"prompt {i} is empty: give at least one token")
    lengths = [len(r) for r in rows]
    width = max(lengths)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = True
    return Prompts(ids, None if bool(mask.all()) else mask, lengths)


def check_generation_args(model: Backbone, prompts: Prompts, max_new_tokens: int | Sequence[int], reserve: int = 0,
                          why: str = "") -> list[int]:
    """Every row's prompt + its ``max_new_tokens`` (one for all rows, or one per row) + ``reserve``
    positions that the decoding needs too (``why``) must fit the model's context; returns the
    per-row limits."""
    limits = row_limits(max_new_tokens, len(prompts.lengths))
    context = model.config.max_position_embeddings
    for i, (length, limit) in enumerate(zip(prompts.lengths, limits)):
        if length + limit + reserve > context:
            extra = f" + {reserve} ({why})" if reserve else ""
            which = "the longest prompt" if len(set(limits)) == 1 and length == max(prompts.lengths) else f"prompt {i}"
            raise UsageError(
                f"{which} ({length} tokens) + max_new_tokens={limit}{extra} exceeds the model's "
                f"context of {context} tokens"
            )
    model.check_token_ids(prompts.input_ids)
    return limits


def eos_set(model: Backbone, eos_token_id: int | Sequence[int] | None) -> set[int]:
    """The stop token ids: the model's EOS ids for None, else the id or ids given ([]: none)."""
    if eos_token_id is None:
        return set(model.config.eos_token_ids)
    ids = [eos_token_id] if isinstance(eos_token_id, int) and not isinstance(eos_token_id, bool) else eos_token_id
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence | set | frozenset):
        raise UsageError(f"eos_token_id must be a token id, a list of them or None, got {eos_token_id!r}")
    ids = list(ids)
    vocab = model.config.vocab_size
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab]
    if bad:
        raise UsageError(f"eos_token_id: {bad[0]!r} is not a token id of this model (0 .. {vocab - 1})")
    return set(ids)


def new_stopper(model: Backbone, batch: int, max_new_tokens: int | Sequence[int], eos_token_id,
                stop_strings: Sequence = (), tokenizer=None, should_stop: ShouldStop | None = None) -> Stopper:
    return Stopper(batch, max_new_tokens, eos_set(model, eos_token_id), stop_strings, tokenizer, should_stop)


@torch.inference_mode()
def generate_ar(
    model: Backbone,
    input_ids,
    max_new_tokens: int | Sequence[int] = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    seed: int | Sequence[int | None] | None = None,
    callback: TokenCallback | None = None,
    stop_strings: Sequence = (),
    tokenizer=None,
    should_stop: ShouldStop | None = None,
    on_boundary: OnBoundary | None = None,
    logits_callback: LogitsCallback | None = None,
) -> GenerationOutput:
    """Decode token by token with the cache; every row stops at its own EOS.

    ``eos_token_id`` defaults to the model's EOS ids; pass ``[]`` to never stop early. A row
    also ends at the token that completes one of ``stop_strings`` (read with ``tokenizer``).
    ``max_new_tokens``, ``seed`` and ``stop_strings`` may be given per row (rows that came from
    different requests); ``should_stop(row)`` may end a row early with the reason it returns.
    ``on_boundary`` lets finished rows leave and new ones join between tokens (rows.py);
    ``logits_callback`` receives the logits every kept token was drawn from."""
    prompts = prepare_prompts(input_ids, attention_mask)
    limits = check_generation_args(model, prompts, max_new_tokens)
    batch = len(prompts.lengths)
    device = model.device
    sampler = Sampler(batch, temperature, top_k, top_p, seed, device)
    stopper = new_stopper(model, batch, limits, eos_token_id, stop_strings, tokenizer, should_stop)
    stats = GenerationStats(new_tokens=[0] * batch)

    # greedy steps without a logits callback read only each row's argmax: the passes end at the
    # final hidden states and Backbone.argmax_tokens picks (the full head's tokens, cheaper)
    picks_only = sampler.greedy and logits_callback is None
    start = time.perf_counter()
    cache, logits = _prefill(model, prompts, limits, head=not picks_only)
    stats.nfe = 1
    stats.prefill_seconds = time.perf_counter() - start
    start = time.perf_counter()
    rows = list(range(batch))  # the row id of each batch row (rows leave and join with on_boundary)
    while True:  # logits: (rows, 1, V), or their hidden states (rows, 1, H) where picks_only
        tokens = model.argmax_tokens(logits[:, -1]) if picks_only else sampler(logits[:, -1], rows)
        # one transfer per step, then plain Python: per-row tensor indexing costs milliseconds
        # a step at distillation's batch sizes
        for i, (row, tok) in enumerate(zip(rows, tokens.tolist())):
            if stopper.extend(row, [tok]):
                if logits_callback is not None:
                    logits_callback(row, [tok], logits[i, -1:])
                if callback is not None:
                    callback(row, tok)
        if on_boundary is None:
            if stopper.all_finished:
                break
        else:  # finished rows leave; new ones join after the step of those that go on
            finished = stopper.finished
            keep = [i for i, row in enumerate(rows) if not finished[row]]
            rows = [rows[i] for i in keep]
            joining = list(on_boundary(list(rows)))
            if len(keep) < len(tokens):
                cache.regroup(torch.tensor(keep, dtype=torch.long))
                tokens = tokens[keep]
        if rows:
            logits = model(tokens[:, None], cache, last_only=True, head=not picks_only)
            stats.nfe += 1
            stats.counted("context", 1)
        if on_boundary is not None and joining:
            joined = prepare_prompts([list(r.prompt_ids) for r in joining])
            new_limits = check_generation_args(model, joined, [r.max_new_tokens for r in joining])
            going_on = len(rows)  # rows of the cache (and of logits, when there are any)
            rows += stopper.add(new_limits, [r.stop_strings for r in joining])
            sampler.add([r.seed for r in joining])
            new_cache, new_logits = _prefill(model, joined, new_limits, head=not picks_only)
            cache.regroup(torch.arange(going_on), new_cache)
            logits = torch.cat([logits, new_logits]) if going_on else new_logits
        if not rows:
            break
    stats.decode_seconds = time.perf_counter() - start
    stats.new_tokens = [len(r) for r in stopper.tokens]
    stats.row_nfe = list(stats.new_tokens)  # one pass per token, the prompt pass included
    return GenerationOutput(stopper.tokens, stats, stopper.reasons)


def by_length(prompts: Prompts) -> list[list[int]]:
    """The rows of a padded batch grouped by prompt length (in order of first appearance)."""
    groups: dict[int, list[int]] = {}
    for row, length in enumerate(prompts.lengths):
        groups.setdefault(length, []).append(row)
    return list(groups.values())


def prefill_unpadded(model: Backbone, prompts: Prompts, limits: list[int], reserve: int,
                     forward) -> tuple[ModelCache, torch.Tensor | None]:
    """A cache over ``prompts`` filled by ``forward(ids, cache) -> tensor`` once per group of equal
    lengths, so that no pass holds padding; returns the cache (rows in the prompts' order) and
    the forwards' outputs concatenated in that order. Exact attention serves a padded batch by
    compacting every query's keys, which costs many times an unpadded pass; each row's slots
    are its own, so the rows are what they would be alone either way."""
    width = prompts.input_ids.shape[1]
    groups = by_length(prompts) if prompts.attention_mask is not None else [list(range(len(prompts.lengths)))]
    cache, outputs, order = None, [], []
    for rows in groups:
        length = prompts.lengths[rows[0]]
        ids = prompts.input_ids[rows, width - length:].to(model.device)
        part = model.new_cache(len(rows), length + max(limits[r] for r in rows) + reserve)
        outputs.append(forward(ids, part))
        order += rows
        if cache is None:
            cache = part
        else:
            cache.regroup(torch.arange(cache.batch_size), part)
    out = torch.cat(outputs) if all(o is not None for o in outputs) else None
    if order != sorted(order):  # back to the prompts' order
        back = torch.argsort(torch.tensor(order))
        cache.regroup(back)
        out = None if out is None else out[back]
    return cache, out


def _prefill(model: Backbone, prompts: Prompts, limits: list[int], head: bool = True) -> tuple[ModelCache, torch.Tensor]:
    """A cache for ``prompts`` and the logits of the next token after each (``head=False``: the
    final hidden states instead)."""
    return prefill_unpadded(model, prompts, limits, 0, lambda ids, cache: model(ids, cache, last_only=True, head=head))
