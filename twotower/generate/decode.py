"""The one decoding entry point that every front end calls (CLI, bench, eval, lm-eval, the
transformers wrapper, the server):

    out = decode(model, prompts, settings, callbacks, tokenizer=tokenizer)

``settings`` (``DecodingSettings``, usually from ``resolve_settings``) selects a registered
strategy; ``prompts`` are token ids, texts or conversations (see ``encode_prompts``).

Thread safety: one model runs one ``decode`` at a time; concurrent calls on the same model
wait for each other (each call's caches are its own, but a lora model's two towers share one
set of weights whose adapters a denoiser step switches on). Use one model per thread to run
decodes in parallel.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..errors import UsageError
from ..model.backbone import Backbone
from ..model.twotower import TwoTower
from .ar import GenerationStats, TokenCallback, prepare_prompts
from .diffusion import StepCallback
from .prompts import encode_prompts
from .settings import DecodingSettings
from .stopping import visible_text
from .strategies import decode_with, select


@dataclass
class DecodeCallbacks:
    on_token: TokenCallback | None = None  # (row, token) as each row's tokens become final
    on_step: StepCallback | None = None  # a StepEvent for every denoiser step (two-tower strategies)


@dataclass
class DecodeOutput:
    tokens: list[list[int]]  # per row: the generated tokens, up to and including the one that ended it
    finish_reasons: list[str]  # per row: "stop" (a stop token or string) or "length"
    texts: list[str] | None  # per row, special tokens skipped and stop strings cut; None without a tokenizer
    prompt_ids: list[list[int]]
    settings: DecodingSettings
    strategy: str
    stats: GenerationStats  # DiffusionStats for the two-tower strategies (NFE, block steps, acceptance)


def decode(
    model: TwoTower | Backbone,
    prompts,
    settings: DecodingSettings | None = None,
    callbacks: DecodeCallbacks | None = None,
    *,
    tokenizer=None,
    chat: bool = False,
    attention_mask: torch.Tensor | None = None,
) -> DecodeOutput:
    """Decode ``prompts`` with ``model`` (a TwoTower, or a Backbone for AR) as ``settings`` say.

    ``chat`` puts text prompts through the tokenizer's chat template (conversations always go
    through it); ``attention_mask`` describes left padding of a 2-D tensor of prompts."""
    settings = DecodingSettings() if settings is None else settings
    if not isinstance(settings, DecodingSettings):
        raise UsageError(f"settings must be a DecodingSettings, got {type(settings).__name__}")
    if not isinstance(model, TwoTower | Backbone):
        raise UsageError(f"model must be a TwoTower or a Backbone, got {type(model).__name__}")
    callbacks = callbacks or DecodeCallbacks()
    strategy = select(settings)
    ids = encode_prompts(prompts, tokenizer, chat)
    prompt_ids = prepare_prompts(ids, attention_mask)
    with getattr(model, "decode_lock", None) or nullcontext():
        out = decode_with(strategy, model, ids, settings, attention_mask=attention_mask, tokenizer=tokenizer,
                          on_token=callbacks.on_token, on_step=callbacks.on_step)
    texts = None
    if tokenizer is not None:
        texts = [visible_text(tokenizer, row, settings.stop_strings) for row in out.tokens]
    rows = [row[-n:].tolist() for row, n in zip(prompt_ids.input_ids, prompt_ids.lengths)]
    return DecodeOutput(out.tokens, out.finish_reasons, texts, rows, settings, strategy.name, out.stats)
