"""Load NVIDIA's released two-tower checkpoint layout into a full-flavour TwoTower.

Keys (DESIGN.md §3): ``context_tower.*`` and ``denoiser_tower.*`` (transformers' NemotronH
backbone keys: ``embeddings``, ``layers.{i}.norm``, ``layers.{i}.mixer.*``, ``norm_f``),
``context_lm_head.weight``, ``lm_head.weight`` (the denoiser's head), ``t_embedder.mlp.{0,2}.*``,
``t_block.1.*`` and ``scale_shift_tables.{layer}`` (3, H) ordered (shift, scale, gate).

config.json is a NemotronH config (its fields at the top level) plus optional two-tower fields:
``mask_token_id`` (default 3), ``block_size`` (default 16), ``time_freq_dim`` (256) and
``time_scale`` (1000). The released model's diffusion mode puts the block's masks after the full
context (no token shift) and modulates Mamba/attention inputs before their RMSNorm; the loaded
model is configured for exactly that.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..model.backbone import Backbone
from ..model.devices import resolve_device
from ..model.twotower import DenoiserConfig, TwoTower
from .convert import config_from_hf, state_dict_from_hf
from .load import CheckpointError, _read_safetensors, backbone_from_state_dict

RELEASED_MASK_TOKEN_ID = 3
RELEASED_BLOCK_SIZE = 16
_TWOTOWER_FIELDS = ("mask_token_id", "block_size", "time_freq_dim", "time_scale")


def _tower(weights: dict[str, torch.Tensor], prefix: str, head_key: str, config, hf_config) -> Backbone:
    sd = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    if head_key not in weights:
        raise CheckpointError(f"released checkpoint lacks {head_key!r}")
    sd["lm_head.weight"] = weights[head_key]
    try:
        state = state_dict_from_hf(sd, config, hf_config.model_type)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"cannot map the {prefix.rstrip('.')} weights: {e!r}") from e
    return backbone_from_state_dict(config, state)


def _time_state(weights: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Released time-conditioning keys -> our TimeConditioning state dict."""
    state = {k: v for k, v in weights.items() if re.match(r"(t_embedder\.mlp\.[02]|t_block\.1)\.(weight|bias)$", k)}
    tables = {int(m.group(1)): v for k, v in weights.items() if (m := re.match(r"scale_shift_tables\.(\d+)$", k))}
    if sorted(tables) != list(range(num_layers)):
        raise CheckpointError(f"expected scale_shift_tables.0..{num_layers - 1}, found layers {sorted(tables)}")
    state["scale_shift_tables"] = torch.stack([tables[i] for i in range(num_layers)])
    return state


def load_released(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[TwoTower, object | None]:
    """A full-flavour TwoTower (and the directory's tokenizer, or None) from a directory in the
    released layout. Every tensor in the checkpoint must find its place."""
    from transformers import AutoTokenizer, NemotronHConfig

    device = resolve_device(device)
    directory = Path(path).expanduser()
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} has no config.json: not a released two-tower checkpoint")
    raw = json.loads((directory / "config.json").read_text())
    extra = {k: raw.pop(k) for k in _TWOTOWER_FIELDS if k in raw}
    raw.pop("model_type", None)
    try:
        hf_config = NemotronHConfig(**raw)
    except Exception as e:
        raise CheckpointError(f"{directory / 'config.json'} is not a NemotronH config: {e}") from e
    config = config_from_hf(hf_config)
    weights = _read_safetensors(directory)

    context = _tower(weights, "context_tower.", "context_lm_head.weight", config, hf_config)
    denoiser = _tower(weights, "denoiser_tower.", "lm_head.weight", config, hf_config)
    time_state = _time_state(weights, config.num_layers)
    used = {k for k in weights if k.startswith(("context_tower.", "denoiser_tower."))}
    used |= {"context_lm_head.weight", "lm_head.weight"} | (set(time_state) - {"scale_shift_tables"})
    used |= {f"scale_shift_tables.{i}" for i in range(config.num_layers)}
    if leftover := sorted(set(weights) - used):
        raise CheckpointError(f"unexpected tensors in the released checkpoint: {leftover[:5]}")

    den_config = DenoiserConfig(
        flavour="full",
        block_size=int(extra.get("block_size", RELEASED_BLOCK_SIZE)),
        mask_token_id=int(extra.get("mask_token_id", RELEASED_MASK_TOKEN_ID)),
        token_shift=False,
        modulation_order="released",
        time_freq_dim=int(extra.get("time_freq_dim", 256)),
        time_scale=float(extra.get("time_scale", 1000.0)),
    )
    model = TwoTower(context, den_config)
    model.denoiser_tower = denoiser.requires_grad_(True)  # replaces TwoTower's copy of the context
    try:
        model.time.load_state_dict(time_state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"time conditioning does not match the model: {e}") from e
    model = model.to(device=device, dtype=dtype).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except Exception:
        tokenizer = None
    return model, tokenizer
