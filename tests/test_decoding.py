"""Two-tower decoding on tiny random models: mock-AR and verified decoding reproduce AR greedy,
the context cache is exact after every mode (rollback included), the dial and commit rules do
what they say, every mode is batch invariant, bad arguments are clear errors, speculative
sampling keeps the AR distribution."""

from __future__ import annotations

import pytest
import torch
from test_twotower import KINDS, PERTURB, perturb_, two_tower

from twotower.generate import generate_ar
from twotower.generate.diffusion import StepEvent, generate_mask_diffusion, generate_mock_ar

PROMPTS = [[11, 12, 13, 14, 15, 16, 17], [21, 22], [31, 32, 33, 34]]
NO_EOS = dict(eos_token_id=[])
RULES = ("threshold", "left_prefix")


@torch.inference_mode()  # the returned cache holds inference tensors
def assert_cache_is_fresh(model, prompts: list[list[int]], out) -> None:
    """The returned context state must equal a fresh pass over prompt + output[:-1] (the context
    tower lags one token): same number of cached tokens, and the same next-token logits after
    feeding each row's last output token."""
    cache = out.cache
    assert cache is not None
    assert (cache.lengths - cache.starts).tolist() == [len(p) + len(o) - 1 for p, o in zip(prompts, out.tokens)]
    last = torch.tensor([[o[-1]] for o in out.tokens])
    got = model.context_forward(last, cache)[:, -1]
    for row, (prompt, tokens) in enumerate(zip(prompts, out.tokens)):
        fresh_cache = model.context.new_cache(1, len(prompt) + len(tokens))
        model.context_forward(torch.tensor([prompt + tokens[:-1]]), fresh_cache)
        fresh = model.context_forward(torch.tensor([[tokens[-1]]]), fresh_cache)[:, -1]
        torch.testing.assert_close(got[row : row + 1], fresh, atol=1e-4, rtol=1e-4)


def events_of(model, prompts, **kwargs) -> tuple[object, list[StepEvent]]:
    events: list[StepEvent] = []
    out = generate_mask_diffusion(model, prompts, step_callback=events.append, **kwargs)
    return out, events


# ---- identity at initialisation ------------------------------------------------------------


@pytest.mark.parametrize("flavour", ("full", "lora"))
@pytest.mark.parametrize("kind", KINDS)
def test_untrained_mock_ar_is_ar(kind, flavour):
    model = two_tower(kind, flavour)
    ar = generate_ar(model.context, PROMPTS, max_new_tokens=10, **NO_EOS).tokens
    out = generate_mock_ar(model, PROMPTS, max_new_tokens=10, return_cache=True, **NO_EOS)
    assert out.tokens == ar
    assert out.stats.nfe == 10 and all(steps == [1] * 10 for steps in out.stats.block_steps)
    assert_cache_is_fresh(model, PROMPTS, out)
    # the check can fail: a perturbed denoiser no longer reproduces AR in mock-AR mode
    perturb_(model, 1.0)
    assert generate_mock_ar(model, PROMPTS, max_new_tokens=10, **NO_EOS).tokens != ar


# ---- verified decoding == AR greedy ----------------------------------------------------------


@pytest.mark.parametrize("perturb", (0.0, PERTURB))
@pytest.mark.parametrize("flavour", ("full", "lora"))
@pytest.mark.parametrize("kind", KINDS + ("moe",))
def test_verified_decoding_is_ar_greedy(kind, flavour, perturb):
    if kind == "moe" and flavour == "lora":
        pytest.skip("one flavour is enough for the MoE config")
    s, n = 4, 11  # 11 is not a multiple of the block size: the last block is cut
    model = two_tower(kind, flavour, block_size=s, perturb=perturb)
    ar = generate_ar(model.context, PROMPTS, max_new_tokens=n, **NO_EOS).tokens
    rejected = bonus = 0
    for rule in RULES:
        for threshold in (0.0, 0.5, 0.9):
            out = generate_mask_diffusion(model, PROMPTS, max_new_tokens=n, confidence_threshold=threshold,
                                          commit_rule=rule, verify=True, return_cache=True, **NO_EOS)
            assert out.tokens == ar, (rule, threshold)
            for accepted, drafted in zip(out.stats.accepted, out.stats.drafted):
                assert sum(accepted) == n and all(1 <= a <= d + 1 <= s + 1 for a, d in zip(accepted, drafted))
                rejected += sum(a <= d for a, d in zip(accepted[:-1], drafted))
                bonus += sum(a == d + 1 for a, d in zip(accepted[:-1], drafted))
            assert_cache_is_fresh(model, PROMPTS, out)
    assert rejected > 0  # the denoiser did propose wrong tokens: rollback was exercised
    assert bonus > 0  # whole drafts were accepted and AR's next token came with them


