"""The two-tower model on tiny random backbones: identity at initialisation, LoRA adapters only
inside the denoiser, vectorised training forward == step-by-step inference forward, training
leaves the context tower untouched and overfits a fixed batch."""

from __future__ import annotations

import pytest
import torch
from tiny_models import attention_config, hybrid_config, tiny_backbone

from twotower.errors import UsageError
from twotower.model import Backbone
from twotower.model.timecond import TimeConditioning
from twotower.model.twotower import DenoiserConfig, TwoTower

KINDS = ("attention", "hybrid")  # attention-only Llama-like; Mamba-2 + attention + MLP
ALL_KINDS = KINDS + ("moe",)  # NemotronH-like: Mamba-2, sigmoid MoE, NoPE attention, relu^2 MLP
FLAVOURS = ("full", "lora")
PERTURB = 0.1  # denoiser noise: it proposes wrong tokens often, right ones too


def backbone(kind: str, seed: int = 0, **overrides) -> Backbone:
    if kind == "attention":
        cfg = attention_config(**overrides)
    elif kind == "hybrid":
        cfg = hybrid_config(layer_types=["mamba", "attention", "mlp", "mamba"], **overrides)
    elif kind == "moe":
        cfg = hybrid_config(**overrides)
    else:
        raise ValueError(kind)
    model = tiny_backbone(cfg, seed)
    with torch.no_grad():  # sharper logits: confidences spread over (0, 1), greedy choices are not near-ties
        model.lm_head.weight.mul_(4)
    return model


def two_tower(kind: str, flavour: str = "full", block_size: int = 4, perturb: float = 0.0, seed: int = 0,
              backbone_overrides: dict | None = None, **config) -> TwoTower:
    """A two-tower model over a tiny random backbone; ``perturb`` > 0 adds noise to every
    trainable parameter (denoiser weights or LoRA, time conditioning, mask embedding) so that the
    denoiser no longer reproduces the AR model."""
    # alpha = rank: LoRA scaling 1, so the perturbation below means the same in both flavours
    config = {"lora_rank": 4, "lora_alpha": 4.0, **config}
    model = TwoTower(backbone(kind, seed, **(backbone_overrides or {})),
                     DenoiserConfig(flavour=flavour, block_size=block_size, **config))
    if perturb:
        perturb_(model, perturb, seed + 1)
    return model.eval()


@torch.no_grad()
def perturb_(model: TwoTower, scale: float, seed: int = 1) -> TwoTower:
    gen = torch.Generator().manual_seed(seed)
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ref = float(p.std()) if p.dim() > 1 and float(p.std()) > 0 else 0.3
        p.add_(scale * ref * torch.randn(p.shape, generator=gen).to(p.dtype))
    return model


def trainable_names(model: TwoTower) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def context_weights(model: TwoTower) -> dict[str, torch.Tensor]:
    """The context tower's own weights (LoRA factors injected into it belong to the denoiser)."""
    return {n: p.detach().clone() for n, p in model.context.named_parameters() if "lora_" not in n}


# ---- initialisation --------------------------------------------------------------------


