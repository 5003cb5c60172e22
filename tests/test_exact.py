"""Exact inference (issue 17): a row's logits and greedy tokens are bitwise the same alone and in
batches of 2..8 of mixed lengths, and between a 1-token and a k-token pass over the same
positions, in fp32 and bf16, for attention, Mamba and MoE backbones; verified decoding is then
AR's output in bf16 as in fp32. bf16 runs everywhere: on CPUs without oneDNN's bf16 kernels it
takes PyTorch's plain kernels, slowly but exactly alike."""

from __future__ import annotations

import pytest
import torch
from test_twotower import perturb_
from tiny_models import attention_config, hybrid_config, tiny_backbone

from twotower.generate import generate_ar, generate_mask_diffusion
from twotower.model import exact_sdpa
from twotower.model.twotower import DenoiserConfig, TwoTower

CONFIGS = {
    "attention": attention_config,
    "hybrid": hybrid_config,  # Mamba-2, MoE, NoPE attention and MLP
    "moe": lambda: hybrid_config(layer_types=["attention", "moe"] * 2),
}
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(params=["sdpa", "chunked"])
def attention_kernel(request, monkeypatch):
    """Each exact attention: on SDPA's kernel (model/exact_sdpa.py, where this CPU passes its
    probe) and the fallback of fixed-shape products and chunked sums (model/exact.py)."""
    if request.param == "chunked":
        monkeypatch.setattr(exact_sdpa, "row_multiple", lambda *args: 0)
    elif not exact_sdpa.row_multiple(torch.device("cpu"), 16, 2):  # the tiny configs' heads
        pytest.skip("SDPA's CPU kernel failed exact_sdpa's probe on this CPU")
    return request.param


def backbone(kind: str, dtype: torch.dtype):
    return tiny_backbone(CONFIGS[kind]()).to(dtype)


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 250, (int(torch.randint(3, 14, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(count)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", CONFIGS)
def test_a_row_is_the_same_in_any_batch(kind, dtype, attention_kernel):
    model = backbone(kind, dtype)
    rows = prompts(8)
    with torch.inference_mode():
        alone = [model(torch.tensor([p]))[0] for p in rows]
        for size in (2, 3, 5, 8):
            width = max(len(p) for p in rows[:size])
            ids = torch.zeros(size, width, dtype=torch.long)
            mask = torch.zeros(size, width, dtype=torch.bool)
            for i, p in enumerate(rows[:size]):
                ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), True
            batched = model(ids, attention_mask=mask)
            for i, p in enumerate(rows[:size]):
                assert torch.equal(batched[i, width - len(p):], alone[i]), (size, i)
    solo = [generate_ar(model, p, max_new_tokens=10, eos_token_id=[]).tokens[0] for p in rows]
    assert generate_ar(model, rows, max_new_tokens=10, eos_token_id=[]).tokens == solo


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", CONFIGS)
def test_one_token_and_k_token_passes_agree(kind, dtype, attention_kernel):
    """The same positions through one long pass, through a prompt pass then single tokens, and
    through a recorded k-token extension (a verification's shape): the same bits."""
    model = backbone(kind, dtype)
    ids = torch.tensor([prompts(1, seed=3)[0] + prompts(1, seed=4)[0]])
    n = ids.shape[1]
    with torch.inference_mode():
        whole = model(ids)
        for split in (1, 3, n - 1):
            cache = model.new_cache(1, n)
            steps = [model(ids[:, :split], cache)] + [model(ids[:, i:i + 1], cache) for i in range(split, n)]
            assert torch.equal(torch.cat(steps, 1), whole), split
        cache = model.new_cache(1, n)
        head = model(ids[:, :3], cache)
        extension = model(ids[:, 3:], cache, record=True)
        assert torch.equal(torch.cat([head, extension], 1), whole)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", CONFIGS)
def test_a_denoiser_step_is_the_same_in_any_batch(kind, dtype, attention_kernel):
    model = TwoTower(backbone(kind, dtype), DenoiserConfig(flavour="lora", block_size=4, lora_rank=4)).eval()
    with torch.no_grad():
        perturb_(model, 0.3)
    rows = prompts(5, seed=7)
    mask_id = model.mask_token_id

    def step(batch: list[list[int]]) -> torch.Tensor:
        width = max(len(p) for p in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        valid = torch.zeros(len(batch), width, dtype=torch.bool)
        for i, p in enumerate(batch):
            ids[i, width - len(p):], valid[i, width - len(p):] = torch.tensor(p), True
        cache = model.context.new_cache(len(batch), width + 4)
        with torch.inference_mode():
            model.context_forward(ids, cache, attention_mask=None if bool(valid.all()) else valid)
            block = torch.tensor([[p[-1], mask_id, 7, mask_id] for p in batch])
            return model.denoise_block(block, torch.full((len(batch),), 0.75), cache)

    alone = [step([p])[0] for p in rows]
    together = step(rows)
    for i in range(len(rows)):
        assert torch.equal(together[i], alone[i]), i


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", CONFIGS)
@pytest.mark.parametrize("perturb", [0.0, 0.3], ids=["untrained", "perturbed"])
def test_verified_decoding_is_ar_in_every_dtype(kind, dtype, perturb):
    model = TwoTower(backbone(kind, dtype), DenoiserConfig(flavour="lora", block_size=4, lora_rank=4)).eval()
    with torch.no_grad():
        perturb_(model, perturb)
    rows = prompts(4, seed=11)
    ar = generate_ar(model.context, rows, max_new_tokens=16, eos_token_id=[]).tokens
    for steps in (1, 4):
        out = generate_mask_diffusion(model, rows, max_new_tokens=16, verify=True, steps_per_block=steps,
                                      eos_token_id=[], confidence_threshold=0.5)
        assert out.tokens == ar, steps
        if perturb:  # a perturbed drafter is wrong now and then: the rejections happened
            assert any(d > a - 1 for row_d, row_a in zip(out.stats.drafted, out.stats.accepted)
                       for d, a in zip(row_d, row_a))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_the_shipped_preset_is_lossless_on_the_default_model(dtype):
    """The recommended preset (verified whole-block drafts of 4), and its fused twin, give AR's
    greedy text on the real model, batched, in fp32 and in bf16 (bf16 used to match on 9 of 12
    prompts)."""
    from twotower.checkpoints.two_tower import load_model
    from twotower.generate import decode, resolve_settings
    from twotower.generate.prompts import encode_messages

    loaded = load_model("smollm2-135m", dtype)
    questions = ["Write a short poem about the sea.", "List three uses of copper.", "What is photosynthesis?",
                 "Why do cats purr?"]
    rows = [encode_messages(loaded.tokenizer, [{"role": "user", "content": q}]) for q in questions]
    preset = resolve_settings(loaded.recommended, max_new_tokens=24)
    ar = resolve_settings(mode="ar", max_new_tokens=24)
    solo = [decode(loaded.model, [r], ar).tokens[0] for r in rows]
    assert decode(loaded.model, rows, ar).tokens == solo  # AR itself is batch-invariant
    assert decode(loaded.model, rows, preset).tokens == solo
    assert decode(loaded.model, rows, preset.replace(fused=True)).tokens == solo  # one forward a step
