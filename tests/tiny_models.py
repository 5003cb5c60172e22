"""Tiny random models for tests: transformers reference models and our backbones built from them.

Random weights are made deliberately non-trivial (norm weights, biases, Mamba A/dt/D, router
correction bias) so that a converter that drops or swaps one of them changes the logits.
Everything is fp32 and seeded.
"""

from __future__ import annotations

import torch
from torch import nn

from twotower.checkpoints.convert import config_from_hf, state_dict_from_hf
from twotower.checkpoints.load import backbone_from_state_dict
from twotower.model import Backbone, BackboneConfig, MambaConfig, MoEConfig, RopeConfig

VOCAB = 256
HIDDEN = 64
# sizes shared by the Llama-family test configs
COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def llama_config(rope_kind: str = "default", **overrides):
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if rope_kind == "llama3":
        # original_max_position_embeddings small enough that all three frequency bands occur
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    kwargs = dict(
        COMMON, rms_norm_eps=1e-6, rope_parameters=rope, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def qwen2_config(**overrides):
    from transformers import Qwen2Config

    kwargs = dict(COMMON, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=True)
    kwargs.update(overrides)
    return Qwen2Config(**kwargs)


def qwen3_config(**overrides):
    from transformers import Qwen3Config

    kwargs = dict(
        COMMON,
        head_dim=32,  # != hidden / heads, as in real Qwen3 models
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return Qwen3Config(**kwargs)


def nemotron_h_config(**overrides):
    from transformers import NemotronHConfig

    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        # Mamba, MoE, attention, MLP, Mamba, MoE: every mixer kind, Mamba on both sides of attention
        layers_block_type=["linear_attention", "moe", "full_attention", "mlp", "linear_attention", "moe"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        mamba_num_heads=4,
        mamba_head_dim=16,
        ssm_state_size=16,
        n_groups=2,
        conv_kernel=4,
        chunk_size=8,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=48,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return NemotronHConfig(**kwargs)


HF_CONFIGS = {
    "llama": llama_config,
    "llama3-rope": lambda: llama_config("llama3"),
    "qwen2": qwen2_config,
    "qwen3": qwen3_config,
    "nemotron_h": nemotron_h_config,
}


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every weight that initialisation leaves constant (norms, biases, Mamba A/dt/D, router
    correction bias) a random value, so that a dropped or misplaced weight shows in the logits.
    Works on transformers models and on our backbones alike (it goes by parameter names)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype)

    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if not p.is_floating_point() or "rotary" in name or "inv_freq" in name:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A_log":
            p.copy_(torch.log(1 + 7 * torch.rand(p.shape, generator=gen)))
        elif leaf == "dt_bias":
            p.copy_(randn(p) - 1.0)
        elif leaf == "D":
            p.copy_(randn(p))
        elif "correction_bias" in leaf:
            p.copy_(0.3 * randn(p))
        elif p.dim() == 1 and leaf == "weight":  # norms
            p.copy_(1 + 0.3 * randn(p))
        elif leaf == "bias":
            p.copy_(0.1 * randn(p))
        elif "embed" in name:  # also the LM head of tied models: keep those logits moderate
            p.copy_(0.5 * randn(p))
        elif "conv1d" in name:
            p.copy_(0.5 * randn(p))
        else:  # projections: scale 1/sqrt(fan_in) keeps activations O(1) and logits far from uniform
            p.copy_(randn(p) / p.shape[-1] ** 0.5)
    return model


def hf_model(name: str, seed: int = 0, **overrides):
    """A tiny random transformers causal LM, fp32, eval mode, eager attention."""
    from transformers import AutoModelForCausalLM

    config = HF_CONFIGS[name](**overrides) if overrides else HF_CONFIGS[name]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    randomize_(model, seed)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def backbone_from_hf(model) -> Backbone:
    """Our backbone with the weights of a transformers model, through the converter."""
    config = config_from_hf(model.config)
    state = state_dict_from_hf(dict(model.state_dict()), config, model.config.model_type)
    return backbone_from_state_dict(config, state).eval()


def attention_config(**overrides) -> BackboneConfig:
    """A Llama-like backbone config (attention + SwiGLU MLP, RoPE, GQA)."""
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        layer_types=["attention", "mlp"] * 2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope=RopeConfig(theta=10000.0),
        intermediate_size=128,
        max_position_embeddings=256,
    )
    kwargs.update(overrides)
    return BackboneConfig(**kwargs)


def hybrid_config(**overrides) -> BackboneConfig:
    """A NemotronH-like backbone config: Mamba-2, NoPE attention, relu^2 MLP and sigmoid MoE."""
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        layer_types=["mamba", "moe", "attention", "mlp", "mamba", "moe"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope=None,
        intermediate_size=128,
        mlp_activation="relu2",
        max_position_embeddings=256,
        mamba=MambaConfig(num_heads=4, head_dim=16, state_size=16, n_groups=2, chunk_size=8, dt_min=0.001),
        moe=MoEConfig(
            num_experts=8,
            top_k=2,
            expert_intermediate_size=32,
            shared_expert_intermediate_size=48,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.5,
        ),
    )
    kwargs.update(overrides)
    return BackboneConfig(**kwargs)


def tiny_backbone(config: BackboneConfig, seed: int = 0) -> Backbone:
    """A random backbone straight from our config (no transformers involved), fp32, eval mode."""
    torch.manual_seed(seed)
    return randomize_(Backbone(config), seed).eval()
