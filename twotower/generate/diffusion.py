"""Block-diffusion decoding with the two towers: mask diffusion, mock-AR (S = 1) and verified
decoding (every draft checked against the context tower's own predictions).

Mask diffusion, per block: the denoiser fills the S targets over at most ``steps_per_block``
forwards, a commit rule deciding which proposals become final; then the context tower advances
over the block's inputs in one pass (it always lags one token, DESIGN.md §1).

Verified decoding is speculative decoding with the denoiser as the drafter: each denoiser
forward drafts the run of targets the commit rule commits from the left; the context tower's
pass over the anchor and the draft yields the AR model's prediction for every drafted target
and for the target after the draft, so the agreeing prefix is kept and the AR model's own
token follows it (a correction, or the next token when the whole draft agrees).

Every decision is per row, and the context state only ever holds committed tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import UsageError
from ..model.cache import ModelCache
from ..model.fused import check_fusable, fused_forward
from ..model.twotower import TwoTower
from .ar import (
    GenerationStats,
    LogitsCallback,
    Prompts,
    TokenCallback,
    check_generation_args,
    new_stopper,
    prefill_unpadded,
    prepare_prompts,
)
from .commit import CommitRule, get_commit_rule
from .rows import NewRow, OnBoundary, regrouped
from .sampling import Sampler
from .settings import DEFAULT_COMMIT_RULE, DEFAULT_CONFIDENCE_THRESHOLD
from .stopping import ShouldStop, Stopper
from .tree import draft_tree, walk


@dataclass
class StepEvent:
    """What one denoiser step decided, for visualisation and streaming."""

    block: int  # block index within this call (verified: the draft's index)
    step: int  # step within the block, from 0 (verified: always 0)
    committed: torch.Tensor  # (B, S) bool: targets committed at this step (verified: drafted)
    tokens: torch.Tensor  # (B, S) the block's targets committed so far, -1 where unknown
    t: torch.Tensor | None = None  # (B,) the noise level the step's denoiser forward saw
    logits: torch.Tensor | None = None  # (B, S, V) that forward's logits
    rows: list[int] | None = None  # the row id of each of the B rows (rows.py); None: 0 .. B-1


StepCallback = Callable[[StepEvent], None]


@dataclass
class DiffusionStats(GenerationStats):
    context_passes: int = 0  # context-tower passes over committed blocks (prompt pass excluded)
    block_steps: list[list[int]] = field(default_factory=list)  # per row: denoiser steps of each block
    drafted: list[list[int]] = field(default_factory=list)  # per row: tokens of each draft (verify)
    accepted: list[list[int]] = field(default_factory=list)  # per row: tokens each draft gave, AR's included (verify)


@dataclass
class DiffusionOutput:
    tokens: list[list[int]]
    stats: DiffusionStats
    finish_reasons: list[str] = field(default_factory=list)  # per row: "stop" or "length"
    # the context tower's final state (with return_cache=True): prompt + tokens[:-1] per row;
    # made of inference tensors, so extend it under torch.inference_mode()
    cache: ModelCache | None = None


def _check(block_size: int, steps: int, threshold: float) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise UsageError(f"block_size must be an integer >= 1, got {block_size!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"steps_per_block must be an integer >= 1, got {steps!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0.0 <= threshold <= 1.0:
        raise UsageError(f"confidence_threshold must be a number in [0, 1], got {threshold!r}")  # NaN too


@dataclass
class _Decoding:
    """The state both loops share: the model, the context cache and every row's output."""

    model: TwoTower
    cache: ModelCache
    sampler: Sampler
    rule: CommitRule
    block_size: int
    steps: int
    threshold: float
    stopper: Stopper
    anchor: torch.Tensor  # (B,) each row's last committed token: the next block's first input
    stats: DiffusionStats
    callback: TokenCallback | None
    step_callback: StepCallback | None
    rows: list[int]  # the row id of each batch row: rows leave and join between steps with on_boundary
    on_boundary: OnBoundary | None = None
    join: Callable[[list[NewRow]], tuple[ModelCache, torch.Tensor, list[int]]] | None = None
    logits_callback: LogitsCallback | None = None  # verified strategies: see ar.LogitsCallback
    # the forward shape a denoiser step counts as: "drafter" where verified decoding drafts with
    # the model's verify_drafter (another cost than the denoiser's: bench/cost.py)
    draft_kind: str = "denoiser"

    @property
    def batch(self) -> int:
        return len(self.anchor)

    @property
    def picks_only(self) -> bool:
        """Whether a check needs no more of the AR model's logits than their argmax (greedy, no
        logits callback): its pass then ends at the hidden states, and Backbone.argmax_tokens
        picks (the full head's tokens, cheaper)."""
        return self.sampler.greedy and self.logits_callback is None

    def ar_picks(self, out: torch.Tensor) -> torch.Tensor | None:
        """The AR model's greedy tokens from a check's output (its hidden states where
        ``picks_only``, its logits otherwise); None when sampling."""
        if self.picks_only:
            return self.model.context.argmax_tokens(out)
        return out.argmax(-1) if self.sampler.greedy else None

    def active(self) -> torch.Tensor:
        finished = self.stopper.finished
        return torch.tensor([not finished[r] for r in self.rows], dtype=torch.bool, device=self.anchor.device)

    def ids(self, batch_rows: torch.Tensor) -> list[int]:
        """The row ids of some batch rows (what the sampler's streams and the stopper go by)."""
        return [self.rows[i] for i in batch_rows.tolist()]

    def boundary(self, carried: Sequence[torch.Tensor | None] = ()) -> tuple[bool, bool, list]:
        """Between steps: whether any row goes on, whether rows joined, and the ``carried``
        per-row tensors regrouped. With on_boundary finished rows leave (and their carried
        state with them) and new rows join (zeros: a fresh row's state)."""
        if self.on_boundary is None:
            return not self.stopper.all_finished, False, list(carried)
        finished = self.stopper.finished
        keep = [i for i, r in enumerate(self.rows) if not finished[r]]
        self.rows = [self.rows[i] for i in keep]
        joining = list(self.on_boundary(list(self.rows)))
        if len(keep) == self.batch and not joining:
            return bool(keep), False, list(carried)
        keep_t = torch.tensor(keep, dtype=torch.long, device=self.anchor.device)
        new_cache, new_anchor, new_rows = self.join(joining) if joining else (None, self.anchor[:0], [])
        self.cache.regroup(keep_t, new_cache)
        self.anchor = torch.cat([self.anchor[keep_t], new_anchor])
        self.rows += new_rows
        return bool(self.rows), bool(joining), [regrouped(c, keep_t, len(new_rows)) for c in carried]

    def fresh_block(self) -> torch.Tensor:
        """(B, S) inputs of a block with every target masked."""
        batch = self.batch
        block_in = torch.full((batch, self.block_size), self.model.mask_token_id, dtype=torch.long,
                              device=self.anchor.device)
        if self.model.config.token_shift:
            block_in[:, 0] = self.anchor
        return block_in

    def emit(self, row: int, new: list[int], ar_logits: torch.Tensor | None = None) -> int:
        """Append a batch row's newly final tokens (cut where the row ends: see Stopper); return
        how many were kept. ``ar_logits`` (>= len(new), V): the AR model's logits of each, for
        the logits callback (verified strategies)."""
        kept = self.stopper.extend(self.rows[row], new)
        if kept and ar_logits is not None and self.logits_callback is not None:
            self.logits_callback(self.rows[row], kept, ar_logits[: len(kept)])
        if self.callback is not None:
            for tok in kept:
                self.callback(self.rows[row], tok)
        if kept:
            self.anchor[row] = kept[-1]
        return len(kept)

    def settle_context(self, before: torch.Tensor, appended: torch.Tensor) -> None:
        """After a recorded context pass: keep every committed token but each row's anchor."""
        target = before + appended
        if bool((target != self.cache.lengths).any()):
            self.cache.rollback(target)