def test_verified_draft_length_follows_the_dial():
    """A draft is the commit rule's run from the left at a block's first step: whole blocks
    with steps_per_block=1 or threshold 0, one token at threshold 1 (the quota)."""
    s = 4
    model = two_tower("attention", block_size=s, perturb=PERTURB)
    for kwargs, length in ((dict(steps_per_block=1, confidence_threshold=1.0), s),
                           (dict(confidence_threshold=0.0), s), (dict(confidence_threshold=1.0), 1)):
        out = generate_mask_diffusion(model, PROMPTS, max_new_tokens=9, verify=True, commit_rule="left_prefix",
                                      **kwargs, **NO_EOS)
        assert all(set(drafted) == {length} for drafted in out.stats.drafted), kwargs
        assert out.stats.nfe == max(len(d) for d in out.stats.drafted)  # one denoiser forward a draft


def test_verified_decoding_accepts_whole_blocks_when_the_denoiser_agrees():
    """With S = 1 the identity denoiser is the AR model: every draft is accepted, and the
    context pass over it brings AR's next token too (two tokens a denoiser forward)."""
    model = two_tower("hybrid", block_size=1)
    out = generate_mask_diffusion(model, PROMPTS, max_new_tokens=6, verify=True, return_cache=True, **NO_EOS)
    assert all(d == [1] * 3 and a == [2] * 3 for d, a in zip(out.stats.drafted, out.stats.accepted))
    assert out.tokens == generate_ar(model.context, PROMPTS, max_new_tokens=6, **NO_EOS).tokens
    assert_cache_is_fresh(model, PROMPTS, out)


# ---- cache exactness -------------------------------------------------------------------------


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("kind", KINDS)
def test_mask_diffusion_cache_is_exact(kind, rule):
    model = two_tower(kind, "lora", block_size=4, perturb=PERTURB)
    out = generate_mask_diffusion(model, PROMPTS, max_new_tokens=10, confidence_threshold=0.5, commit_rule=rule,
                                  return_cache=True, **NO_EOS)
    assert [len(t) for t in out.tokens] == [10, 10, 10]
    assert_cache_is_fresh(model, PROMPTS, out)


# ---- the dial and the commit rules -----------------------------------------------------------


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("kind", KINDS)
def test_threshold_one_commits_one_token_per_step(kind, rule):
    s = 4
    model = two_tower(kind, block_size=s, perturb=PERTURB)
    out, events = events_of(model, PROMPTS, max_new_tokens=8, confidence_threshold=1.0, commit_rule=rule, **NO_EOS)
    assert len(events) == 2 * s
    for e in events:
        assert e.committed.sum(1).tolist() == [1, 1, 1]
    assert all(steps == [s, s] for steps in out.stats.block_steps)
    assert out.stats.nfe == 2 * s


@pytest.mark.parametrize("kind", KINDS)
def test_threshold_zero_commits_a_block_per_step(kind):
    model = two_tower(kind, block_size=4, perturb=PERTURB)
    out, events = events_of(model, PROMPTS, max_new_tokens=12, confidence_threshold=0.0, **NO_EOS)
    assert all(steps == [1, 1, 1] for steps in out.stats.block_steps)
    assert len(events) == 3 and all(bool(e.committed.all()) for e in events)
    assert out.stats.nfe == 3 and out.stats.tokens_per_nfe == 4.0  # a whole block per forward, per row


