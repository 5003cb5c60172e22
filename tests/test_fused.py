"""The fused step (issue 17): one forward of both towers of the lora flavour. The pass gives, bit
for bit, what the context tower's and the denoiser's own forwards give; fused verified decoding
is AR greedy (untrained, perturbed and oracle drafters, rejections and missed pre-drafts
included), leaves an exact cache, keeps the AR distribution when sampling and is batch
invariant, in fp32 and bf16, for attention, Mamba and MoE backbones."""

from __future__ import annotations

import copy

import pytest
import torch
from test_decoding import NO_EOS, PROMPTS, assert_cache_is_fresh
from test_twotower import ALL_KINDS, PERTURB, two_tower

from twotower.errors import UsageError
from twotower.generate import DecodingSettings, diffusion, generate_ar, generate_mask_diffusion
from twotower.model.fused import FusedOutput, fused_forward

DTYPES = [torch.float32, torch.bfloat16]
FUSED = dict(verify=True, fused=True, steps_per_block=1, **NO_EOS)


def lora(kind: str, dtype=torch.float32, perturb: float = 0.0, **config):
    return two_tower(kind, "lora", perturb=perturb, **config).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_the_fused_pass_is_both_forwards_bit_for_bit(kind, dtype):
    """Rows of different lengths, the denoiser seeing 0, some or all of the pass's context rows:
    the context rows' logits are the context tower's over a recorded extension, the block's
    logits the denoiser's after exactly the context it sees."""
    model = lora(kind, dtype, perturb=0.3)
    mask = model.mask_token_id
    prompts = [[5, 9, 33, 12, 40, 7], [8, 1, 2, 3]]
    ctx_ids = torch.tensor([[11, 21, 31, 41], [12, 22, 32, 42]])
    for sees in ([3, 1], [0, 4], [4, 0]):
        den_sees = torch.tensor(sees)
        blocks = torch.tensor([[int(ctx_ids[r, min(s, 3)]), mask, 17, mask] for r, s in enumerate(sees)])
        t = torch.tensor([0.75, 0.5])
        with torch.inference_mode():
            # the pass on a batch (rows of different lengths: per-row slots and masks)...
            width = max(len(p) for p in prompts)
            ids = torch.zeros(2, width, dtype=torch.long)
            valid = torch.zeros(2, width, dtype=torch.bool)
            for r, p in enumerate(prompts):
                ids[r, width - len(p):], valid[r, width - len(p):] = torch.tensor(p), True
            cache = model.context.new_cache(2, width + 12)
            model.context_forward(ids, cache, attention_mask=valid)
            reference = copy.deepcopy(cache)
            out = fused_forward(model, ctx_ids, blocks, t, den_sees, cache)
            ar = model.context_forward(ctx_ids, reference, record=True)
            assert torch.equal(out.ar_logits, ar), sees
            assert torch.equal(cache.lengths, reference.lengths)
            # ...each block against the denoiser alone after its row's context
            for r, prompt in enumerate(prompts):
                alone = model.context.new_cache(1, 16)
                model.context_forward(torch.tensor([prompt + ctx_ids[r, : sees[r]].tolist()]), alone)
                den = model.denoise_block(blocks[r : r + 1], t[r : r + 1], alone)[0]
                assert torch.equal(out.den_logits[r], den), (sees, r)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("perturb", [0.0, PERTURB], ids=["untrained", "perturbed"])
def test_fused_decoding_is_ar_greedy(kind, dtype, perturb):
    model = lora(kind, dtype, perturb=perturb)
    ar = generate_ar(model.context, PROMPTS, max_new_tokens=14, **NO_EOS).tokens
    unfused = generate_mask_diffusion(model, PROMPTS, max_new_tokens=14, verify=True, steps_per_block=1, **NO_EOS)
    out = generate_mask_diffusion(model, PROMPTS, max_new_tokens=14, return_cache=True, **FUSED)
    assert out.tokens == ar == unfused.tokens
    assert out.stats.forwards == out.stats.nfe == out.stats.context_passes  # one forward a step
    assert_cache_is_fresh(model, PROMPTS, out)