def overrun_positions(block_size: int, verify: bool, fused: bool, tree_nodes: int = 0) -> int:
    """Positions past a row's max_new_tokens that its cache may need. A context pass appends s
    tokens (a block's inputs) or, verified, up to s + 1 (the anchor and a whole-block draft) to
    every row before rolling back, finished rows too: the last block may overrun max_new_tokens
    by that much less the anchor. Fused: a draft and a guess of s, then the block after them
    (the dial: a block, then the next). A tree: the anchor and its nodes, or the block the
    denoiser reads after the cache, whichever is longer."""
    s = block_size
    if verify and tree_nodes:
        return max(tree_nodes, s)
    return 2 * s if fused else s if verify else s - 1


def check_tree(model: TwoTower, tree_nodes: int, verify: bool, fused: bool) -> None:
    """Tree drafts are verified, unfused, and need an attention-only context tower."""
    if isinstance(tree_nodes, bool) or not isinstance(tree_nodes, int) or tree_nodes < 0:
        raise UsageError(f"tree_nodes must be an integer >= 0, got {tree_nodes!r}")
    if not tree_nodes:
        return
    if not verify:
        raise UsageError("tree_nodes: tree drafts are verified drafts (verify=True)")
    if fused:
        raise UsageError("tree_nodes: tree drafts run unfused (fused=False)")
    if any(kind == "mamba" for kind in model.context.config.layer_types):
        raise UsageError("tree_nodes: tree drafts need an attention-only model (Mamba-2 states do not branch); "
                         "use chain drafts (tree_nodes=0)")