def test_time_conditioning_starts_as_identity():
    time = TimeConditioning(hidden=16, num_layers=3, freq_dim=32)
    cond = time(torch.tensor([0.0, 0.25, 1.0]))
    for i in range(3):
        shift, scale, gate = time.layer(cond, i, tokens_per_row=5)
        assert torch.equal(shift, torch.zeros_like(shift))
        assert torch.equal(scale, torch.zeros_like(scale))
        assert torch.equal(gate, torch.ones_like(gate))


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("kind", KINDS)
def test_untrained_denoiser_with_one_slot_is_the_ar_model(kind, flavour):
    """S = 1: input [x[p-1]] over the context of positions < p-1 predicts x[p] exactly as AR."""
    model = two_tower(kind, flavour)
    prompt = torch.tensor([[3, 17, 42, 9, 100, 7, 64]])
    ar = model.context(prompt)[:, -1]
    cache = model.context.new_cache(1, 16)
    model.context_forward(prompt[:, :-1], cache)
    for t in (1.0, 0.3):  # identity init: t must not matter
        logits = model.denoise_block(prompt[:, -1:], torch.tensor([t]), cache)
        torch.testing.assert_close(logits[:, 0], ar, atol=1e-4, rtol=1e-4)
    assert int(cache.lengths[0]) == prompt.shape[1] - 1  # the denoiser never writes the context state

    perturb_(model, 0.5)  # the check can fail: a trained denoiser is no longer the AR model
    logits = model.denoise_block(prompt[:, -1:], torch.tensor([1.0]), cache)
    assert (logits[:, 0] - ar).abs().max() > 1e-2


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()  # one numerical path throughout (without gradients: the exact one)
def test_lora_adapters_only_act_inside_the_denoiser(kind):
    model = two_tower(kind, "lora")
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10]])
    before = model.context(prompt)
    perturb_(model, 0.5)
    assert any(bool(p.detach().any()) for n, p in model.named_parameters() if "lora_B" in n)
    torch.testing.assert_close(model.context_forward(prompt), before, atol=0, rtol=0)
    torch.testing.assert_close(model.context(prompt), before, atol=0, rtol=0)
    with model.adapters(True):
        assert (model.context(prompt) - before).abs().max() > 1e-2
    torch.testing.assert_close(model.context(prompt), before, atol=0, rtol=0)  # switched off again


def test_full_flavour_owns_a_separate_copy():
    model = two_tower("attention", "full")
    assert model.denoiser is not model.context
    assert all(
        a.data_ptr() != b.data_ptr() for a, b in zip(model.denoiser.parameters(), model.context.parameters())
    )
    assert not any(p.requires_grad for p in model.context.parameters())


