"""Training checkpoints in safetensors (never pickle): the trainable weights, the optimizer's
tensors, and JSON for the rest (step, schedule, settings). Written to a temporary folder and
renamed, so a kill -9 at any moment leaves the previous checkpoint intact.

Under FSDP2 the parameters and optimizer state are DTensors sharded over the processes: every
process takes part in gathering them, process 0 writes full tensors, and loading shards them
again. A checkpoint is therefore the same file whether or not it was written with ``--fsdp``."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor, distribute_tensor

from ..checkpoints.training import STATE, TRAINABLE, check_trainable
from ..errors import CheckpointError


def _full(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU (a collective for a sharded DTensor: every process calls it)."""
    if isinstance(value, DTensor):
        value = value.full_tensor()
    return value.detach().contiguous().cpu()


def _like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A full tensor shaped like ``param``, sharded as ``param`` is when that is a DTensor."""
    if isinstance(param, DTensor) and value.dim() > 0:
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    return value


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full trainable weights by name (collective under FSDP: call it on every process)."""
    return {name: _full(p) for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Copy full trainable weights into ``model`` (sharding them where its parameters are)."""
    check_trainable(model, weights, source)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(_like(value, params[name]))


def save_checkpoint(directory: Path, step: int, model, optimizer, scheduler, meta: dict, keep: int) -> Path | None:
    """Every process calls this (the gathering is collective under FSDP); process 0 writes."""
    weights = trainable_state(model)
    opt = optimizer.state_dict()
    tensors = {f"{idx}.{key}": _full(value) for idx, state in opt["state"].items() for key, value in state.items()}
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    root = Path(directory) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        save_file(weights, tmp / TRAINABLE)
        save_file(tensors, tmp / "optimizer.safetensors")
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        (tmp / STATE).write_text(json.dumps(
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
    found = sorted(p for p in (Path(directory) / "checkpoints").glob("step-*") if (p / STATE).is_file())
    return found[-1] if found else None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer and schedule in place; returns the saved JSON state."""
    try:
        state = json.loads((path / STATE).read_text())
        weights = load_file(path / TRAINABLE)
        tensors = load_file(path / "optimizer.safetensors")
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is unreadable: {e}") from e
    load_trainable(model, weights, str(path))
    # the optimizer numbers its parameters in param-group order
    by_index = [p for group in optimizer.param_groups for p in group["params"]]
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        if int(idx) >= len(by_index):
            raise CheckpointError(f"checkpoint {path}: optimizer state for parameter {idx}, the model has {len(by_index)}")
        opt_state.setdefault(int(idx), {})[name] = _like(value, by_index[int(idx)])
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    scheduler.load_state_dict({**scheduler.state_dict(), **state["scheduler"]})
    return state
