"""Block-diffusion decoding with the two towers: mask diffusion, mock-AR (S = 1) and verified
decoding (every committed block checked against the context tower's own predictions).

Per block: the denoiser fills the S targets over at most ``steps_per_block`` forwards, a
commit rule deciding which proposals become final; then the context tower advances over the
block's inputs in one pass (it always lags one token, DESIGN.md §1). Every decision is per
row, and the context state only ever holds committed tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..model.cache import ModelCache
from ..model.twotower import TwoTower
from .ar import GenerationStats, TokenCallback, check_generation_args, eos_set, prepare_prompts
from .commit import CommitRule, get_commit_rule
from .sampling import Sampler


DEFAULT_CONFIDENCE_THRESHOLD = 0.9  # the released model's default


@dataclass
class StepEvent:
    """What one denoiser step decided, for visualisation and streaming."""

    block: int  # block index within this call
    step: int  # step within the block, from 0
    committed: torch.Tensor  # (B, S) bool: targets committed at this step
    tokens: torch.Tensor  # (B, S) the block's targets committed so far, -1 where unknown


StepCallback = Callable[[StepEvent], None]


@dataclass
class DiffusionStats(GenerationStats):
    context_passes: int = 0  # context-tower passes over committed blocks (prompt pass excluded)
    block_steps: list[list[int]] = field(default_factory=list)  # per row: denoiser steps of each block
    accepted: list[list[int]] = field(default_factory=list)  # per row: tokens kept of each block (verify)


@dataclass
class DiffusionOutput:
    tokens: list[list[int]]
    stats: DiffusionStats
    # the context tower's final state (with return_cache=True): prompt + tokens[:-1] per row;
    # made of inference tensors, so extend it under torch.inference_mode()
    cache: ModelCache | None = None


def _check(block_size: int, steps: int, threshold: float) -> None:
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps_per_block must be an integer >= 1, got {steps!r}")
    if not 0.0 <= threshold <= 1.0:  # also rejects NaN
        raise ValueError(f"confidence_threshold must be in [0, 1], got {threshold}")


@torch.inference_mode()
def generate_mask_diffusion(
    model: TwoTower,
    input_ids,
    max_new_tokens: int = 128,
    block_size: int | None = None,
    steps_per_block: int | None = None,
    mask_token_id: int | None = None,
    temperature: float = 0.0,
    confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD,
    eos_token_id: int | Sequence[int] | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    commit_rule: str | CommitRule = "threshold",
    verify: bool = False,
    attention_mask: torch.Tensor | None = None,
    step_callback: StepCallback | None = None,
    callback: TokenCallback | None = None,
    return_cache: bool = False,
) -> DiffusionOutput:
    """Fill blocks of ``block_size`` targets (default: the model's), at most ``steps_per_block``
    denoiser forwards each (default: block_size). ``confidence_threshold`` is the dial: lower
    is faster, higher is safer. With ``verify=True`` the output equals ``generate_ar`` at
    temperature 0 whatever the threshold; with sampling it follows speculative-sampling
    acceptance (exactly the AR distribution for the left-prefix rule, whose proposals only
    condition on their left; confidence is then the top probability, not the drawn token's)."""
    s = model.block_size if block_size is None else block_size
    steps = s if steps_per_block is None else steps_per_block
    _check(s, steps, confidence_threshold)
    if mask_token_id is not None and mask_token_id != model.mask_token_id:
        raise ValueError(f"mask_token_id {mask_token_id} differs from this model's mask token {model.mask_token_id}")
    rule = get_commit_rule(commit_rule)
    shift = 1 if model.config.token_shift else 0
    if verify and not shift:
        raise ValueError("verify=True needs the token-shift block layout")

    context = model.context
    prompts = prepare_prompts(input_ids, attention_mask)
    check_generation_args(context, prompts, max_new_tokens)
    check_generation_args(context, prompts, max_new_tokens + s - 1)  # the last block may overrun
    if prompts.attention_mask is None:
        in_prompt = prompts.input_ids == model.mask_token_id
    else:
        in_prompt = (prompts.input_ids == model.mask_token_id) & prompts.attention_mask
    if bool(in_prompt.any()):
        raise ValueError(f"the prompt contains the mask token id {model.mask_token_id}")
    device = context.device
    batch, width = prompts.input_ids.shape
    sampler = Sampler(batch, temperature, top_k, top_p, seed, device)
    stops = eos_set(context, eos_token_id)
    ids = prompts.input_ids.to(device)
    mask = prompts.attention_mask.to(device) if prompts.attention_mask is not None else None

    start = time.perf_counter()
    # at most width - 1 + max_new_tokens slots hold committed tokens; every context pass appends
    # s more to every row (finished rows too) before rolling back
    cache = context.new_cache(batch, width + max_new_tokens + s - 1)
    if width > shift:  # with token shift the last prompt token is the first block's input
        prefix_mask = None if mask is None else mask[:, : width - shift]
        model.context_forward(ids[:, : width - shift], cache, attention_mask=prefix_mask)
    stats = DiffusionStats(new_tokens=[0] * batch, block_steps=[[] for _ in range(batch)],
                           accepted=[[] for _ in range(batch)])
    stats.prefill_seconds = time.perf_counter() - start
    start = time.perf_counter()

    out: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    anchor = ids[:, -1].clone()
    block = 0
    while not all(done):
        active = torch.tensor([not d for d in done], device=device)
        tokens = torch.full((batch, s), -1, dtype=torch.long, device=device)
        unknown = active[:, None].expand(batch, s).clone()
        block_in = torch.full((batch, s), model.mask_token_id, dtype=torch.long, device=device)
        if shift:
            block_in[:, 0] = anchor
        q_probs = None
        if verify and not sampler.greedy:
            q_probs = torch.zeros(batch, s, context.config.vocab_size, device=device)
        steps_used = torch.zeros(batch, dtype=torch.long)
        step = 0
        while bool(unknown.any()):
            t = unknown.sum(1).float() / s
            logits = model.denoise_block(block_in, t, cache)
            stats.nfe += 1
            # rows whose block is complete draw nothing: a row's random stream must not depend
            # on how many steps its batch mates need
            live = unknown.any(1).nonzero()[:, 0]
            proposal = torch.zeros_like(tokens)
            proposal[live] = sampler(logits[live], live)
            probs = logits.float().softmax(-1)
            if verify:
                # the decision to commit must not depend on which token was drawn: committed
                # tokens must follow q exactly for speculative acceptance to give the AR
                # distribution (greedy: the same thing, the proposal is the argmax)
                confidence = probs.max(-1).values
            else:
                confidence = probs.gather(-1, proposal[..., None])[..., 0]
            commit = rule(confidence, unknown, max(steps - step, 1), confidence_threshold)
            tokens = torch.where(commit, proposal, tokens)
            if q_probs is not None:
                q_probs[commit] = sampler.probs(logits)[commit]
            unknown &= ~commit
            steps_used += commit.any(1).cpu()
            # committing target j reveals it as input j + shift
            written = tokens[:, : s - shift] if shift else tokens
            block_in[:, shift:] = torch.where(written >= 0, written, block_in[:, shift:])
            if step_callback is not None:
                step_callback(StepEvent(block, step, commit.clone(), tokens.clone()))
            step += 1

        # the context tower advances over the block's inputs (record: rows may roll back)
        ext = torch.cat([anchor[:, None], tokens[:, : s - 1]], dim=1) if shift else tokens
        ext = torch.where(active[:, None], ext, 0)
        before = cache.lengths.clone()
        ar_logits = model.context_forward(ext, cache, record=True)
        stats.context_passes += 1
        keep = torch.full((batch,), s, dtype=torch.long, device=device)
        if verify:
            tokens, keep = _verify(tokens, ar_logits, q_probs, sampler, active)

        appended = torch.zeros(batch, dtype=torch.long, device=device)
        for row in range(batch):
            if done[row]:
                continue
            new = tokens[row, : int(keep[row])].tolist()
            new = new[: max_new_tokens - len(out[row])]
            for i, tok in enumerate(new):
                if tok in stops:
                    new = new[: i + 1]
                    break
            out[row].extend(new)
            if callback is not None:
                for tok in new:
                    callback(row, tok)
            appended[row] = len(new)
            anchor[row] = new[-1]
            stats.block_steps[row].append(int(steps_used[row]))
            if verify:
                stats.accepted[row].append(len(new))
            done[row] = len(out[row]) >= max_new_tokens or new[-1] in stops
        target = before + appended  # the context holds every committed token but the anchor
        if bool((target != cache.lengths).any()):
            cache.rollback(target)
        block += 1
    stats.decode_seconds = time.perf_counter() - start
    stats.new_tokens = [len(r) for r in out]
    stats.row_nfe = [sum(steps) for steps in stats.block_steps]  # a row takes part while it has unknown targets
    return DiffusionOutput(out, stats, cache if return_cache else None)


def _verify(
    tokens: torch.Tensor,
    ar_logits: torch.Tensor,
    q_probs: torch.Tensor | None,
    sampler: Sampler,
    active: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each row's longest prefix of committed targets that the AR model accepts and put
    the AR model's token at the first rejection. The context pass over the block's inputs
    yields the AR prediction for exactly the block's targets (token shift).
    Greedy: accept while equal to the AR argmax. Sampling: speculative-sampling acceptance
    with the denoiser's proposal distribution q and the AR distribution p."""
    batch, s = tokens.shape
    tokens = tokens.clone()
    if sampler.greedy:
        ar = ar_logits.argmax(-1)
        agree = tokens == ar
        first_bad = torch.where(agree.all(1), s, (~agree).long().argmax(1))
        fix = first_bad < s
        idx = first_bad.clamp(max=s - 1)
        tokens[fix, idx[fix]] = ar[fix, idx[fix]]
        return tokens, torch.where(fix, first_bad + 1, s)
    p = sampler.probs(ar_logits)
    keep = torch.full((batch,), s, dtype=torch.long, device=tokens.device)
    for row in range(batch):
        if not bool(active[row]):  # finished rows have no targets (and draw nothing)
            continue
        x = tokens[row]
        px = p[row].gather(-1, x[:, None])[:, 0]
        qx = q_probs[row].gather(-1, x[:, None])[:, 0]
        u = sampler.uniform(row, (s,)).to(px.device)
        rejected = (u * qx > px).nonzero()
        if len(rejected):
            j = int(rejected[0])
            residual = (p[row, j] - q_probs[row, j]).clamp_min(0)
            residual = residual if float(residual.sum()) > 0 else p[row, j]
            gumbel = -torch.log(-torch.log(sampler.uniform(row, residual.shape).to(px.device).clamp_min(1e-20)))
            tokens[row, j] = (residual.log() + gumbel).argmax()
            keep[row] = j + 1
    return tokens, keep


def generate_mock_ar(model: TwoTower, input_ids, max_new_tokens: int = 128, **kwargs) -> DiffusionOutput:
    """Both towers, one token per denoiser forward (S = 1): the fair speed baseline for the
    same model. With an untrained (identity) denoiser it reproduces the AR model exactly."""
    for name in ("block_size", "steps_per_block", "verify"):
        if name in kwargs:
            raise ValueError(f"generate_mock_ar fixes {name}")
    kwargs.setdefault("confidence_threshold", 0.0)
    return generate_mask_diffusion(model, input_ids, max_new_tokens, block_size=1, steps_per_block=1, **kwargs)