# ---- vectorised training forward == per-block inference forward --------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_training_logits_equal_per_block_denoise(kind, flavour):
    s, n, batch = 4, 3, 2
    model = two_tower(kind, flavour, block_size=s, perturb=0.3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(3, 250, (batch, n * s + 1), generator=gen)
    masked = torch.rand(batch, n, s, generator=gen) < 0.5
    block_inputs, _, _, t = model.noisy_blocks(x, masked)
    assert (block_inputs == model.mask_token_id).any() and (block_inputs != model.mask_token_id).any()
    with torch.no_grad():
        vectorised = model.training_logits(x, block_inputs, t)
        for b in range(n):
            cache = model.context.new_cache(batch, x.shape[1])
            if b:
                model.context_forward(x[:, : b * s], cache)
            step = model.denoise_block(block_inputs[:, b], t[:, b], cache)
            torch.testing.assert_close(vectorised[:, b], step, atol=1e-4, rtol=1e-4)
        # the check can fail: another block's context gives other logits
        if n > 1:
            assert (vectorised[:, 1] - model.denoise_block(block_inputs[:, 1], t[:, 1], cache)).abs().max() > 1e-3


def test_noisy_blocks_token_shift_layout():
    model = two_tower("attention", block_size=4)
    x = torch.arange(10, 19)[None]  # 9 tokens: 2 blocks of 4 + the last target
    masked = torch.tensor([[[True, True, False, True], [False, False, False, False]]])
    inputs, targets, unknown, t = model.noisy_blocks(x, masked)
    m = model.mask_token_id
    assert inputs.tolist() == [[[10, m, 12, m], [14, 15, 16, 17]]]  # input 0 is never hidden
    assert targets.tolist() == [[[11, 12, 13, 14], [15, 16, 17, 18]]]
    # target i is unknown when input i+1 is hidden; the last target always is
    assert unknown.tolist() == [[[True, False, True, True], [False, False, False, True]]]
    assert t.tolist() == [[0.75, 0.25]]


# ---- training ------------------------------------------------------------------------------


def expected_trainable(model: TwoTower, flavour: str) -> set[str]:
    names = {n for n, _ in model.named_parameters()}
    own = {n for n in names if n.startswith("time.") or n == "mask_embedding"}
    if flavour == "full":
        return own | {n for n in names if n.startswith("denoiser_tower.")}
    return own | {n for n in names if "lora_A" in n or "lora_B" in n}


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("kind", KINDS)
def test_training_step_leaves_the_context_tower_bit_identical(kind, flavour):
    model = two_tower(kind, flavour, block_size=4).train()
    frozen = context_weights(model)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(3, 250, (2, 13), generator=gen)
    masked = torch.rand(2, 3, 4, generator=gen) < 0.5
    # every parameter goes to the optimizer, as a careless training script would do
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    loss = model.diffusion_loss(x, masked)
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == expected_trainable(model, flavour) == trainable_names(model)
    assert all(float(p.grad.abs().sum()) > 0 for n, p in model.named_parameters()
               if p.grad is not None and "lora_A" not in n and "t_embedder" not in n)
    # (no gradient reaches lora_A while B = 0, nor the t embedder while t_block is 0)
    opt.step()
    after = context_weights(model)
    assert after.keys() == frozen.keys()
    for name in frozen:
        assert torch.equal(after[name], frozen[name]), name
    # ... while the denoiser did move
    moved = [n for n, p in model.named_parameters() if n in with_grad and "lora_A" not in n]
    assert moved
    assert not torch.equal(model.time.t_block[1].weight, torch.zeros_like(model.time.t_block[1].weight))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_loss_decreases_on_a_fixed_batch(flavour):
    torch.manual_seed(0)
    model = two_tower("hybrid", flavour, block_size=4).train()
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(3, 250, (2, 17), generator=gen)
    masked = torch.rand(2, 4, 4, generator=gen) < 0.6
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(6):
        loss = model.diffusion_loss(x, masked)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_elbo_weighting_and_bad_weighting():
    model = two_tower("attention", block_size=4)
    x = torch.randint(3, 250, (1, 9), generator=torch.Generator().manual_seed(3))
    masked = torch.tensor([[[False, True, True, True], [False, False, False, False]]])
    with torch.no_grad():
        plain = model.diffusion_loss(x, masked)
        elbo = model.diffusion_loss(x, masked, weighting="elbo")
    assert float(elbo) > float(plain)  # 1/t > 1 for the block with t = 1/4
    with pytest.raises(ValueError, match="weighting"):
        model.diffusion_loss(x, masked, weighting="bogus")
    with pytest.raises(ValueError, match="need 9 tokens"):  # token shift: one more than the blocks
        model.diffusion_loss(x[:, :8], masked)


@pytest.mark.parametrize("token_shift", [True, False])
def test_ar_distill_adds_the_kl_to_the_ar_model_at_each_blocks_first_unknown_target(token_shift):
    model = two_tower("hybrid", block_size=4, perturb=PERTURB, token_shift=token_shift)
    gen = torch.Generator().manual_seed(4)
    x = torch.randint(3, 250, (2, 13), generator=gen)
    masked = torch.rand(2, 3, 4, generator=gen) < 0.5
    with torch.no_grad():
        plain = model.diffusion_loss(x, masked)
        distilled = model.diffusion_loss(x, masked, ar_distill=0.5)
        block_inputs, _, unknown, t = model.noisy_blocks(x, masked)
        student = model.training_logits(x, block_inputs, t).log_softmax(-1)
        teacher = model.context_forward(x).log_softmax(-1)  # teacher[p] predicts x[p + 1]
    kl = 0.0
    for row in range(2):
        for b in range(3):
            hidden = unknown[row, b].nonzero().flatten().tolist()
            if not hidden:
                continue
            j = hidden[0]  # the first unknown target: x[4b + j + shift], predicted by AR at the position before
            pos = 4 * b + j + int(token_shift) - 1
            if pos >= 0:
                kl += float((teacher[row, pos].exp() * (teacher[row, pos] - student[row, b, j])).sum())
    assert kl > 0
    torch.testing.assert_close(float(distilled - plain), 0.5 * kl / int(unknown.sum()), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="ar_distill"):
        model.diffusion_loss(x, masked, ar_distill=-1.0)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_ar_distill_vanishes_where_the_denoiser_is_the_ar_model(kind):
    """At block size 1 the untrained denoiser is the AR model (mock-AR), so it has nothing to learn
    from the AR teacher; a perturbed one has."""
    x = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(5))
    masked = torch.zeros(2, 8, 1, dtype=torch.bool)
    for perturb, vanishes in ((0.0, True), (PERTURB, False)):
        model = two_tower(kind, block_size=1, perturb=perturb)
        with torch.no_grad():
            plain, distilled = (model.diffusion_loss(x, masked, ar_distill=w) for w in (0.0, 1.0))
        assert (float(distilled - plain) < 1e-5) == vanishes, (perturb, float(distilled - plain))