@torch.inference_mode()
def generate_mask_diffusion(
    model: TwoTower,
    input_ids,
    max_new_tokens: int | Sequence[int] = 128,
    block_size: int | None = None,
    steps_per_block: int | None = None,
    mask_token_id: int | None = None,
    temperature: float = 0.0,
    confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD,
    eos_token_id: int | Sequence[int] | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | Sequence[int | None] | None = None,
    commit_rule: str | CommitRule = DEFAULT_COMMIT_RULE,
    verify: bool = False,
    fused: bool = False,
    tree_nodes: int = 0,
    attention_mask: torch.Tensor | None = None,
    step_callback: StepCallback | None = None,
    callback: TokenCallback | None = None,
    return_cache: bool = False,
    stop_strings: Sequence = (),
    tokenizer=None,
    should_stop: ShouldStop | None = None,
    on_boundary: OnBoundary | None = None,
    logits_callback: LogitsCallback | None = None,
) -> DiffusionOutput:
    """Fill blocks of ``block_size`` targets (default: the model's), at most ``steps_per_block``
    denoiser forwards each (default: block_size). ``confidence_threshold`` is the dial: lower
    is faster, higher is safer.

    With ``verify=True`` every denoiser forward is a draft checked at once by the context tower,
    and the output equals ``generate_ar`` at temperature 0 whatever the dial; with sampling it
    follows speculative-sampling acceptance (exactly the AR distribution). The draft is the run
    of targets the commit rule commits from the left at a block's first step: at least
    ceil(block_size / steps_per_block) of them (``steps_per_block=1`` drafts whole blocks), then
    further targets while their confidence (the top probability) exceeds the threshold.

    ``fused=True`` (lora flavour) shares forwards between the towers (model/fused.py). Verified:
    every step is one forward, the context tower checking the current draft while the denoiser
    drafts the next block as if the whole draft were accepted; that draft is used when it holds,
    and a step without a draft still yields the AR model's next token; the output is AR's as
    without fusion. The dial: a block's context pass and the next block's first denoiser step
    are one forward; the output is the unfused dial's.

    ``tree_nodes=N`` (with ``verify``; attention-only models) checks a tree of the drafter's N
    likeliest continuations of each block instead of one chain, in one context pass
    (generate/tree.py); the output is AR's, and with sampling it draws as ``generate_ar`` does.

    A row ends at a stop token (``eos_token_id``, default the model's), at the token that
    completes one of ``stop_strings`` (read with ``tokenizer``) or at ``max_new_tokens``; these
    three and ``seed`` may be given per row, and ``should_stop(row)`` may end a row early (see
    ``generate_ar``); ``on_boundary`` lets finished rows leave and new ones join between blocks
    or drafts (rows.py). With ``verify``, ``logits_callback`` receives the AR model's logits of
    every kept token (ar.LogitsCallback); the unverified dial's tokens have none."""
    s = model.block_size if block_size is None else block_size
    steps = s if steps_per_block is None else steps_per_block
    _check(s, steps, confidence_threshold)
    if mask_token_id is not None and mask_token_id != model.mask_token_id:
        raise UsageError(f"mask_token_id={mask_token_id!r} is not this model's mask token: it is {model.mask_token_id} "
                         f"(pass mask_token_id=model.mask_token_id, or leave it out)")
    rule = get_commit_rule(commit_rule)
    shift = 1 if model.config.token_shift else 0
    if verify and not shift:
        raise UsageError("verify=True needs the token-shift block layout")
    if fused:
        if verify and s < 2:
            raise UsageError("fused=True with verify needs block_size >= 2 (a draft and the guess after it)")
        check_fusable(model)
    check_tree(model, tree_nodes, verify, fused)

    context = model.context
    overrun = overrun_positions(s, verify, fused, tree_nodes)
    why = f"the last {'draft' if verify else 'block'} of {s} may run past max_new_tokens"
    prompts = prepare_prompts(input_ids, attention_mask)
    limits = _check_prompts(model, prompts, max_new_tokens, overrun, why)
    device = context.device
    batch = len(prompts.lengths)

    start = time.perf_counter()
    cache, anchor = _prefill(model, prompts, limits, overrun)
    stopper = new_stopper(context, batch, limits, eos_token_id, stop_strings, tokenizer, should_stop)
    stats = DiffusionStats(block_steps=[[] for _ in range(batch)], drafted=[[] for _ in range(batch)],
                           accepted=[[] for _ in range(batch)])
    stats.prefill_seconds = time.perf_counter() - start
    start = time.perf_counter()
    sampler = Sampler(batch, temperature, top_k, top_p, seed, device)

    def join(rows: list[NewRow]) -> tuple[ModelCache, torch.Tensor, list[int]]:
        joined = prepare_prompts([list(r.prompt_ids) for r in rows])
        new_limits = _check_prompts(model, joined, [r.max_new_tokens for r in rows], overrun, why)
        ids = stopper.add(new_limits, [r.stop_strings for r in rows])
        sampler.add([r.seed for r in rows])
        for per_row in (stats.block_steps, stats.drafted, stats.accepted):
            per_row += [[] for _ in rows]
        return (*_prefill(model, joined, new_limits, overrun), ids)

    run = _Decoding(
        model, cache, sampler, rule, s, steps, confidence_threshold, stopper, anchor, stats, callback, step_callback,
        list(range(batch)), on_boundary, join, logits_callback if verify else None,
    )
    if verify and fused:
        _fused_drafts(run)
    elif verify:
        run.draft_kind = "denoiser" if model.verify_drafter is None else "drafter"
        with model.drafting_to_verify():  # a cheaper drafter of its own, where load_model made one
            _tree_drafts(run, tree_nodes) if tree_nodes else _verified_drafts(run)
    else:
        _blocks(run, fused)
    stats.decode_seconds = time.perf_counter() - start
    stats.new_tokens = [len(r) for r in stopper.tokens]
    stats.row_nfe = [sum(steps) for steps in stats.block_steps]  # a row takes part while it has unknown targets
    return DiffusionOutput(stopper.tokens, stats, stopper.reasons, run.cache if return_cache else None)


