"""Map transformers configs and state dicts (Llama family, NemotronH) onto our backbone."""

from __future__ import annotations

import re

import torch

from ..errors import CheckpointError
from ..model.config import BackboneConfig, MambaConfig, MoEConfig, RopeConfig

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED = LLAMA_FAMILY + ("nemotron_h",)


def _eos_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _rope(hf) -> RopeConfig:
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "default":
        return RopeConfig(theta=float(theta))
    if kind != "llama3":
        raise CheckpointError(f"RoPE scaling {kind!r} is not supported (supported: default, llama3)")
    return RopeConfig(
        theta=float(theta),
        kind="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


def config_from_hf(hf) -> BackboneConfig:
    """Our config from a transformers ``PretrainedConfig``."""
    model_type = hf.model_type
    if model_type not in SUPPORTED:
        raise CheckpointError(f"model type {model_type!r} is not supported (supported: {', '.join(SUPPORTED)})")
    common = dict(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        max_position_embeddings=hf.max_position_embeddings,
        num_attention_heads=hf.num_attention_heads,
        num_key_value_heads=hf.num_key_value_heads or hf.num_attention_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        bos_token_id=hf.bos_token_id,
        eos_token_ids=_eos_ids(hf.eos_token_id),
        pad_token_id=hf.pad_token_id,
    )
    if model_type in LLAMA_FAMILY:
        act = getattr(hf, "hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(f"{model_type} with hidden_act={act!r} is not supported (expected silu)")
        window = getattr(hf, "sliding_window", None)
        if window and getattr(hf, "use_sliding_window", model_type == "mistral"):
            # Exact only while the context fits the window: cap the context there.
            common["max_position_embeddings"] = min(common["max_position_embeddings"], window)
        # Qwen2 always has q/k/v biases and never an o_proj bias; the others put
        # `attention_bias` on all four projections.
        bias = bool(getattr(hf, "attention_bias", False))
        return BackboneConfig(
            layer_types=["attention", "mlp"] * hf.num_hidden_layers,
            norm_eps=hf.rms_norm_eps,
            attention_bias=model_type == "qwen2" or bias,
            attention_out_bias=model_type != "qwen2" and bias,
            qk_norm=model_type == "qwen3",
            rope=_rope(hf),
            intermediate_size=hf.intermediate_size,
            mlp_activation="swiglu",
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            **common,
        )
    # NemotronH: one mixer per layer, NoPE attention, squared-ReLU MLP/experts
    kinds = {"linear_attention": "mamba", "full_attention": "attention", "mlp": "mlp", "moe": "moe",
             "mamba": "mamba", "attention": "attention"}
    layer_types = [kinds[k] for k in hf.layers_block_type]
    if getattr(hf, "moe_latent_size", None):
        raise CheckpointError("NemotronH with moe_latent_size is not supported yet")
    # transformers' NemotronH MLPs and experts are never gated: down(act(up(x)))
    if hf.mlp_hidden_act != "relu2":
        raise CheckpointError(f"NemotronH with mlp_hidden_act={hf.mlp_hidden_act!r} is not supported (expected relu2)")
    if hf.mamba_hidden_act != "silu":
        raise CheckpointError(f"NemotronH with mamba_hidden_act={hf.mamba_hidden_act!r} is not supported (expected silu)")
    low, high = hf.time_step_min, float("inf")  # transformers' mixer clamps dt to (time_step_min, inf)
    return BackboneConfig(
        layer_types=layer_types,
        norm_eps=hf.layer_norm_epsilon,
        attention_bias=False,  # transformers' NemotronH attention ignores config.attention_bias
        rope=None,
        intermediate_size=hf.intermediate_size,
        mlp_activation="relu2",
        mlp_bias=bool(hf.mlp_bias),
        mamba=MambaConfig(
            num_heads=hf.mamba_num_heads,
            head_dim=hf.mamba_head_dim,
            state_size=hf.ssm_state_size,
            n_groups=hf.n_groups,
            conv_kernel=hf.conv_kernel,
            chunk_size=hf.chunk_size,
            use_conv_bias=bool(hf.use_conv_bias),
            use_bias=bool(hf.use_bias),
            dt_min=float(low),
            dt_max=high,
        ),
        moe=MoEConfig(
            num_experts=hf.n_routed_experts,
            top_k=hf.num_experts_per_tok,
            expert_intermediate_size=hf.moe_intermediate_size,
            # one shared expert of this size whatever n_shared_experts says (as in transformers)
            shared_expert_intermediate_size=hf.moe_shared_expert_intermediate_size,
            scoring="sigmoid",
            norm_topk_prob=bool(hf.norm_topk_prob),
            routed_scaling_factor=float(hf.routed_scaling_factor),
            n_group=hf.n_group,
            topk_group=hf.topk_group,
            activation="relu2",
        )
        if "moe" in layer_types
        else None,
        **common,
    )


def _llama_key(key: str) -> str | None:
    key = re.sub(r"^model\.", "", key)
    if key == "embed_tokens.weight" or key == "norm.weight" or key == "lm_head.weight":
        return key
    m = re.match(r"layers\.(\d+)\.(.+)$", key)
    if not m:
        return None
    i, rest = int(m.group(1)), m.group(2)
    if rest == "input_layernorm.weight":
        return f"layers.{2 * i}.norm.weight"
    if rest == "post_attention_layernorm.weight":
        return f"layers.{2 * i + 1}.norm.weight"
    if rest.startswith("self_attn."):
        return f"layers.{2 * i}.mixer.{rest[len('self_attn.'):]}"
    if rest.startswith("mlp."):
        return f"layers.{2 * i + 1}.mixer.{rest[len('mlp.'):]}"
    return None


_NEMOTRON_RENAMES = {
    "mixer.gate.weight": "mixer.router.weight",
    "mixer.gate.e_score_correction_bias": "mixer.correction_bias",
    "mixer.experts.up_proj": "mixer.up_proj",
    "mixer.experts.down_proj": "mixer.down_proj",
}


def state_dict_from_hf(sd: dict[str, torch.Tensor], config: BackboneConfig, model_type: str) -> dict[str, torch.Tensor]:
    """Rename (and for per-expert NemotronH checkpoints, stack) transformers weights into ours."""
    out: dict[str, torch.Tensor] = {}
    if model_type in LLAMA_FAMILY:
        for key, value in sd.items():
            if key.endswith("rotary_emb.inv_freq"):
                continue
            new = _llama_key(key)
            if new is None:
                raise CheckpointError(f"unexpected weight {key!r} in a {model_type} checkpoint")
            out[new] = value
    else:
        experts: dict[tuple[int, str, int], torch.Tensor] = {}
        for key, value in sd.items():
            key = re.sub(r"^(model|backbone)\.", "", key)
            key = {"embeddings.weight": "embed_tokens.weight", "norm_f.weight": "norm.weight"}.get(key, key)
            m = re.match(r"layers\.(\d+)\.mixer\.experts\.(\d+)\.(up|down)_proj\.weight$", key)
            if m:  # original per-expert layout
                experts[(int(m.group(1)), m.group(3), int(m.group(2)))] = value
                continue
            m = re.match(r"layers\.(\d+)\.(.+)$", key)
            if m:
                rest = _NEMOTRON_RENAMES.get(m.group(2), m.group(2))
                rest = rest.replace("mixer.shared_experts.", "mixer.shared.")
                key = f"layers.{m.group(1)}.{rest}"
            out[key] = value
        for layer in sorted({k[0] for k in experts}):
            for proj in ("up", "down"):
                n = config.moe.num_experts
                out[f"layers.{layer}.mixer.{proj}_proj"] = torch.stack([experts[(layer, proj, e)] for e in range(n)])
    if config.tie_embeddings:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return fuse_projections(out)


def fuse_projections(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate q/k/v into ``qkv_proj`` and gate/up into ``up_proj`` (gate first), the
    layout of our attention and SwiGLU modules."""
    out = dict(sd)
    for key in [k for k in sd if ".mixer.q_proj." in k]:
        prefix, suffix = key.split(".mixer.q_proj.")
        parts = [out.pop(f"{prefix}.mixer.{p}_proj.{suffix}") for p in "qkv"]
        out[f"{prefix}.mixer.qkv_proj.{suffix}"] = torch.cat(parts, dim=0)
    for key in [k for k in sd if re.search(r"\.mixer\.(shared\.)?gate_proj\.", k)]:
        gate = out.pop(key)
        up_key = key.replace("gate_proj.", "up_proj.")
        out[up_key] = torch.cat([gate, out[up_key]], dim=0)
    return out