# ---- configuration errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(block_size=0), "block_size"),
        (dict(flavour="half"), "flavour"),
        (dict(modulation_order="sideways"), "modulation_order"),
    ],
)
def test_bad_denoiser_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DenoiserConfig(**kwargs)


def test_mask_token_outside_the_vocabulary_is_an_error():
    with pytest.raises(ValueError, match="mask_token_id"):
        TwoTower(backbone("attention"), DenoiserConfig(flavour="full", mask_token_id=10_000))


@pytest.mark.parametrize("weighting", ["none", "elbo"])
@pytest.mark.parametrize("loss_mask", [False, True])
def test_loss_equals_cross_entropy_of_the_full_logits(weighting, loss_mask):
    """The loss runs the LM head on hidden targets only; it must equal the plain computation.
    A token loss mask drops targets from the loss but leaves t (and so the logits) alone."""
    model = two_tower("hybrid", "full", block_size=4, perturb=0.05)
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(3, 250, (2, 13), generator=gen)
    masked = torch.rand(2, 3, 4, generator=gen) < 0.5
    trained = torch.rand(2, 13, generator=gen) < 0.5 if loss_mask else None
    with torch.no_grad():
        loss = model.diffusion_loss(x, masked, weighting, trained=trained)
        block_inputs, targets, unknown, t = model.noisy_blocks(x, masked)
        logits = model.training_logits(x, block_inputs, t)
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 2), targets.flatten(), reduction="none")
        counted = unknown & trained[:, 1:].reshape(2, 3, 4) if loss_mask else unknown  # targets are x shifted by one
        assert 0 < counted.sum() < unknown.sum() or not loss_mask
        assert torch.equal(model.loss_targets(x, masked, trained), counted)
        weights = counted.float().flatten()
        if weighting == "elbo":
            weights = weights / t.clamp_min(0.25)[..., None].expand_as(unknown).flatten()
        expected = (ce * weights).sum() / counted.sum()
    assert torch.allclose(loss, expected, rtol=1e-5), (loss, expected)


def test_merged_adapters_match_and_stay_inference_only():
    model = two_tower("hybrid", "lora", block_size=4, perturb=0.05)
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(3, 250, (2, 13), generator=gen)
    masked = torch.rand(2, 3, 4, generator=gen) < 0.5
    with torch.no_grad():
        block_inputs, _, _, t = model.noisy_blocks(x, masked)
        plain = model.training_logits(x, block_inputs, t)
        context = model.context_forward(x)
        model.merge_adapters()
        assert model.merged and model.denoiser is not model.context
        merged = model.training_logits(x, block_inputs, t)
        assert torch.allclose(merged, plain, atol=1e-4) and not torch.equal(merged, context[:, :12].view_as(merged))
        assert torch.equal(model.context_forward(x), context)  # the context tower is untouched
    model.train()
    with pytest.raises(UsageError, match="unmerge"):
        model.diffusion_loss(x, masked)
    model.unmerge_adapters()
    assert not model.merged
    with torch.no_grad():
        assert torch.equal(model.training_logits(x, block_inputs, t), plain)
