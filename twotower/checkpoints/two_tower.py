"""Two-tower models by name: a saved two-tower directory, a registry backbone with the denoiser
shipped for it inside this package (``twotower/weights/<name>``), or any other backbone with an
untrained denoiser (a copy of the AR model, for measuring the untrained baseline)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .load import REGISTRY, load_backbone

SHIPPED_DIR = Path(__file__).parents[1] / "weights"
UNTRAINED_NOTE = (
    "untrained denoiser: a lora denoiser initialised as a copy of the AR model (identity time "
    "conditioning), so expect about one committed token per step"
)


def is_two_tower_dir(name_or_path: str | Path) -> bool:
    config = Path(name_or_path).expanduser() / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text()).get("model_type") == "twotower"
    except (OSError, ValueError):
        return False


def shipped_denoiser(name: str) -> Path | None:
    """The trained denoiser that ships with the package for registry model ``name``, if any."""
    path = SHIPPED_DIR / name
    return path if name in REGISTRY and is_two_tower_dir(path) else None


def denoiser_dir(name_or_path: str) -> Path | None:
    """A saved two-tower directory as given, else the denoiser shipped for registry model
    ``name_or_path``, else None."""
    return Path(name_or_path).expanduser() if is_two_tower_dir(name_or_path) else shipped_denoiser(name_or_path)


DEFAULT_COMMIT_RULE = "threshold"  # the released rule (DESIGN.md §1)
PRESET_KEYS = ("verify", "steps_per_block", "block_size")  # generation_config.json keys of a generate preset


@dataclass
class LoadedTwoTower:
    model: object  # TwoTower
    tokenizer: object | None
    backbone: str | None  # the backbone's name or path (for baselines that load it themselves)
    note: str | None  # set when the denoiser is untrained
    # mask-diffusion settings the saved model recommends (its generation_config.json)
    decoding: dict = field(default_factory=dict)

    def commit_rule(self, requested: str | None) -> str:
        """The rule asked for, else the one this model recommends, else the released rule."""
        return requested or self.decoding.get("commit_rule", DEFAULT_COMMIT_RULE)

    def preset(self) -> dict:
        """The dial settings this model recommends for ``generate`` (say, verified whole-block
        drafts of 4 tokens: ``verify=True, steps_per_block=1, block_size=4``), meant as one
        preset: a caller who sets any option of the dial takes the plain dial instead (a block
        size they give replaces the preset's)."""
        return {k: self.decoding[k] for k in PRESET_KEYS if k in self.decoding}


def recommended_decoding(directory: str | Path) -> dict:
    """The decoding settings a saved two-tower directory recommends, kept where transformers
    models keep their generation defaults: ``generation_config.json`` (``commit_rule``, and a
    ``generate`` preset of ``verify``, ``steps_per_block`` and ``block_size``)."""
    if not (Path(directory).expanduser() / "generation_config.json").is_file():
        return {}
    from transformers import GenerationConfig

    config = GenerationConfig.from_pretrained(directory)
    return {k: getattr(config, k) for k in ("commit_rule", *PRESET_KEYS) if hasattr(config, k)}


def load_two_tower(
    name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    untrained: bool = False, block_size: int = 16,
) -> LoadedTwoTower:
    """A saved two-tower directory or a training checkpoint (``OUT/checkpoints/step-N``); a
    registry name with its shipped denoiser (unless ``untrained``); else the backbone with an
    untrained lora denoiser of ``block_size``."""
    from ..model.twotower import DenoiserConfig, TwoTower

    from ..train.checkpoint import is_training_checkpoint, model_from_checkpoint

    if untrained and (is_two_tower_dir(name_or_path) or is_training_checkpoint(name_or_path)):
        raise ValueError(f"{name_or_path} is a trained two-tower directory: drop the untrained option")
    if is_training_checkpoint(name_or_path):  # OUT/checkpoints/step-N of a run, finished or not
        model, tokenizer, backbone = model_from_checkpoint(name_or_path, dtype, device)
        return LoadedTwoTower(model, tokenizer, backbone, None)
    directory = None if untrained else denoiser_dir(name_or_path)
    if directory is not None:
        from ..hf import TwoTowerForCausalLM

        wrapped = TwoTowerForCausalLM.from_pretrained(directory, dtype=dtype, device=device)
        return LoadedTwoTower(wrapped.twotower, wrapped.tokenizer, wrapped.config.backbone, None,
                              recommended_decoding(directory))
    backbone, tokenizer = load_backbone(name_or_path, dtype=dtype, device=device)
    model = TwoTower(backbone, DenoiserConfig(flavour="lora", block_size=block_size)).eval()
    return LoadedTwoTower(model, tokenizer, name_or_path, UNTRAINED_NOTE)


def warn_untrained(loaded: LoadedTwoTower) -> None:
    if loaded.note:
        print(f"twotower: note: {loaded.note}", file=sys.stderr)