def _check_prompts(model: TwoTower, prompts: Prompts, max_new_tokens, overrun: int, why: str) -> list[int]:
    limits = check_generation_args(model.context, prompts, max_new_tokens, reserve=overrun, why=why)
    if prompts.attention_mask is None:
        in_prompt = prompts.input_ids == model.mask_token_id
    else:
        in_prompt = (prompts.input_ids == model.mask_token_id) & prompts.attention_mask
    if bool(in_prompt.any()):
        raise UsageError(f"the prompt contains the mask token id {model.mask_token_id}")
    return limits


def _prefill(model: TwoTower, prompts: Prompts, limits: list[int], overrun: int) -> tuple[ModelCache, torch.Tensor]:
    """A context cache over the prompts and each row's anchor (its last prompt token, the first
    block's first input: with token shift the context tower lags it by one)."""
    shift = 1 if model.config.token_shift else 0

    def forward(ids: torch.Tensor, cache: ModelCache) -> None:
        if ids.shape[1] > shift:  # with token shift the last prompt token is the first block's input
            model.context_forward(ids[:, : ids.shape[1] - shift], cache, head=False)

    cache, _ = prefill_unpadded(model.context, prompts, limits, overrun, forward)
    return cache, prompts.input_ids[:, -1].to(model.context.device).clone()


