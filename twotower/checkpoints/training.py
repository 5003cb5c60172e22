"""Training checkpoints (``OUT/checkpoints/step-N``) read as the models they hold, so that a run
can be evaluated before it ends or after it was stopped. The files are written by
``twotower.train.checkpoint``: safetensors of the trainable weights and of the optimizer, and
``state.json`` with the run's settings."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..model.twotower import DenoiserConfig, TwoTower
from .build import build_two_tower
from .tensors import read_tensors

STATE = "state.json"
TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.safetensors"


def is_training_checkpoint(path: str | Path) -> bool:
    path = Path(path).expanduser()
    return (path / STATE).is_file() and (path / TRAINABLE).is_file()


def denoiser_config_of_run(run: dict) -> DenoiserConfig:
    """The denoiser a training run with settings ``run`` (``TrainConfig.to_dict()``) trains."""
    return DenoiserConfig(flavour=run["flavour"], block_size=run["block_size"], lora_rank=run["lora_rank"],
                          lora_alpha=run["lora_alpha"])


def check_trainable(model: torch.nn.Module, names, source: str) -> None:
    """The checkpoint's tensors are exactly the model's trainable weights."""
    params = dict(model.named_parameters())
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in names)
    unexpected = sorted(set(names) - set(params))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {source} does not match the model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")


def model_from_checkpoint(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[TwoTower, object | None, str]:
    """The run's settings rebuild the two towers, the saved trainable weights go on top.
    Returns (TwoTower in eval mode, tokenizer, the backbone's name or path)."""
    path = Path(path).expanduser()
    try:
        run = json.loads((path / STATE).read_text())["config"]
        denoiser = denoiser_config_of_run(run)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: {STATE} does not hold a run's settings ({e!r})") from e
    weights = read_tensors(path / TRAINABLE)[0]
    # the checkpoint holds every trained weight: no need to load the run's starting denoiser first
    model, tokenizer = build_two_tower(run["model"], denoiser)
    check_trainable(model, weights, str(path))
    with torch.no_grad():
        model.load_state_dict(weights, strict=False)
    return model.to(device=device, dtype=dtype).eval(), tokenizer, run["model"]
