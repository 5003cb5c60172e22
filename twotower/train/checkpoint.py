"""Training checkpoints in safetensors (never pickle): the trainable weights, the optimizer's
tensors, and JSON for the rest (step, schedule, settings). Written to a temporary folder and
renamed, so a kill -9 at any moment leaves the previous checkpoint intact."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..checkpoints.load import CheckpointError


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(directory: Path, step: int, model, optimizer, scheduler, meta: dict, keep: int) -> Path:
    root = Path(directory) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        opt = optimizer.state_dict()
        tensors = {f"{idx}.{key}": value.contiguous().cpu()
                   for idx, state in opt["state"].items() for key, value in state.items()}
        save_file(tensors, tmp / "optimizer.safetensors")
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        (tmp / "state.json").write_text(json.dumps(
            {**meta, "step": step, "param_groups": opt["param_groups"], "scheduler": sched}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    found = sorted(p for p in (Path(directory) / "checkpoints").glob("step-*") if (p / "state.json").is_file())
    return found[-1] if found else None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer and schedule in place; returns the saved JSON state."""
    try:
        state = json.loads((path / "state.json").read_text())
        weights = load_file(path / "trainable.safetensors")
        tensors = load_file(path / "optimizer.safetensors")
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is unreadable: {e}") from e
    params = dict(model.named_parameters())
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in weights)
    if missing or set(weights) - set(params):
        raise CheckpointError(f"checkpoint {path} does not match the model (missing {missing[:3]})")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    scheduler.load_state_dict({**scheduler.state_dict(), **state["scheduler"]})
    return state
