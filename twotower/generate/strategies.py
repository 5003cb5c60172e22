"""Decoding strategies: registered objects, one per way of decoding, so that front ends pick one
by the settings' name instead of each writing its own if/elif over modes and flags.

A strategy decodes a batch of prompt ids with ``DecodingSettings`` and returns the decoder's
output (tokens, finish reasons, statistics). ``decode()`` selects it with ``select(settings)``;
a new strategy (say a fused draft-and-verify pass) is one ``register`` call away from every
front end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import UsageError
from ..model.backbone import Backbone
from ..model.twotower import TwoTower
from .ar import GenerationOutput, LogitsCallback, TokenCallback, generate_ar
from .diffusion import StepCallback, generate_mask_diffusion, generate_mock_ar
from .rows import OnBoundary
from .settings import DecodingSettings
from .stopping import ShouldStop

Decoder = Callable[..., GenerationOutput]


@dataclass(frozen=True)
class Strategy:
    name: str
    mode: str  # the released mode it belongs to
    needs_denoiser: bool
    description: str
    run: Decoder  # (model, input_ids, settings, **common) -> output; see decode_with
    # the AR model scores every token it emits (its logits reach on_logits: logprobs); the
    # unverified dial's tokens come from the denoiser alone
    scores_tokens: bool = False


STRATEGIES: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    if strategy.name in STRATEGIES:
        raise ValueError(f"a strategy named {strategy.name!r} is registered already")
    STRATEGIES[strategy.name] = strategy
    return strategy


def modes() -> tuple[str, ...]:
    """The modes the registered strategies cover (what ``--mode`` offers)."""
    return tuple(sorted({s.mode for s in STRATEGIES.values()}))


def scoring_strategies() -> list[str]:
    """The strategies whose every token the AR model scores (the ones with logprobs)."""
    return [name for name, s in STRATEGIES.items() if s.scores_tokens]


def select(settings: DecodingSettings) -> Strategy:
    try:
        return STRATEGIES[settings.strategy]
    except KeyError:
        raise UsageError(f"no strategy {settings.strategy!r} (registered: {', '.join(STRATEGIES)})") from None


def decode_with(
    strategy: Strategy, model: TwoTower | Backbone, input_ids, settings: DecodingSettings | Sequence[DecodingSettings],
    *, attention_mask: torch.Tensor | None = None, tokenizer=None, on_token: TokenCallback | None = None,
    on_step: StepCallback | None = None, should_stop: ShouldStop | None = None, on_boundary: OnBoundary | None = None,
    on_logits: LogitsCallback | None = None,
) -> GenerationOutput:
    """``settings``: one for every row, or one per row that differ only in their length limit,
    seed and stop strings (``decode.row_settings`` checks that). ``on_logits`` needs a strategy
    that scores its tokens."""
    if on_logits is not None and not strategy.scores_tokens:
        raise UsageError(f"strategy {strategy.name} does not score its tokens with the AR model, so it has no "
                         f"logprobs (those that do: {', '.join(scoring_strategies())})")
    if strategy.needs_denoiser and not isinstance(model, TwoTower):
        raise UsageError(f"mode {strategy.mode} needs a two-tower model; this is a backbone alone (AR only)")
    rows = [settings] if isinstance(settings, DecodingSettings) else list(settings)
    settings = rows[0]
    per_row = len(rows) > 1
    common = dict(
        max_new_tokens=[s.max_new_tokens for s in rows] if per_row else settings.max_new_tokens,
        temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
        seed=[s.seed for s in rows] if per_row else settings.seed, attention_mask=attention_mask, callback=on_token,
        eos_token_id=None if settings.stop_token_ids is None else list(settings.stop_token_ids),
        stop_strings=[s.stop_strings for s in rows] if per_row else settings.stop_strings, tokenizer=tokenizer,
        should_stop=should_stop, on_boundary=on_boundary,
    )
    if strategy.needs_denoiser:
        common["step_callback"] = on_step
    if on_logits is not None:
        common["logits_callback"] = on_logits
    return strategy.run(model, input_ids, settings, **common)


def _ar(model, input_ids, settings: DecodingSettings, **common) -> GenerationOutput:
    return generate_ar(model.context if isinstance(model, TwoTower) else model, input_ids, **common)


def _mock_ar(model, input_ids, settings: DecodingSettings, **common) -> GenerationOutput:
    return generate_mock_ar(model, input_ids, commit_rule=settings.commit_rule, **common)


def _diffusion(model, input_ids, settings: DecodingSettings, **common) -> GenerationOutput:
    return generate_mask_diffusion(
        model, input_ids, block_size=settings.block_size, steps_per_block=settings.steps_per_block,
        confidence_threshold=settings.confidence_threshold, commit_rule=settings.commit_rule,
        verify=settings.verify, fused=settings.fused, tree_nodes=settings.tree_nodes, **common,
    )


register(Strategy("ar", "ar", False, "the context tower alone, token by token (KV-cached)", _ar, scores_tokens=True))
register(Strategy("mock_ar", "mock_ar", True, "both towers, one token per denoiser forward (S = 1)", _mock_ar))
register(Strategy("mask_diffusion", "mask_diffusion", True,
                  "block diffusion: the denoiser fills each block over steps, a commit rule keeps the confident",
                  _diffusion))
register(Strategy("verified", "mask_diffusion", True,
                  "verified drafting: each denoiser forward drafts, the context tower keeps what agrees (== AR)",
                  _diffusion, scores_tokens=True))
register(Strategy("fused", "mask_diffusion", True,
                  "verified drafting in one forward per step: the check of a draft and the next draft share a pass "
                  "(lora flavour; == AR)", _diffusion, scores_tokens=True))
register(Strategy("fused_dial", "mask_diffusion", True,
                  "block diffusion with a block's context pass and the next block's first step in one forward "
                  "(lora flavour; == mask_diffusion)", _diffusion))
