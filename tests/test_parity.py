"""Our backbone reproduces transformers' own models: logits through the converter, left-padded
batches, and the transformers-format checkpoint directory round trip."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, backbone_from_hf, hf_model, llama_config, nemotron_h_config

from twotower.checkpoints import CheckpointError, load_backbone
from twotower.checkpoints.convert import config_from_hf, state_dict_from_hf
from twotower.checkpoints.load import backbone_from_state_dict
from twotower.model.layers import rope_inv_freq

TOL = 1e-4
# name -> (tiny_models config, overrides)
MODELS = {
    "llama": ("llama", {}),
    "llama3-rope": ("llama3-rope", {}),
    "llama-bias": ("llama", {"attention_bias": True, "mlp_bias": True}),  # bias on all 4 attention projections
    "qwen2": ("qwen2", {}),  # q/k/v bias, tied embeddings
    "qwen3": ("qwen3", {}),  # q/k norm, head_dim != hidden / heads
    "nemotron_h": ("nemotron_h", {}),  # Mamba-2, NoPE attention, relu^2 MLP, grouped sigmoid MoE
    # transformers ignores n_shared_experts and attention_bias here; ungrouped, unnormalised routing
    "nemotron_h-variant": (
        "nemotron_h",
        {"n_shared_experts": 2, "attention_bias": True, "n_group": 1, "norm_topk_prob": False, "chunk_size": 5},
    ),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def pair(request):
    base, overrides = MODELS[request.param]
    hf = hf_model(base, seed=1, **overrides)
    return request.param, hf, backbone_from_hf(hf)


def random_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_logits_match(ours: torch.Tensor, ref: torch.Tensor) -> None:
    diff = (ours - ref).abs().max().item()
    assert diff < TOL, f"max abs logit difference {diff:.3g}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@torch.no_grad()
def test_logits_match_transformers(pair):
    name, hf, ours = pair
    ids = random_ids(2, 37, seed=0)  # not a multiple of NemotronH's Mamba chunk (8)
    ref = hf(ids).logits
    assert ref.std() > 0.5  # logits far from uniform: the argmax comparison means something
    assert_logits_match(ours(ids), ref)


@torch.no_grad()
def test_left_padded_batch_matches_transformers(pair):
    name, hf, ours = pair
    ids = random_ids(3, 19, seed=1)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    mask[2, :1] = 0
    # transformers' generate() gives padded rows positions counted from their first real token
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ref = hf(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert_logits_match(ours(ids, attention_mask=mask)[real], ref[real])


def test_llama3_rope_frequencies_match_transformers():
    hf = hf_model("llama3-rope")
    ours = config_from_hf(hf.config)
    assert ours.rope.kind == "llama3"
    ref = hf.model.rotary_emb.inv_freq
    torch.testing.assert_close(rope_inv_freq(ours.rope, ours.head_dim), ref)
    # the tiny config is chosen so that scaling changes some frequencies (else this proves nothing)
    default = rope_inv_freq(type(ours.rope)(theta=ours.rope.theta), ours.head_dim)
    assert not torch.allclose(default, ref)


@torch.no_grad()
def test_moe_routing_is_exercised():
    hf = hf_model("nemotron_h", seed=1)
    ours = backbone_from_hf(hf)
    moe = next(layer.mixer for layer in ours.layers if layer.kind == "moe")
    x = torch.randn(64, ours.config.hidden_size, generator=torch.Generator().manual_seed(0))
    _, idx = moe.route(x)
    assert len(idx.unique()) > moe.cfg.num_experts // 2  # tokens spread over most experts
    group = idx // (moe.cfg.num_experts // moe.cfg.n_group)
    assert (group == group[:, :1]).all()  # topk_group=1: a token's experts share one group
    assert len(group.unique()) == moe.cfg.n_group  # ... and both groups get chosen
    # the correction bias changes the choice (so parity above checks that it is converted)
    bias = moe.correction_bias.clone()
    moe.correction_bias.zero_()
    _, idx_unbiased = moe.route(x)
    moe.correction_bias.copy_(bias)
    assert not torch.equal(idx_unbiased, idx)


def test_tied_embeddings_share_one_tensor():
    ours = backbone_from_hf(hf_model("qwen2"))
    assert ours.config.tie_embeddings
    assert ours.lm_head.weight is ours.embed_tokens.weight


def test_unsupported_configs_are_refused():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="not supported"):
        config_from_hf(GPT2Config())
    with pytest.raises(ValueError, match="mlp_hidden_act"):
        config_from_hf(nemotron_h_config(mlp_hidden_act="silu"))
    with pytest.raises(ValueError, match="RoPE"):
        config_from_hf(llama_config(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}))
    hf = hf_model("llama")
    config = config_from_hf(hf.config)
    state = dict(hf.state_dict())
    with pytest.raises(ValueError, match="unexpected weight"):
        state_dict_from_hf(state | {"model.vision_tower.weight": torch.zeros(1)}, config, "llama")
    # a weight that maps into a layer but that the model does not have fails the strict load
    extra = state_dict_from_hf(state | {"model.layers.0.self_attn.extra.weight": torch.zeros(1)}, config, "llama")
    with pytest.raises(CheckpointError, match="does not match"):
        backbone_from_state_dict(config, extra)


# --- transformers-format checkpoint directories -------------------------------------------


@pytest.mark.parametrize("name", ["llama", "nemotron_h"])
@torch.no_grad()
def test_checkpoint_directory_round_trip(tmp_path, name):
    # save_pretrained writes NemotronH experts one by one (the original layout): this also
    # covers the converter's stacking of per-expert weights.
    hf = hf_model(name, seed=2)
    hf.save_pretrained(tmp_path)
    ours, tokenizer = load_backbone(str(tmp_path))
    assert tokenizer is None  # the directory has no tokenizer files
    assert not any(p.requires_grad for p in ours.parameters())
    ids = random_ids(2, 21, seed=2)
    assert_logits_match(ours(ids), hf(ids).logits)


def test_truncated_safetensors_gives_checkpoint_error(tmp_path):
    hf_model("llama").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as info:
        load_backbone(str(tmp_path))
    assert str(weights) in str(info.value)


def test_garbage_safetensors_gives_checkpoint_error(tmp_path):
    hf_model("llama").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_backbone(str(tmp_path))


def test_directory_without_config_gives_checkpoint_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="config.json"):
        load_backbone(str(tmp_path))


def test_unknown_model_name_gives_checkpoint_error():
    with pytest.raises(CheckpointError, match="unknown model"):
        load_backbone("no-such-model-anywhere")