class Oracle:
    """A drafter that knows AR's continuation: the fused pass's block logits replaced by one-hot
    logits of the true tokens, wrong at every position in ``wrong`` (so guesses, drafts and
    pre-drafts both hold and fail)."""

    def __init__(self, sequences: list[list[int]], wrong: set[int], vocab: int) -> None:
        self.sequences, self.wrong, self.vocab = sequences, wrong, vocab
        self.real = diffusion.fused_forward

    def __call__(self, model, ctx_ids, den_ids, t, den_sees, cache) -> FusedOutput:
        before, starts = cache.lengths.clone(), cache.starts.clone()
        out = self.real(model, ctx_ids, den_ids, t, den_sees, cache)
        logits = torch.zeros_like(out.den_logits)
        for r, seq in enumerate(self.sequences):
            for i in range(den_ids.shape[1]):
                # slot i of a block placed after den_sees context rows predicts this position
                pos = int(before[r] - starts[r] + den_sees[r]) + i + 1
                token = seq[pos] if pos < len(seq) else 0
                logits[r, i, (token + 1) % self.vocab if pos in self.wrong else token] = 10.0
        return FusedOutput(out.ar_logits, logits)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_an_oracle_drafter_fills_whole_blocks_and_misses_are_caught(kind, monkeypatch):
    """With a drafter that knows AR's continuation, every step after the first two yields a whole
    block (the draft, the guess and the pre-draft all hold: forwards well below tokens); with
    wrong positions among its proposals, rejections and missed pre-drafts happen and the output
    is still AR's."""
    model = lora(kind)
    n = 24
    ar = generate_ar(model.context, PROMPTS, max_new_tokens=n, **NO_EOS).tokens
    sequences = [p + a for p, a in zip(PROMPTS, ar)]
    monkeypatch.setattr(diffusion, "fused_forward", Oracle(sequences, set(), model.context.config.vocab_size))
    perfect = generate_mask_diffusion(model, PROMPTS, max_new_tokens=n, **FUSED)
    assert perfect.tokens == ar
    assert all(max(a) == 4 for a in perfect.stats.accepted)  # whole blocks of 4 in one forward
    assert perfect.stats.forwards <= n // 4 + 3

    wrong = {pos for pos in range(40) if pos % 9 == 4}
    monkeypatch.setattr(diffusion, "fused_forward", Oracle(sequences, wrong, model.context.config.vocab_size))
    out = generate_mask_diffusion(model, PROMPTS, max_new_tokens=n, return_cache=True, **FUSED)
    assert out.tokens == ar
    steps = [(d, a) for row_d, row_a in zip(out.stats.drafted, out.stats.accepted) for d, a in zip(row_d, row_a)]
    assert any(a < d for d, a in steps)  # a draft rejected before its end
    assert any(d == 0 for d, _ in steps[3:])  # a step without a draft: a pre-draft was missed
    assert any(a == 4 for _, a in steps)  # and whole blocks still came through
    assert_cache_is_fresh(model, PROMPTS, out)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_fused_decoding_is_batch_invariant(kind):
    model = lora(kind, perturb=PERTURB)
    alone = [generate_mask_diffusion(model, p, max_new_tokens=9, **FUSED).tokens[0] for p in PROMPTS]
    assert generate_mask_diffusion(model, PROMPTS, max_new_tokens=9, **FUSED).tokens == alone
    assert generate_mask_diffusion(model, PROMPTS[::-1], max_new_tokens=9, **FUSED).tokens == alone[::-1]
    # sampling: row i draws from seed + i, so row 0 is comparable with the prompt alone
    sampling = dict(max_new_tokens=9, temperature=1.0, seed=5, **FUSED)
    solo = generate_mask_diffusion(model, PROMPTS[0], **sampling).tokens[0]
    batched = generate_mask_diffusion(model, PROMPTS, **sampling)
    assert batched.tokens[0] == solo
    assert len({tuple(d) for d in batched.stats.drafted}) > 1  # the rows drafted differently


def test_fused_sampling_keeps_the_ar_distribution():
    """As verified decoding's test: the marginals of the first three tokens over many rows
    (row i samples with seed + i) are the AR model's, with a drafter far from it."""
    vocab, temperature, rows = 8, 3.0, 4000
    model = lora("attention", perturb=0.5, backbone_overrides=dict(vocab_size=vocab))
    prompt = [1, 5, 2, 7]
    with torch.no_grad():
        prefixes = torch.cartesian_prod(torch.arange(vocab), torch.arange(vocab))
        seqs = torch.cat([torch.tensor(prompt).expand(len(prefixes), -1), prefixes], dim=1)
        cond = (model.context(seqs)[:, -3:] / temperature).softmax(-1)
        p1 = cond[0, 0]
        p12 = p1[:, None] * cond[::vocab, 1]
        marginals = [p1, p12.sum(0), (p12.reshape(-1, 1) * cond[:, 2]).sum(0)]
    out = generate_mask_diffusion(model, [prompt] * rows, max_new_tokens=3, temperature=temperature, seed=0,
                                  verify=True, fused=True, commit_rule="left_prefix", confidence_threshold=0.2,
                                  **NO_EOS)
    tokens = torch.tensor(out.tokens)
    assert sum(1 for d in out.stats.drafted if len(d) > 1 and d[1] > 0) > rows // 10  # drafts were checked
    for i, p in enumerate(marginals):
        empirical = torch.bincount(tokens[:, i], minlength=vocab) / rows
        assert 0.5 * float((empirical - p).abs().sum()) < 0.045, i


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_the_fused_dial_is_the_dial(kind, dtype):
    """The dial with a block's context pass and the next block's first step in one forward:
    the same tokens as the unfused dial (greedy and sampling), one forward fewer per block."""
    model = lora(kind, dtype, perturb=PERTURB)
    for kwargs in (dict(), dict(temperature=1.0, seed=3)):
        dial = dict(max_new_tokens=13, confidence_threshold=0.5, **NO_EOS, **kwargs)
        plain = generate_mask_diffusion(model, PROMPTS, **dial)
        fused = generate_mask_diffusion(model, PROMPTS, fused=True, return_cache=True, **dial)
        assert fused.tokens == plain.tokens
        assert fused.stats.nfe == plain.stats.nfe and fused.stats.forwards < plain.stats.forwards
        assert fused.stats.forwards == plain.stats.forwards - plain.stats.context_passes + 1
        assert_cache_is_fresh(model, PROMPTS, fused)


def test_fusion_needs_a_shared_backbone():
    with pytest.raises(UsageError, match="lora flavour"):
        generate_mask_diffusion(two_tower("attention", "full"), [1, 2, 3], max_new_tokens=4, **FUSED)
    with pytest.raises(UsageError, match="lora flavour"):
        generate_mask_diffusion(two_tower("attention", "full"), [1, 2, 3], max_new_tokens=4, fused=True)
    with pytest.raises(UsageError, match="token.shift"):
        generate_mask_diffusion(lora("attention", token_shift=False), [1, 2, 3], max_new_tokens=4, fused=True)
    with pytest.raises(UsageError, match="block_size"):
        generate_mask_diffusion(lora("attention"), [1, 2, 3], max_new_tokens=4, block_size=1, **FUSED)
    assert DecodingSettings(verify=True, fused=True).strategy == "fused"
    assert DecodingSettings(fused=True).strategy == "fused_dial"
