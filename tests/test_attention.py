"""Grouped-query attention with a mask, folded into plain multi-head attention (the CUDA path,
which keeps SDPA off its math fallback) equals SDPA's own ``enable_gqa`` on every call site."""

from __future__ import annotations

import pytest
import torch
from test_twotower import two_tower

from twotower.model import layers
from twotower.model.layers import grouped_query_folded


@pytest.mark.parametrize("mask_rows", ["per_row", "shared"])
def test_folded_gqa_equals_sdpa_enable_gqa(mask_rows):
    gen = torch.Generator().manual_seed(0)
    b, kv_heads, group, t, length, d = 3, 2, 3, 5, 11, 8
    q = torch.randn(b, kv_heads * group, t, d, generator=gen)
    k, v = torch.randn(2, b, kv_heads, length, d, generator=gen)
    mask = torch.rand(b if mask_rows == "per_row" else 1, 1, t, length, generator=gen) < 0.5
    mask[..., 0] = True  # every query sees a key
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(grouped_query_folded(q, k, v, mask), expected, atol=1e-6, rtol=1e-5)
    # the check can fail: folding the heads in the other order pairs queries with wrong keys
    wrong = q.view(b, group, kv_heads, t, d).transpose(1, 2).reshape(b, kv_heads * group, t, d)
    assert (grouped_query_folded(wrong, k, v, mask) - expected).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["attention", "hybrid"])
def test_every_masked_call_site_is_unchanged_by_folding(kind, monkeypatch):
    """Training forward (block mask), inference block and left-padded cached decoding, with the
    folded path forced on (as on CUDA): the same logits as SDPA's enable_gqa."""
    model = two_tower(kind, "lora", block_size=4, perturb=0.3)
    model.context.set_exact(False)  # the fused kernels, which CUDA's folding serves
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(3, 250, (2, 13), generator=gen)
    masked = torch.rand(2, 3, 4, generator=gen) < 0.5
    block_inputs, _, _, t = model.noisy_blocks(x, masked)
    padding = torch.ones(2, 6, dtype=torch.bool)
    padding[0, :2] = False

    def run():
        with torch.no_grad():
            training = model.training_logits(x, block_inputs, t)
            cache = model.context.new_cache(2, 16)
            prompt = model.context_forward(x[:, :6], cache, attention_mask=padding)
            block = model.denoise_block(block_inputs[:, 1], t[:, 1], cache)
            step = model.context_forward(x[:, 6:7], cache)
        return training, prompt, block, step

    plain = run()
    calls = []

    def always_folded(q, k, v, mask, is_causal=False):
        if mask is None or q.shape[1] == k.shape[1]:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        calls.append(q.shape)
        return grouped_query_folded(q, k, v, mask)

    monkeypatch.setattr(layers, "attend", always_folded)
    folded = run()
    assert calls, "the tiny model has grouped-query attention: the folded path must have run"
    for a, b in zip(plain, folded):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