def _propose(run: _Decoding, block_in: torch.Tensor, unknown: torch.Tensor,
             computed: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """One denoiser forward (1 NFE), or the (t, logits) a fused pass ``computed`` already: its
    noise levels t, the logits and a proposal for every target of the rows with unknown targets
    (the others draw nothing: a row's random stream must not depend on how many steps its batch
    mates need)."""
    if computed is None:
        t = unknown.sum(1).float() / run.block_size
        logits = run.model.denoise_block(block_in, t, run.cache)
        run.stats.nfe += 1
        run.stats.counted(run.draft_kind, block_in.shape[1])
    else:
        t, logits = computed
    live = unknown.any(1).nonzero()[:, 0]
    proposal = torch.zeros(unknown.shape, dtype=torch.long, device=unknown.device)
    proposal[live] = run.sampler(logits[live], run.ids(live))
    return t, logits, proposal


def _blocks(run: _Decoding, fused: bool = False) -> None:
    """Mask diffusion: fill each block over denoiser steps, then extend the context over it.
    ``fused``: the context pass over a block and the next block's first denoiser step are one
    forward of both towers (model/fused.py), the next block placed after the whole block (its
    first input is the block's last target); the tokens are those of the two forwards."""
    s, shift = run.block_size, 1 if run.model.config.token_shift else 0
    block = 0
    first_step = None  # (t, logits) of this block's first denoiser step, from the fused pass before it
    while True:
        more, joined, carried = run.boundary(first_step or ())
        if not more:
            break
        # rows that joined have no first step yet: one denoiser forward for all (the rows that
        # go on get the fused pass's logits again: the two are bitwise equal, model/fused.py)
        first_step = None if joined or first_step is None else tuple(carried)
        batch = run.batch
        active = run.active()
        tokens = torch.full((batch, s), -1, dtype=torch.long, device=active.device)
        unknown = active[:, None].expand(batch, s).clone()
        block_in = run.fresh_block()
        steps_used = torch.zeros(batch, dtype=torch.long)
        step = 0
        while bool(unknown.any()):
            t, logits, proposal = _propose(run, block_in, unknown, first_step if step == 0 else None)
            confidence = logits.float().softmax(-1).gather(-1, proposal[..., None])[..., 0]
            commit = run.rule(confidence, unknown, max(run.steps - step, 1), run.threshold)
            tokens = torch.where(commit, proposal, tokens)
            unknown &= ~commit
            steps_used += commit.any(1).cpu()
            # committing target j reveals it as input j + shift
            written = tokens[:, : s - shift] if shift else tokens
            block_in[:, shift:] = torch.where(written >= 0, written, block_in[:, shift:])
            if run.step_callback is not None:
                run.step_callback(StepEvent(block, step, commit.clone(), tokens.clone(), t, logits, list(run.rows)))
            step += 1

        # the context tower advances over the block's inputs (recorded: a row may finish early)
        ext = torch.cat([run.anchor[:, None], tokens[:, : s - 1]], dim=1) if shift else tokens
        ext = torch.where(active[:, None], ext, 0)
        appended = torch.zeros(batch, dtype=torch.long, device=active.device)
        for row in active.nonzero()[:, 0].tolist():
            appended[row] = run.emit(row, tokens[row].tolist())
            run.stats.block_steps[run.rows[row]].append(int(steps_used[row]))
        before = run.cache.lengths.clone()
        going_on = run.active()
        if fused and bool(going_on.any()):  # and the next block, [last target, M, ...], after this one
            next_in = torch.full_like(tokens, run.model.mask_token_id)
            next_in[:, 0] = torch.where(going_on, tokens[:, -1], 0)
            t_next = going_on.float()  # every target unknown
            out = fused_forward(run.model, ext, next_in, t_next, torch.full_like(before, s), run.cache)
            first_step = (t_next, out.den_logits)
            run.stats.nfe += 1
            run.stats.counted("fused", s, s)
        else:
            run.model.context_forward(ext, run.cache, record=True)
            run.stats.counted("context", ext.shape[1])
        run.stats.context_passes += 1
        run.settle_context(before, appended)
        block += 1


def _verified_drafts(run: _Decoding) -> None:
    """Verified decoding: one denoiser forward drafts, one context pass checks the draft."""
    s = run.block_size
    draft_index = 0
    while run.boundary()[0]:
        batch = run.batch
        active = run.active()
        unknown = active[:, None].expand(batch, s)
        t, logits, proposal = _propose(run, run.fresh_block(), unknown)
        # the draft's length must not depend on which tokens were drawn, or acceptance would
        # no longer give the AR distribution: it reads the top probability (greedy: the same)
        confidence = logits.float().softmax(-1).max(-1).values
        commit = run.rule(confidence, unknown, run.steps, run.threshold)
        drafted = commit.long().cumprod(1).sum(1)  # targets after a gap cannot be checked yet
        in_draft = torch.arange(s, device=active.device)[None, :] < drafted[:, None]
        if run.step_callback is not None:
            run.step_callback(StepEvent(draft_index, 0, in_draft, torch.where(in_draft, proposal, -1), t, logits,
                                        list(run.rows)))

        # the context pass over the anchor and the draft: AR's token for every drafted target
        # and for the one after the draft
        width = int(drafted.max()) + 1
        ext = torch.cat([run.anchor[:, None], proposal[:, : width - 1]], dim=1)
        ext = torch.where(active[:, None] & (torch.arange(width, device=ext.device) <= drafted[:, None]), ext, 0)
        before = run.cache.lengths.clone()
        picks_only = run.picks_only
        ar_logits = run.model.context_forward(ext, run.cache, record=True, head=not picks_only)
        run.stats.context_passes += 1
        run.stats.counted("context", width)
        picks = run.ar_picks(ar_logits)  # (ar_logits are hidden states where picks_only)
        q = None if run.sampler.greedy else run.sampler.probs(logits[:, : int(drafted.max())])
        appended = torch.zeros(batch, dtype=torch.long, device=active.device)
        for row in active.nonzero()[:, 0].tolist():
            new = _accept(run.sampler, run.rows[row], proposal[row, : int(drafted[row])],
                          None if picks is None else picks[row], ar_logits[row], None if q is None else q[row])
            appended[row] = run.emit(row, new, None if picks_only else ar_logits[row])
            rid = run.rows[row]
            run.stats.block_steps[rid].append(1)
            run.stats.drafted[rid].append(int(drafted[row]))
            run.stats.accepted[rid].append(int(appended[row]))
        run.settle_context(before, appended)
        draft_index += 1


def _tree_drafts(run: _Decoding, nodes: int) -> None:
    """Verified tree drafts (generate/tree.py): one denoiser forward drafts a block, the tree of
    its ``nodes`` likeliest continuations goes through one context pass, and each row keeps the
    path the AR model walks and the AR model's token after it. The kept path's keys are moved to
    the slots of a sequence (their positions were a sequence's already), the rest rolled back."""
    s = run.block_size
    draft_index = 0
    while run.boundary()[0]:
        batch = run.batch
        active = run.active()
        t = active.float()  # every target of the block is unknown (finished rows: nothing to draft)
        logits = run.model.denoise_block(run.fresh_block(), t, run.cache)
        run.stats.nfe += 1
        run.stats.counted(run.draft_kind, s)
        tree = draft_tree(logits, nodes)
        if run.step_callback is not None:
            chain = torch.zeros(batch, s, dtype=torch.bool, device=active.device)
            top = tree.top_chain().to(active.device)
            chain[:, : top.shape[1]] = top & active[:, None]
            run.step_callback(StepEvent(draft_index, 0, chain, torch.where(chain, logits.argmax(-1), -1), t, logits,
                                        list(run.rows)))

        ids = torch.where(active[:, None], torch.cat([run.anchor[:, None], tree.tokens], 1), 0)
        before = run.cache.lengths.clone()
        picks_only = run.picks_only
        ar_logits = run.model.context_forward(ids, run.cache, tree=tree.ancestors(), head=not picks_only)
        run.stats.context_passes += 1
        run.stats.counted("tree", nodes + 1)
        picks = run.ar_picks(ar_logits)  # (ar_logits are hidden states where picks_only)
        picks = None if picks is None else picks.tolist()
        appended = torch.zeros(batch, dtype=torch.long, device=active.device)
        span = torch.arange(nodes + 1, device=active.device)
        source = before[:, None] + span  # the kept rows' slots (anchor, then the path), per row
        for row in active.nonzero()[:, 0].tolist():
            rid = run.rows[row]
            if picks is not None:
                pick = picks[row].__getitem__
            else:  # one draw per emitted token from the row's stream, as generate_ar draws
                pick = lambda r, row=row, rid=rid: int(run.sampler(ar_logits[row, r][None], [rid])[0])  # noqa: E731
            tokens, rows = walk(tree, row, pick)
            appended[row] = run.emit(row, tokens, None if picks_only else ar_logits[row, rows])
            source[row, : len(rows)] = before[row] + torch.tensor(rows, device=active.device)
            run.stats.block_steps[rid].append(1)
            run.stats.drafted[rid].append(nodes)
            run.stats.accepted[rid].append(int(appended[row]))
        run.cache.move(source, before[:, None] + span)
        run.settle_context(before, appended)
        draft_index += 1


# Slots of a block placed before the last draft token that the next draft may take (its first
# slot predicts AR's own next token, which the block does not see): with the shipped denoiser, drafts
# of 2-3 such slots were rejected at their first token in most steps (SmolLM2, 2026-12-01), so
# only one, the guess, is taken; a fully accepted draft and guess then give a block that sees all.
UNSEEN_SLOTS = 1


def _fused_drafts(run: _Decoding) -> None:
    """Verified decoding, one forward per step (model/fused.py): the context tower checks the
    current draft while the denoiser, in the same pass, drafts the block that follows it as if
    the whole draft were accepted, which is all the next step drafts from.

    A draft is d_1..d_k and a guess g for the target after it. The pass runs the context tower
    over [anchor, d_1..d_k], whose last row checks g (in place of AR's free next token), and the
    denoiser over [g, M, ...] placed after d_k: when the draft and the guess are all accepted,
    that block is exactly the one the next step would draft from, so its proposals become the
    next draft and guess. A row without a guess (its first step, or after a rejection) runs the
    block [d_k, M, ...] placed before d_k instead: its first slot predicts AR's next token, and
    when the two agree its second slot is the next guess (at most UNSEEN_SLOTS of its slots
    are used: they predict past a target they do not see). Draft lengths follow the commit rule
    on the proposals' top probabilities (never on the drawn tokens)."""
    s = run.block_size
    device = run.anchor.device
    draft = torch.zeros(run.batch, s, dtype=torch.long, device=device)  # d_1..d_k, then the guess
    drafted = torch.zeros(run.batch, dtype=torch.long, device=device)  # k
    guessed = torch.zeros(run.batch, dtype=torch.bool, device=device)
    q = None  # sampling: the denoiser's proposal distributions of every row's draft and guess
    step = 0
    while True:
        more, _, (draft, drafted, guessed, q) = run.boundary((draft, drafted, guessed, q))
        if not more:
            break
        batch = run.batch
        active = run.active()
        width = int(drafted.max()) + 1
        cols = torch.arange(width, device=device)[None, :]
        ctx_ids = torch.cat([run.anchor[:, None], draft[:, : width - 1]], dim=1)
        ctx_ids = torch.where(active[:, None] & (cols <= drafted[:, None]), ctx_ids, 0)
        block_in = run.fresh_block()
        last = ctx_ids.gather(1, drafted[:, None])[:, 0]  # d_k, or the anchor
        block_in[:, 0] = torch.where(guessed, draft.gather(1, drafted[:, None])[:, 0], last)
        t = active.float()  # every target of the block is unknown (finished rows: nothing to draft)
        before = run.cache.lengths.clone()
        out = fused_forward(run.model, ctx_ids, block_in, t, drafted + guessed.long(), run.cache)
        run.stats.nfe += 1
        run.stats.context_passes += 1
        run.stats.counted("fused", width, s)
        live = active.nonzero()[:, 0]
        proposal = torch.zeros(batch, s, dtype=torch.long, device=device)
        proposal[live] = run.sampler(out.den_logits[live], run.ids(live))
        confidence = out.den_logits.float().softmax(-1).max(-1).values
        if run.step_callback is not None:
            run.step_callback(StepEvent(step, 0, active[:, None].expand(batch, s).clone(),
                                        torch.where(active[:, None], proposal, -1), t, out.den_logits, list(run.rows)))
        probs = None if run.sampler.greedy else run.sampler.probs(out.den_logits)
        picks = out.ar_logits.argmax(-1) if run.sampler.greedy else None

        appended = torch.zeros(batch, dtype=torch.long, device=device)
        next_draft, next_drafted = torch.zeros_like(draft), torch.zeros_like(drafted)
        next_guessed, next_q = torch.zeros_like(guessed), None if probs is None else torch.zeros_like(probs)
        for row in active.nonzero()[:, 0].tolist():
            k, guess = int(drafted[row]), bool(guessed[row])
            checked = draft[row, : k + guess]
            # the row's k + 1 context rows check d_1..d_k and the guess, or give AR's next token
            new = _accept(run.sampler, run.rows[row], checked, None if picks is None else picks[row, : k + 1],
                          out.ar_logits[row, : k + 1], None if q is None else q[row])
            appended[row] = kept = run.emit(row, new, out.ar_logits[row])
            rid = run.rows[row]
            run.stats.block_steps[rid].append(1)
            run.stats.drafted[rid].append(k + guess)
            run.stats.accepted[rid].append(kept)
            if new[:k + guess] != checked.tolist() or len(new) != k + 1 or run.stopper.finished[rid]:
                continue  # a rejection (or the end): the block assumed that all was accepted
            # the block's predictions beyond the accepted run: all its slots after a guess, the
            # slots after the first otherwise, and then only if the first agrees with AR's token
            first = 0 if guess else 1
            if not guess and int(proposal[row, 0]) != new[-1]:
                continue
            unknown = torch.ones(1, s - first, dtype=torch.bool, device=device)
            n = int(run.rule(confidence[row : row + 1, first:], unknown, run.steps, run.threshold).long().cumprod(1).sum())
            if not guess:
                n = min(n, UNSEEN_SLOTS)
            if n:
                next_draft[row, :n] = proposal[row, first : first + n]
                next_drafted[row], next_guessed[row] = n - 1, True
                if next_q is not None:
                    next_q[row, :n] = probs[row, first : first + n]
        run.settle_context(before, appended)
        draft, drafted, guessed, q = next_draft, next_drafted, next_guessed, next_q
        step += 1


def _accept(sampler: Sampler, row: int, draft: torch.Tensor, picks: torch.Tensor | None, ar_logits: torch.Tensor,
            q: torch.Tensor | None) -> list[int]:
    """A row's draft (k,) checked against the AR model's tokens of its targets (k, or k + 1
    with the target after the draft): the accepted prefix, then the AR model's token at the
    first rejection or after the draft. Greedy: accept while equal to the AR argmax ``picks``.
    Sampling: speculative-sampling acceptance with the denoiser's proposal distributions q
    (k, V) of the row and the AR distribution p of ``ar_logits``, with the row id ``row``'s
    random stream."""
    k = len(draft)
    if sampler.greedy:
        ar = picks[: k + 1]
        kept = int((draft == ar[:k]).long().cumprod(0).sum())
        return draft[:kept].tolist() + ar[kept : kept + 1].tolist()
    p = sampler.probs(ar_logits[: k + 1])
    rejected = []
    if k:  # (no draft: AR's own next token)
        px = p[:k].gather(-1, draft[:, None])[:, 0]
        qx = q[:k].gather(-1, draft[:, None])[:, 0]
        u = sampler.uniform(row, (k,)).to(px.device)
        rejected = (u * qx > px).nonzero()
    if len(rejected):
        j = int(rejected[0])
        residual = (p[j] - q[j]).clamp_min(0)
        target = residual if float(residual.sum()) > 0 else p[j]
    elif k < len(p):
        j, target = k, p[k]
    else:
        return draft.tolist()
    gumbel = -torch.log(-torch.log(sampler.uniform(row, target.shape).to(p.device).clamp_min(1e-20)))
    return draft[:j].tolist() + [int((target.log() + gumbel).argmax())]


def generate_mock_ar(model: TwoTower, input_ids, max_new_tokens: int = 128, **kwargs) -> DiffusionOutput:
    """Both towers, one token per denoiser forward (S = 1): the fair speed baseline for the
    same model. With an untrained (identity) denoiser it reproduces the AR model exactly."""
    for name in ("block_size", "steps_per_block", "verify"):
        if name in kwargs:
            raise UsageError(f"generate_mock_ar fixes {name}")
    kwargs.setdefault("confidence_threshold", 0.0)
    return generate_mask_diffusion(model, input_ids, max_new_tokens, block_size=1, steps_per_block=1, **kwargs)
