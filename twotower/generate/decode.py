"""The one decoding entry point that every front end calls (CLI, bench, eval, lm-eval, the
transformers wrapper, the server):

    out = decode(model, prompts, settings, callbacks, tokenizer=tokenizer)

``settings`` (``DecodingSettings``, usually from ``resolve_settings``) selects a registered
strategy; ``prompts`` are token ids, texts or conversations (see ``encode_prompts``). A list of
settings, one per prompt, lets rows of different requests share a batch (a server's): they
must agree on all but ``ROW_FIELDS`` (each row's length limit, seed and stop strings), and each
row's output is what it would be alone.

Thread safety: one model runs one ``decode`` at a time; concurrent calls on the same model
wait for each other (each call's caches are its own, but a lora model's two towers share one
set of weights whose adapters a denoiser step switches on). Use one model per thread to run
decodes in parallel.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..errors import UsageError
from ..model.backbone import Backbone
from ..model.fused import check_fusable
from ..model.twotower import TwoTower
from .ar import GenerationStats, LogitsCallback, TokenCallback, check_generation_args, prepare_prompts
from .diffusion import StepCallback, check_tree, overrun_positions
from .prompts import encode_prompts
from .rows import OnBoundary
from .settings import DecodingSettings
from .stopping import ShouldStop, visible_text
from .strategies import decode_with, scoring_strategies, select

ROW_FIELDS = ("max_new_tokens", "seed", "stop_strings")  # settings that may differ between the rows of one call


@dataclass
class DecodeCallbacks:
    on_token: TokenCallback | None = None  # (row, token) as each row's tokens become final
    on_step: StepCallback | None = None  # a StepEvent for every denoiser step (two-tower strategies)
    should_stop: ShouldStop | None = None  # (row) -> a finish reason to end that row now (cancelled), or None
    # between steps: (ids of the rows going on) -> NewRows to join the call (rows.py); finished
    # rows leave the batch. Rows are named by ids: the prompts 0..B-1, then joined rows in order
    on_boundary: OnBoundary | None = None
    # (row, tokens, logits (n, V)): a row's n newly final tokens and the AR model's logits at
    # each, before their on_token calls (logprobs); only strategies that score their tokens
    on_logits: LogitsCallback | None = None


@dataclass
class DecodeOutput:
    tokens: list[list[int]]  # per row (joined rows too): the generated tokens, up to and including the one that ended it
    finish_reasons: list[str]  # per row: "stop" (a stop token or string), "length", or should_stop's reason
    texts: list[str] | None  # per row, special tokens skipped and stop strings cut; None without a tokenizer
    prompt_ids: list[list[int]]
    settings: DecodingSettings  # the first row's (all rows' but ROW_FIELDS)
    strategy: str
    stats: GenerationStats  # DiffusionStats for the two-tower strategies (NFE, block steps, acceptance)


def batch_key(settings: DecodingSettings) -> DecodingSettings:
    """What rows of one call must share: the settings with ROW_FIELDS set aside."""
    return settings.replace(max_new_tokens=1, seed=None, stop_strings=())


def row_settings(settings: DecodingSettings | Sequence[DecodingSettings] | None, batch: int) -> list[DecodingSettings]:
    """One DecodingSettings per row; rows of one call must share everything but ROW_FIELDS."""
    if settings is None or isinstance(settings, DecodingSettings):
        return [settings or DecodingSettings()] * batch
    if isinstance(settings, str) or not isinstance(settings, Sequence):
        raise UsageError(f"settings must be a DecodingSettings or a list of them, got {type(settings).__name__}")
    rows = list(settings)
    if len(rows) != batch:
        raise UsageError(f"{len(rows)} settings for {batch} prompts: give one, or one per prompt")
    for row in rows:
        if not isinstance(row, DecodingSettings):
            raise UsageError(f"settings must be a DecodingSettings, got {type(row).__name__}")
    if any(batch_key(row) != batch_key(rows[0]) for row in rows):
        raise UsageError(f"rows of one decode call may differ only in {', '.join(ROW_FIELDS)}")
    return rows


def decode(
    model: TwoTower | Backbone,
    prompts,
    settings: DecodingSettings | Sequence[DecodingSettings] | None = None,
    callbacks: DecodeCallbacks | None = None,
    *,
    tokenizer=None,
    chat: bool = False,
    attention_mask: torch.Tensor | None = None,
) -> DecodeOutput:
    """Decode ``prompts`` with ``model`` (a TwoTower, or a Backbone for AR) as ``settings`` say
    (one for every prompt, or one per prompt: see ``row_settings``).

    ``chat`` puts text prompts through the tokenizer's chat template (conversations always go
    through it); ``attention_mask`` describes left padding of a 2-D tensor of prompts."""
    if settings is not None and not isinstance(settings, DecodingSettings | Sequence):
        raise UsageError(f"settings must be a DecodingSettings, got {type(settings).__name__}")
    if not isinstance(model, TwoTower | Backbone):
        raise UsageError(f"model must be a TwoTower or a Backbone, got {type(model).__name__}")
    callbacks = callbacks or DecodeCallbacks()
    ids = encode_prompts(prompts, tokenizer, chat)
    prompt_ids = prepare_prompts(ids, attention_mask)
    rows = row_settings(settings, len(prompt_ids.lengths))
    strategy = select(rows[0])
    with getattr(model, "decode_lock", None) or nullcontext():
        out = decode_with(strategy, model, ids, rows, attention_mask=attention_mask, tokenizer=tokenizer,
                          on_token=callbacks.on_token, on_step=callbacks.on_step, should_stop=callbacks.should_stop,
                          on_boundary=callbacks.on_boundary, on_logits=callbacks.on_logits)
    texts = None
    if tokenizer is not None:  # (rows that joined the call are the callback's to read)
        texts = [visible_text(tokenizer, row, s.stop_strings) for row, s in zip(out.tokens, rows)]
    prompt_rows = [row[-n:].tolist() for row, n in zip(prompt_ids.input_ids, prompt_ids.lengths)]
    return DecodeOutput(out.tokens, out.finish_reasons, texts, prompt_rows, rows[0], strategy.name, out.stats)


def check_request(model: TwoTower | Backbone, prompt_ids: Sequence[int], settings: DecodingSettings,
                  logprobs: bool = False) -> None:
    """Raise the UsageError that ``decode`` would raise for one prompt's token ids and its
    settings, before any forward (a server checks a request before queueing it): an unknown
    strategy, a strategy the model cannot run (or, with ``logprobs``, one that does not score
    its tokens), token ids outside the vocabulary, the mask token in the prompt, or a prompt
    that with its max_new_tokens does not fit the context."""
    strategy = select(settings)
    if strategy.needs_denoiser and not isinstance(model, TwoTower):
        raise UsageError(f"mode {strategy.mode} needs a two-tower model; this server has the AR model alone")
    if logprobs and not strategy.scores_tokens:
        raise UsageError(f"logprobs: strategy {strategy.name} commits the denoiser's tokens unscored, so it has no "
                         f"logprobs; ask for one that the AR model verifies ({', '.join(scoring_strategies())})")
    prompts = prepare_prompts([list(prompt_ids)])
    context = model.context if isinstance(model, TwoTower) else model
    reserve = 0
    if strategy.needs_denoiser:
        block = 1 if settings.mode == "mock_ar" else settings.block_size or model.block_size
        reserve = overrun_positions(block, settings.verify, settings.fused, settings.tree_nodes)
        check_tree(model, settings.tree_nodes, settings.verify, settings.fused)
        if model.mask_token_id in prompt_ids:
            raise UsageError(f"the prompt contains the mask token id {model.mask_token_id}")
        if settings.verify and not model.config.token_shift:
            raise UsageError("verify needs the token-shift block layout")
        if settings.fused:
            if settings.verify and block < 2:
                raise UsageError("fused with verify needs block_size >= 2 (a draft and the guess after it)")
            check_fusable(model)
    check_generation_args(context, prompts, settings.max_new_tokens, reserve,
                          why="the last block or draft may run past max_new_tokens")