def is_prefix(known: torch.Tensor) -> torch.Tensor:
    """Per row: are the known targets a contiguous run from the left?"""
    return (known.long().cumprod(1).bool() == known).all(1)


@pytest.mark.parametrize("kind", KINDS)
def test_left_prefix_rule_never_commits_right_of_an_unknown_target(kind):
    model = two_tower(kind, block_size=6, perturb=PERTURB)
    kwargs = dict(max_new_tokens=18, confidence_threshold=0.3, steps_per_block=3, **NO_EOS)
    out, events = events_of(model, PROMPTS, commit_rule="left_prefix", **kwargs)
    assert all(bool(is_prefix(e.tokens >= 0).all()) for e in events)
    assert any(bool((e.committed.sum(1) > 1).any()) for e in events)  # several at once, still a prefix
    assert all(len(t) == 18 for t in out.tokens)
    # the check can fail: the released rule does commit targets right of unknown ones here
    _, events = events_of(model, PROMPTS, commit_rule="threshold", **kwargs)
    assert not all(bool(is_prefix(e.tokens >= 0).all()) for e in events)


def test_step_events_describe_the_block():
    model = two_tower("attention", block_size=4, perturb=PERTURB)
    out, events = events_of(model, PROMPTS[:1], max_new_tokens=8, confidence_threshold=0.5, **NO_EOS)
    blocks = {}
    for e in events:
        assert e.committed.shape == e.tokens.shape == (1, 4)
        blocks[e.block] = e  # the last event of a block has every target
        assert bool((e.tokens[e.committed] >= 0).all())
    assert sorted(blocks) == [0, 1]
    assert blocks[0].tokens[0].tolist() + blocks[1].tokens[0].tolist() == out.tokens[0]
    assert [sum(1 for e in events if e.block == b) for b in (0, 1)] == out.stats.block_steps[0]


@pytest.mark.parametrize("verify", (False, True))
@pytest.mark.parametrize("kind", KINDS)
def test_eos_stops_a_row_mid_block(kind, verify):
    s = 4
    model = two_tower(kind, block_size=s, perturb=PERTURB)
    kwargs = dict(max_new_tokens=12, confidence_threshold=0.5, verify=verify)
    free = generate_mask_diffusion(model, PROMPTS, **kwargs, **NO_EOS).tokens
    # an EOS that row 0 first produces in the middle of a block (tokens would follow it)
    cut = next(i for i in range(1, 12) if i % s != s - 1 and free[0][i] not in free[0][:i])
    eos = free[0][cut]
    out = generate_mask_diffusion(model, PROMPTS, eos_token_id=eos, return_cache=True, **kwargs)
    for row, tokens in zip(free, out.tokens):
        assert tokens == (row[: row.index(eos) + 1] if eos in row else row)
    assert out.tokens[0][-1] == eos and len(out.tokens[0]) == cut + 1
    assert out.stats.new_tokens == [len(t) for t in out.tokens]
    assert_cache_is_fresh(model, PROMPTS, out)


@pytest.mark.parametrize("verify", (False, True))
def test_max_new_tokens_not_a_multiple_of_the_block(verify):
    model = two_tower("hybrid", block_size=4, perturb=PERTURB)
    kwargs = dict(confidence_threshold=0.5, verify=verify, **NO_EOS)
    longer = generate_mask_diffusion(model, PROMPTS, max_new_tokens=12, **kwargs).tokens
    for n in (1, 3, 10):
        out = generate_mask_diffusion(model, PROMPTS, max_new_tokens=n, return_cache=True, **kwargs)
        assert out.tokens == [t[:n] for t in longer]
        assert out.stats.new_tokens == [n] * 3
        assert_cache_is_fresh(model, PROMPTS, out)


