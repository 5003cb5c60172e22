"""transformers config of a two-tower model: our backbone and denoiser configs as plain dicts.

The lora flavour shares its weights with an unchanged AR backbone, so a saved lora model names
that backbone (``backbone``: a registry name or a path) instead of carrying its weights.
"""

from __future__ import annotations

import dataclasses

from transformers import PreTrainedConfig

from ..checkpoints.saved import mirrored_fields
from ..model.config import BackboneConfig
from ..model.twotower import DenoiserConfig


class TwoTowerConfig(PreTrainedConfig):
    model_type = "twotower"  # in memory: saved config.json files name a backbone type (checkpoints.saved)

    backbone_config: dict | None = None  # BackboneConfig.to_dict()
    denoiser_config: dict | None = None  # dataclasses.asdict(DenoiserConfig)
    backbone: str | None = None  # lora flavour: where the shared base weights come from
    # Mirrored from the backbone for transformers tooling (generate, perplexity scripts).
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # forward() is a cache-less pass over the whole sequence: transformers' generate() must not
    # hand it a KV cache and then feed only the newest token.
    use_cache: bool = False
    # Our Backbone ties its own LM head when its config says so; transformers must not re-tie.
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs) -> None:
        if self.backbone_config is not None:
            for key, value in mirrored_fields(self.backbone_settings).items():
                setattr(self, key, value)
        super().__post_init__(**kwargs)

    @classmethod
    def from_parts(
        cls, backbone: BackboneConfig, denoiser: DenoiserConfig, backbone_ref: str | None = None, **kwargs
    ) -> TwoTowerConfig:
        return cls(
            backbone_config=backbone.to_dict(),
            denoiser_config=dataclasses.asdict(denoiser),
            backbone=backbone_ref,
            **kwargs,
        )

    @property
    def backbone_settings(self) -> BackboneConfig:
        return BackboneConfig.from_dict(self.backbone_config)

    @property
    def denoiser_settings(self) -> DenoiserConfig:
        return DenoiserConfig(**self.denoiser_config)
