"""``twotower train``: the masked-diffusion objective on a frozen backbone, on one CPU or many
processes (torchrun: DDP over gloo on CPU, NCCL on GPU; ``--fsdp`` shards with FSDP2 instead),
resumable exactly after a kill."""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..checkpoints.build import build_two_tower
from ..checkpoints.saved import save_two_tower
from ..checkpoints.training import denoiser_config_of_run
from ..data.shards import TokenShards
from ..errors import DataError, UsageError
from ..files import atomic_write, read_json, save_figure, write_json
from ..generate import DecodingSettings, decode
from ..model.linear import Linear
from ..model.twotower import TwoTower
from .batches import sample_masks, sample_rows
from .checkpoint import load_trainable, remove_temporary, resume, save_checkpoint, trainable_state
from .config import TrainConfig

log = logging.getLogger(__name__)

VAL_STEP = 2**30  # the "step" whose rows and masks make the fixed validation set
RESUME_KEYS = ("data", "model", "flavour", "lora_rank", "seq_len", "batch_size", "grad_accum", "seed", "steps",
               "mask_pattern", "init_from")


CALIBRATION_STEPS = (5, 25)  # a time budget is fitted from the pace of steps 5..25 (after warm-up kernels)


def wsd_schedule(cfg: TrainConfig):
    """Warmup-stable-decay: linear warmup, constant, then linear decay to min_lr_ratio.
    Reads cfg.steps at every call: a time budget may shorten the run once it has started."""

    def factor(step: int) -> float:
        decay_start = cfg.steps * (1 - cfg.decay_fraction)
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if step < decay_start:
            return 1.0
        return 1.0 - (1.0 - cfg.min_lr_ratio) * (step - decay_start) / max(cfg.steps - decay_start, 1)

    return factor


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(getattr(torch.backends.mkldnn, "is_available", lambda: False)()) and torch.cpu._is_avx512_bf16_supported()


@torch.no_grad()
def validate(model: TwoTower, val: TokenShards, cfg: TrainConfig, block: int, autocast, global_rows: int) -> dict:
    """Masked-target loss at the training noise mix, and per target slot the accuracy and mean
    confidence with the whole block masked (the first denoising step, where parallelism starts),
    how often the first slot's argmax is the AR model's (greedy agreement), plus tokens per NFE
    of mask diffusion at threshold 0.9 (threshold and left_prefix rules) on a few validation
    prompts. The set is ``val_batches`` global batches, so it does not depend on how many
    processes share them."""
    n = cfg.seq_len // block
    rows = range(cfg.val_batches * global_rows)
    total = count = 0.0
    hits, conf, slots = torch.zeros(block), torch.zeros(block), torch.zeros(block)
    ar_hits = ar_slots = 0.0
    for first in range(0, len(rows), cfg.batch_size):
        part = rows[first : first + cfg.batch_size]
        x, trained = sample_rows(val, cfg.seed, VAL_STEP, part, cfg.seq_len + 1)
        x = x.to(model.context.device)
        masked = sample_masks(cfg.seed, VAL_STEP, part, len(rows), n, block, cfg.t_eps, False, cfg.mask_pattern)
        masked = masked.to(x.device)
        with autocast():
            total += float(model.diffusion_loss(x, masked, normalizer=1.0, trained=trained))
        count += float(model.loss_targets(x, masked, trained).sum())
        all_hidden = torch.ones_like(masked)  # the whole block hidden
        block_inputs, targets, _, t = model.noisy_blocks(x, all_hidden)
        counted = model.loss_targets(x, all_hidden, trained)
        with autocast():
            hidden, context_hidden = model.training_hidden(x, block_inputs, t)
            probs = model.denoiser.lm_head(hidden).float().softmax(-1)
            aligned = model.ar_aligned(torch.ones_like(counted)) & counted  # the first slots
            ar_next = model.ar_teacher_logits(context_hidden, aligned).argmax(-1)
        top = probs.max(-1)
        ar_hits += float((top.indices[aligned] == ar_next).sum())
        ar_slots += float(aligned.sum())
        hits += ((top.indices == targets) & counted).sum((0, 1)).cpu()
        conf += (top.values * counted).sum((0, 1)).cpu()
        slots += counted.sum((0, 1)).cpu()
    slots = slots.clamp_min(1)
    prompts = sample_rows(val, cfg.seed, VAL_STEP + 1, range(cfg.val_prompts), 32)[0].tolist()
    speed = {}
    for rule, key in (("threshold", "tokens_per_nfe"), ("left_prefix", "tokens_per_nfe_left_prefix")):
        settings = DecodingSettings(max_new_tokens=2 * block, block_size=block, confidence_threshold=0.9,
                                    stop_token_ids=(), commit_rule=rule)
        out = decode(model, prompts, settings)
        speed[key] = out.stats.tokens_per_nfe
    return {
        "val_loss": total / max(count, 1),
        "slot_accuracy": [round(v, 4) for v in (hits / slots).tolist()],
        "slot_confidence": [round(v, 4) for v in (conf / slots).tolist()],
        "slot1_ar_agreement": round(ar_hits / max(ar_slots, 1.0), 4),
        **speed,
    }