@pytest.mark.parametrize("verify", (False, True))
def test_the_last_block_may_run_to_the_context_limit(verify):
    """prompt + max_new_tokens + S - 1 may reach the model's context exactly (the last block
    overruns max_new_tokens by up to S - 1 positions; verified, S: the pass over a whole-block
    draft also reads its last token), rows finishing at different blocks."""
    s, context = 4, 64
    model = two_tower("hybrid", block_size=s, perturb=PERTURB, backbone_overrides=dict(max_position_embeddings=context))
    prompts = [list(range(3, 13)), [40, 41, 42]]
    n = context - len(prompts[0]) - (s if verify else s - 1)
    kwargs = dict(confidence_threshold=0.0, verify=verify, **NO_EOS)
    out = generate_mask_diffusion(model, prompts, max_new_tokens=n, return_cache=True, **kwargs)
    assert out.stats.new_tokens == [n, n]
    if verify:
        assert out.tokens == generate_ar(model.context, prompts, max_new_tokens=n, **NO_EOS).tokens
        assert len(out.stats.accepted[0]) != len(out.stats.accepted[1])  # one row finished first
    with pytest.raises(ValueError, match="context"):
        generate_mask_diffusion(model, prompts, max_new_tokens=n + 1, **kwargs)


# ---- batch invariance --------------------------------------------------------------------------

