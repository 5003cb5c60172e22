"""Training checkpoints in safetensors (never pickle): the trainable weights, the optimizer's
tensors, and JSON for the rest (step, schedule, settings). Written to a temporary folder and
renamed, so a kill -9 at any moment leaves the previous checkpoint intact.

Under FSDP2 the parameters and optimizer state are DTensors sharded over the processes: every
process takes part in gathering them, process 0 writes full tensors, and loading shards them
again. A checkpoint is therefore the same file whether or not it was written with ``--fsdp``."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from ..checkpoints.tensors import read_tensors, save_tensors
from ..checkpoints.training import OPTIMIZER, STATE, TRAINABLE, check_trainable
from ..errors import CheckpointError
from ..files import remove_leftovers

log = logging.getLogger(__name__)
TEMPORARY_PREFIX = ".tmp-"  # a checkpoint being written


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
    tmp = Path(tempfile.mkdtemp(prefix=TEMPORARY_PREFIX, dir=root))
    try:
        save_tensors(weights, tmp / TRAINABLE)
        save_tensors(tensors, tmp / OPTIMIZER)
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


def checkpoints_newest_first(directory: Path) -> list[Path]:
    return sorted((p for p in (Path(directory) / "checkpoints").glob("step-*") if p.is_dir()), reverse=True)


def latest_checkpoint(directory: Path) -> Path | None:
    found = [p for p in checkpoints_newest_first(directory) if (p / STATE).is_file()]
    return found[0] if found else None


def remove_temporary(directory: Path) -> list[Path]:
    """What a run killed while writing a checkpoint left behind."""
    return remove_leftovers(Path(directory) / "checkpoints", TEMPORARY_PREFIX + "*")


def read_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A checkpoint's JSON state, trainable weights and optimizer tensors, checked whole (a
    truncated or bit-flipped file is a CheckpointError naming it) before anything is applied."""
    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: {STATE} is unreadable ({e})") from e
    if not isinstance(state, dict) or not {"step", "config", "param_groups", "scheduler"} <= set(state):
        raise CheckpointError(f"checkpoint {path}: {STATE} is not a training state")
    return state, read_tensors(path / TRAINABLE)[0], read_tensors(path / OPTIMIZER)[0]


def resume(directory: Path, model, optimizer, scheduler) -> tuple[dict, Path] | None:
    """Restore the newest intact checkpoint of a run in place; damaged newer ones are skipped
    with a warning that names them. None when the run has no checkpoint yet."""
    candidates = checkpoints_newest_first(directory)
    for path in candidates:
        try:
            state, weights, tensors = read_checkpoint(path)
        except CheckpointError as e:
            log.warning("twotower: skipping a damaged checkpoint: %s", e)
            continue
        apply_checkpoint(path, state, weights, tensors, model, optimizer, scheduler)
        return state, path
    if candidates:
        raise CheckpointError(f"{directory}: every checkpoint is damaged ({', '.join(p.name for p in candidates)}); "
                              "start the run in another --out-dir")
    return None


def apply_checkpoint(path: Path, state: dict, weights: dict, tensors: dict, model, optimizer, scheduler) -> None:
    """Weights, optimizer and schedule of a checkpoint read by ``read_checkpoint``, in place."""
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