def plot_losses(metrics_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train (masked targets)", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, png)
    plt.close(fig)


def _log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _trim_metrics(path: Path, step: int) -> None:
    """On resume, forget what was logged after the checkpoint: it will be logged again (a line
    cut by a kill is dropped too)."""
    if path.exists():
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue
        atomic_write(path, "".join(line + "\n" for line in keep))


RUN_FILES = {"config.json", "metrics.jsonl", "loss.png", "checkpoints", "final"}  # what a run writes


def check_out_dir(out: Path, overwrite: bool) -> None:
    """A run writes only into a new or empty directory or one of its own runs (resumed); a
    directory holding anything else (a saved model, other files) is refused unless
    ``overwrite``, so that nothing a user keeps there is replaced."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out-dir {out} is a file, not a directory")
    if not out.is_dir() or overwrite:
        return
    entries = {p.name for p in out.iterdir()}
    foreign = sorted(entries - RUN_FILES)
    config = out / "config.json"
    if config.is_file():
        try:
            ours = {"data", "out_dir", "model"} <= set(read_json(config))
        except DataError:
            ours = False
        if not ours:
            foreign.insert(0, "config.json (not a training run's)")
    if foreign:
        raise UsageError(f"{out} holds files a training run did not write ({', '.join(foreign[:4])}): choose "
                         "another --out-dir, or pass --overwrite to write there anyway")


def _save_final(cfg: TrainConfig, model: TwoTower, tokenizer, path: Path, device: torch.device, rank: int) -> None:
    """The trained model as a checkpoint directory. Under FSDP the shards are gathered (every
    process) into an unsharded copy that process 0 writes."""
    if cfg.fsdp:
        weights = trainable_state(model)  # collective
        if rank == 0:
            model, _ = build_model(cfg, device)
            load_trainable(model, weights, "the gathered FSDP shards")
    if rank == 0:
        save_two_tower(model, path, backbone_ref=cfg.model, tokenizer=tokenizer)


def _fit_time_budget(cfg: TrainConfig, done: int, spent: float, window: float, device: torch.device) -> None:
    """Shorten ``cfg.steps`` so training ends within ``cfg.time_budget_s`` seconds, keeping 10%
    for validation, checkpoints and the final save (never lengthen it: steps stays a ceiling).
    Every process fits the same number (rank 0's), so DDP processes stop together."""
    per_step = window / (CALIBRATION_STEPS[1] - CALIBRATION_STEPS[0])
    fit = done + int((0.9 * cfg.time_budget_s - spent) / per_step)
    fitted = torch.tensor(max(done + 1, min(cfg.steps, fit)), device=device)
    if dist.is_initialized():
        dist.broadcast(fitted, src=0)
    cfg.steps = int(fitted)


def build_model(cfg: TrainConfig, device: torch.device):
    torch.manual_seed(cfg.seed)  # LoRA initialisation: the same on every process
    # (a resumed run's checkpoint overwrites the init_from weights)
    model, tokenizer = build_two_tower(cfg.model, denoiser_config_of_run(cfg.to_dict()), device=device,
                                       init_from=cfg.init_from)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    return model, tokenizer


def shard(model: TwoTower) -> None:
    """FSDP2: every layer of both towers is a group of its own, gathered while it runs and freed
    after; the root group holds the rest (embeddings and head, which SmolLM2 ties, the norms,
    time conditioning and the mask embedding). The frozen context tower is sharded too: a model
    that does not fit one device does not fit as a context tower either."""
    from torch.distributed.fsdp import fully_shard

    for tower in (model.context, model.denoiser_tower):
        for layer in tower.layers if tower is not None else []:
            fully_shard(layer)
    fully_shard(model)


def train(cfg: TrainConfig, progress: bool = True, stop_after: int | None = None, overwrite: bool = False) -> dict:
    """Run (or resume) the training described by ``cfg``; ``stop_after`` ends this invocation
    after that many steps (a checkpoint is written there), for time-boxed machines;
    ``overwrite`` writes into an out_dir that holds files a run did not write."""
    if stop_after is not None and (not isinstance(stop_after, int) or isinstance(stop_after, bool) or stop_after < 1):
        raise UsageError(f"stop_after must be a positive integer, got {stop_after!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if cfg.fsdp and "RANK" not in os.environ:
        raise UsageError("--fsdp shards the model over torchrun's processes: launch with torchrun --nproc-per-node N")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and FSDP2 use the current device: one GPU per process
    if (world > 1 or cfg.fsdp) and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    out = Path(cfg.out_dir)
    check_out_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        for leftover in remove_temporary(out):
            log.warning("twotower: removed %s, left by a run stopped while writing a checkpoint", leftover)

    model, tokenizer = build_model(cfg, device)
    if cfg.fsdp:
        shard(model)  # before the optimizer sees the parameters: it must hold the shards
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, wsd_schedule(cfg))
    shards, val = TokenShards(cfg.data, "train"), TokenShards(cfg.data, "val")
    if not val.num_tokens:
        raise DataError(f"{cfg.data} has no validation documents: prepare it with a larger --val-fraction")
    for split in (shards, val):
        split.check_token_ids(model.context.config.vocab_size)

    start, tokens_seen, elapsed = 0, 0, 0.0
    resumed = resume(out, model, optimizer, scheduler)
    if resumed is not None:
        state, _ = resumed
        saved = state["config"]
        if cfg.time_budget_s is not None:
            cfg.steps = saved["steps"]  # the length the budget fitted when the run started
        changed = [k for k in RESUME_KEYS if saved.get(k) != getattr(cfg, k)]
        if changed:
            raise UsageError(f"{out} holds a run with other settings ({', '.join(changed)}); use another out_dir")
        start, tokens_seen, elapsed = state["step"], state["tokens_seen"], state["elapsed"]
        if rank == 0:
            _trim_metrics(metrics_path, start)
    elif rank == 0:
        metrics_path.unlink(missing_ok=True)
        write_json(out / "config.json", cfg.to_dict())

    wrapped = torch.nn.parallel.DistributedDataParallel(model) if world > 1 and not cfg.fsdp else model
    if cfg.compile:
        for module in model.modules():
            if isinstance(module, Linear):
                module.packing = False  # oneDNN-prepacked weights (CPU, no grad) do not lower in inductor
        wrapped = torch.compile(wrapped)
    use_bf16 = bf16_supported(device) if cfg.bf16 is None else cfg.bf16

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    global_rows = cfg.batch_size * world * cfg.grad_accum
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress or rank != 0, desc="train", unit="step")
    last: dict = {}
    done = start
    window_start, window_tokens = time.perf_counter(), 0
    began, calibrated = time.perf_counter(), None
    step = start
    while step < cfg.steps:
        block = cfg.block_size_at(step)
        n = cfg.seq_len // block
        micro = []
        local_count = torch.zeros((), device=device)
        for m in range(cfg.grad_accum):
            first = (m * world + rank) * cfg.batch_size
            rows = range(first, first + cfg.batch_size)
            x, trained = sample_rows(shards, cfg.seed, step, rows, cfg.seq_len + 1, cfg.complementary_masks)
            x, trained = x.to(device), trained.to(device) if trained is not None else None
            masked = sample_masks(cfg.seed, step, rows, global_rows, n, block, cfg.t_eps,
                                  cfg.complementary_masks, cfg.mask_pattern).to(device)
            local_count += model.loss_targets(x, masked, trained).sum()
            micro.append((x, masked, trained))
        total = local_count.clone()
        if world > 1:
            dist.all_reduce(total)
        # each process divides by the global count; DDP averages gradients over processes
        normalizer = max(float(total), 1.0) / world  # a batch of untrained tokens only: loss 0, not 0/0
        loss_sum = torch.zeros((), device=device)
        for m, (x, masked, trained) in enumerate(micro):
            # reduce gradients over processes only after the last micro-step
            last_micro = m == len(micro) - 1
            if cfg.fsdp:
                model.set_requires_gradient_sync(last_micro)
            sync = nullcontext() if world == 1 or cfg.fsdp or last_micro else wrapped.no_sync()
            with sync, autocast():
                loss = wrapped(x, masked, cfg.loss_weighting, normalizer, trained, cfg.ar_distill)
            loss.backward()
            loss_sum += loss.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(loss_sum)
            loss_sum /= world
        tokens_seen += global_rows * cfg.seq_len
        window_tokens += global_rows * cfg.seq_len
        done = step + 1
        bar.update(1)
        if rank == 0 and (done % cfg.log_every == 0 or done == cfg.steps):
            now = time.perf_counter()
            elapsed += now - window_start
            rate = window_tokens / (now - window_start)
            window_start, window_tokens = now, 0
            last = {"step": done, "loss": round(float(loss_sum), 5), "lr": scheduler.get_last_lr()[0],
                    "block_size": block, "tokens": tokens_seen, "tokens_per_s": round(rate, 1),
                    "elapsed_s": round(elapsed, 1)}
            _log(metrics_path, last)
            bar.set_postfix(loss=f"{float(loss_sum):.3f}", tok_s=f"{rate:.0f}")
        # FSDP: every process validates (the layers' gathers are collective), process 0 logs
        if (rank == 0 or cfg.fsdp) and (done % cfg.eval_every == 0 or done == cfg.steps):
            model.eval()
            if cfg.fsdp:
                model.unshard()  # the root group: validation calls its modules outside forward()
            record = {"step": done, **validate(model, val, cfg, block, autocast, global_rows)}
            if cfg.fsdp:
                model.reshard()
            model.train()
            if rank == 0:
                _log(metrics_path, record)
                plot_losses(metrics_path, out / "loss.png")
                last.update(record)
        if cfg.time_budget_s is not None and start == 0 and done in CALIBRATION_STEPS:
            if done == CALIBRATION_STEPS[0]:
                calibrated = time.perf_counter()
            else:
                _fit_time_budget(cfg, done, time.perf_counter() - began, time.perf_counter() - calibrated, device)
                bar.total = cfg.steps
        stopping = stop_after is not None and done - start >= stop_after
        if done % cfg.save_every == 0 or done == cfg.steps or stopping:
            save_checkpoint(out, done, model, optimizer, scheduler,
                            {"config": cfg.to_dict(), "tokens_seen": tokens_seen, "elapsed": elapsed},
                            cfg.keep_checkpoints)
        if world > 1:
            dist.barrier()
        if stopping:
            break
        step += 1
    bar.close()
    if done == cfg.steps:
        _save_final(cfg, model, tokenizer, out / "final", device, rank)
    if world > 1:
        dist.destroy_process_group()
    return last