MODES = {
    "ar": lambda m, p, **kw: generate_ar(m.context, p, **kw),
    "mock_ar": lambda m, p, **kw: generate_mock_ar(m, p, **kw),
    "diffusion": lambda m, p, **kw: generate_mask_diffusion(m, p, confidence_threshold=0.5, **kw),
    "diffusion_left": lambda m, p, **kw: generate_mask_diffusion(
        m, p, confidence_threshold=0.5, commit_rule="left_prefix", **kw),
    "verified": lambda m, p, **kw: generate_mask_diffusion(m, p, confidence_threshold=0.5, verify=True, **kw),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", KINDS)
def test_batch_invariance_greedy(kind, mode):
    model = two_tower(kind, block_size=4, perturb=PERTURB)
    run = MODES[mode]
    alone = [run(model, p, max_new_tokens=9, **NO_EOS).tokens[0] for p in PROMPTS]
    assert run(model, PROMPTS, max_new_tokens=9, **NO_EOS).tokens == alone
    assert run(model, PROMPTS[::-1], max_new_tokens=9, **NO_EOS).tokens == alone[::-1]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", KINDS)
def test_batch_invariance_sampling(kind, mode):
    model = two_tower(kind, block_size=4, perturb=PERTURB)
    run = MODES[mode]
    kwargs = dict(max_new_tokens=9, temperature=1.0, seed=5, **NO_EOS)
    alone = run(model, PROMPTS[0], **kwargs).tokens[0]
    batched = run(model, PROMPTS, **kwargs)
    assert batched.tokens[0] == alone
    if mode not in ("ar", "mock_ar"):  # rows needing different step counts (or drafts) share the loop
        per_row = batched.stats.drafted if mode == "verified" else batched.stats.block_steps
        assert len({tuple(steps) for steps in per_row}) > 1
    assert run(model, PROMPTS[0], **kwargs).tokens[0] == alone  # seeded: reproducible
    assert run(model, PROMPTS[0], **{**kwargs, "seed": 6}).tokens[0] != alone


# ---- bad arguments -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(block_size=0), "block_size"),
        (dict(steps_per_block=0), "steps_per_block"),
        (dict(confidence_threshold=1.5), "confidence_threshold"),
        (dict(confidence_threshold=-0.1), "confidence_threshold"),
        (dict(confidence_threshold=float("nan")), "confidence_threshold"),
        (dict(temperature=-1.0), "temperature"),
        (dict(mask_token_id=7), "mask_token_id"),
        (dict(commit_rule="rightmost"), "commit rule"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(input_ids=[1, 2, 300]), "token ids"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, message):
    model = two_tower("attention", block_size=4)
    args = {"input_ids": [1, 2, 3], "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate_mask_diffusion(model, **args)


def test_mask_token_in_the_prompt_is_an_error():
    model = two_tower("attention", block_size=4, mask_token_id=3)
    assert model.mask_token_id == 3
    with pytest.raises(ValueError, match="mask token"):
        generate_mask_diffusion(model, [[1, 2, 3, 4], [5, 6]], max_new_tokens=4)
    # in a row's left padding it is not part of the prompt: fine
    out = generate_mask_diffusion(model, torch.tensor([[3, 3, 5, 6]]), attention_mask=torch.tensor([[0, 0, 1, 1]]),
                                  max_new_tokens=4, **NO_EOS)
    assert len(out.tokens[0]) == 4


def test_verify_needs_the_token_shift_layout():
    model = two_tower("attention", block_size=4, token_shift=False)
    with pytest.raises(ValueError, match="token.shift"):
        generate_mask_diffusion(model, [1, 2, 3], max_new_tokens=4, verify=True)
    assert len(generate_mask_diffusion(model, [1, 2, 3], max_new_tokens=4, **NO_EOS).tokens[0]) == 4


def test_mock_ar_fixes_its_block_size():
    model = two_tower("attention")
    for name in ("block_size", "steps_per_block", "verify"):
        with pytest.raises(ValueError, match=name):
            generate_mock_ar(model, [1, 2, 3], max_new_tokens=4, **{name: 2})


# ---- speculative sampling ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_speculative_sampling_runs_and_is_seeded(kind):
    model = two_tower(kind, block_size=4, perturb=PERTURB)
    kwargs = dict(max_new_tokens=10, temperature=0.8, seed=3, verify=True, commit_rule="left_prefix",
                  confidence_threshold=0.5, return_cache=True, **NO_EOS)
    out = generate_mask_diffusion(model, PROMPTS, **kwargs)
    assert [len(t) for t in out.tokens] == [10, 10, 10]
    assert all(sum(a) == 10 for a in out.stats.accepted)
    assert_cache_is_fresh(model, PROMPTS, out)
    assert generate_mask_diffusion(model, PROMPTS, **kwargs).tokens == out.tokens


def test_speculative_sampling_keeps_the_ar_distribution():
    """Verified decoding with sampling (left-prefix rule): the marginal distribution of each of
    the first three generated tokens over many independent rows (row i samples with seed + i)
    matches the AR model's, although the denoiser's proposals are far from it."""
    vocab, temperature, rows = 8, 3.0, 4000
    model = two_tower("attention", block_size=4, perturb=0.5, backbone_overrides=dict(vocab_size=vocab))
    prompt = [1, 5, 2, 7]
    with torch.no_grad():
        # exact AR marginals of tokens 1..3 by enumerating every prefix
        prefixes = torch.cartesian_prod(torch.arange(vocab), torch.arange(vocab))  # (V^2, 2)
        seqs = torch.cat([torch.tensor(prompt).expand(len(prefixes), -1), prefixes], dim=1)
        cond = (model.context(seqs)[:, -3:] / temperature).softmax(-1)  # p(x1), p(x2|x1), p(x3|x1,x2)
        p1 = cond[0, 0]
        p12 = p1[:, None] * cond[::vocab, 1]  # (x1, x2)
        marginals = [p1, p12.sum(0), (p12.reshape(-1, 1) * cond[:, 2]).sum(0)]
        # the denoiser's first proposals differ from the AR distribution: acceptance has work to do
        cache = model.context.new_cache(1, 8)
        model.context_forward(torch.tensor([prompt[:-1]]), cache)
        block = torch.tensor([[prompt[-1]] + [model.mask_token_id] * 3])
        q = (model.denoise_block(block, torch.tensor([1.0]), cache)[0] / temperature).softmax(-1)
    assert 0.5 * float((q[0] - marginals[0]).abs().sum()) > 0.15
    assert 0.5 * float((q[1] - marginals[1]).abs().sum()) > 0.15

    # threshold 0.2: besides the leftmost target, confident ones are committed in the same step
    out = generate_mask_diffusion(model, [prompt] * rows, max_new_tokens=3, temperature=temperature, seed=0,
                                  verify=True, commit_rule="left_prefix", confidence_threshold=0.2, **NO_EOS)
    tokens = torch.tensor(out.tokens)
    assert any(drafted[0] > 1 for drafted in out.stats.drafted)
    for i, p in enumerate(marginals):
        empirical = torch.bincount(tokens[:, i], minlength=vocab) / rows
        assert 0.5 * float((empirical - p).abs().sum()) < 0.045, i
