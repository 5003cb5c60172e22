"""One dataclass that describes a backbone: its layer pattern and sizes.

A backbone is embeddings -> a flat sequence of residual sub-layers -> final norm -> LM head.
Each sub-layer is ``x = x + mixer(norm(x))`` and ``layer_types[i]`` names its mixer. A Llama
decoder layer is two sub-layers (``attention``, ``mlp``); a NemotronH layer is one
(``mamba``, ``attention``, ``mlp`` or ``moe``). Flattening both into one list is what lets
the two-tower code treat every architecture alike ("layer-aligned" means sub-layer-aligned).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError

LAYER_TYPES = ("attention", "mlp", "mamba", "moe")


@dataclass
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"  # "default" or "llama3"
    # llama3 frequency scaling (ignored for "default")
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class MambaConfig:
    num_heads: int
    head_dim: int
    state_size: int
    n_groups: int = 1
    conv_kernel: int = 4
    chunk_size: int = 128
    use_conv_bias: bool = True
    use_bias: bool = False
    dt_min: float = 0.0  # lower clamp of softplus(dt) (transformers' NemotronH uses time_step_min)
    dt_max: float = float("inf")


@dataclass
class MoEConfig:
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    scoring: str = "sigmoid"  # "sigmoid" (with correction bias, NemotronH) or "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    router_dtype: str = "float32"  # "float32" or "float64"
    activation: str = "relu2"  # expert activation, non-gated ("relu2") or gated ("swiglu")


@dataclass
class BackboneConfig:
    vocab_size: int
    hidden_size: int
    layer_types: list[str]
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_position_embeddings: int = 4096
    # attention sub-layers
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    head_dim: int = 0
    attention_bias: bool = False  # bias on the q/k/v projections
    attention_out_bias: bool = False  # bias on o_proj (Llama/Qwen3 attention_bias; never in Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    rope: RopeConfig | None = None  # None = NoPE
    # dense MLP sub-layers
    intermediate_size: int = 0
    mlp_activation: str = "swiglu"  # "swiglu" (gate/up/down) or "relu2" (up/down)
    mlp_bias: bool = False
    mamba: MambaConfig | None = None
    moe: MoEConfig | None = None
    # special tokens
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        sizes = {"vocab_size": 1, "hidden_size": 1, "max_position_embeddings": 1, "num_attention_heads": 0,
                 "num_key_value_heads": 0, "head_dim": 0, "intermediate_size": 0}
        wrong = [f"{k}={getattr(self, k)!r}" for k, low in sizes.items()
                 if isinstance(getattr(self, k), bool) or not isinstance(getattr(self, k), int) or getattr(self, k) < low]
        if wrong:
            raise UsageError(f"invalid backbone settings: {', '.join(wrong)}")
        if not isinstance(self.layer_types, list) or not self.layer_types or not all(
                isinstance(k, str) for k in self.layer_types):
            raise UsageError(f"layer_types must be a non-empty list of layer kinds, got {self.layer_types!r}")
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise UsageError(f"unknown layer types {bad}; expected some of {LAYER_TYPES}")
        if "attention" in self.layer_types:
            if self.num_attention_heads <= 0 or self.num_key_value_heads <= 0 or self.head_dim <= 0:
                raise UsageError("attention layers need num_attention_heads, num_key_value_heads and head_dim")
            if self.num_attention_heads % self.num_key_value_heads:
                raise UsageError("num_attention_heads must be a multiple of num_key_value_heads (GQA)")
        if "mlp" in self.layer_types and self.intermediate_size <= 0:
            raise UsageError("mlp layers need intermediate_size")
        if "mamba" in self.layer_types and self.mamba is None:
            raise UsageError("mamba layers need a MambaConfig")
        if "moe" in self.layer_types and self.moe is None:
            raise UsageError("moe layers need a MoEConfig")

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BackboneConfig:
        d = dict(d)
        for key, sub in (("rope", RopeConfig), ("mamba", MambaConfig), ("moe", MoEConfig)):
            if d.get(key) is not None:
                d[key] = sub(**d[key])
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> BackboneConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
