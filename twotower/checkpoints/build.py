"""Building a two-tower model around a backbone: an untrained denoiser (identity time
conditioning, a copy of the AR model), optionally started from a saved denoiser. Training runs
and the loaders build models here, so that a run's settings mean the same everywhere."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from ..model.twotower import DenoiserConfig, TwoTower
from .load import REGISTRY, _read_safetensors, load_backbone
from .saved import architecture, is_two_tower_dir, load_saved_state, model_settings, read_json_object

SHIPPED_DIR = Path(__file__).parents[1] / "weights"


def shipped_denoiser(name: str) -> Path | None:
    """The trained denoiser that ships with the package for registry model ``name``, if any."""
    path = SHIPPED_DIR / name
    return path if name in REGISTRY and is_two_tower_dir(path) else None


def denoiser_dir(name_or_path: str) -> Path | None:
    """A saved two-tower directory as given, else the denoiser shipped for registry model
    ``name_or_path``, else None."""
    return Path(name_or_path).expanduser() if is_two_tower_dir(name_or_path) else shipped_denoiser(name_or_path)


def build_two_tower(
    backbone_ref: str, denoiser: DenoiserConfig, dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu", init_from: str | None = None,
) -> tuple[TwoTower, object | None]:
    """The backbone ``backbone_ref`` as the context tower with a denoiser of ``denoiser``'s
    kind: untrained, or started from the saved denoiser ``init_from``. Returns the model and
    the backbone's tokenizer."""
    backbone, tokenizer = load_backbone(backbone_ref, dtype=dtype, device=device)
    model = TwoTower(backbone, denoiser)
    if init_from:
        load_denoiser(model, init_from)
    return model, tokenizer


# the settings a saved denoiser must share with the model it is loaded into
_SAME_KIND = ("flavour", "lora_rank", "lora_alpha", "lora_targets", "token_shift", "modulation_order", "mask_token_id",
              "time_freq_dim")


def load_denoiser(model: TwoTower, name_or_path: str) -> None:
    """Start ``model``'s denoiser from a saved one: a two-tower directory, or the denoiser
    shipped for a registry model. Both must be the same kind of denoiser (flavour, LoRA rank
    and scaling, block layout, mask token) over the same backbone architecture."""
    directory = denoiser_dir(name_or_path)
    if directory is None:
        raise CheckpointError(
            f"{name_or_path!r} is neither a saved two-tower directory nor a registry model with a shipped denoiser"
        )
    config = read_json_object(directory / "config.json")
    _, saved = model_settings(config, directory)
    ours = model.config
    differ = [f"{f} {getattr(saved, f)!r} (ours {getattr(ours, f)!r})" for f in _SAME_KIND
              if getattr(saved, f) != getattr(ours, f)]
    if differ:
        raise CheckpointError(f"the denoiser in {directory} differs from this run's: {', '.join(differ)}")
    if architecture(model.context.config.to_dict()) != architecture(config["backbone_config"]):
        raise CheckpointError(f"the denoiser in {directory} was trained on another backbone architecture")
    with torch.no_grad():
        load_saved_state(model, _read_safetensors(directory), directory)
