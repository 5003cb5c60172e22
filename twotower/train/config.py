"""Everything a training run is, in one dataclass (saved with every checkpoint)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import UsageError
from .batches import MASK_PATTERNS


@dataclass
class TrainConfig:
    data: str  # a directory written by `twotower data prepare`
    out_dir: str
    model: str = "smollm2-135m"
    flavour: str = "lora"
    lora_rank: int = 16
    lora_alpha: float = 16.0  # alpha/r = 1 (alpha/r = 2 at lr 1e-3 diverged on SmolLM2)
    block_size: int = 16
    # block-size curriculum: [[size, until_step], ...] before block_size (NVIDIA: 32 then 16)
    curriculum: list[list[int]] = field(default_factory=list)
    seq_len: int = 256  # tokens per sequence, a multiple of every block size
    batch_size: int = 8  # sequences per process per micro-step
    grad_accum: int = 1
    steps: int = 1000
    lr: float = 3e-4
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # warmup-stable-decay: the last 20% of steps decay linearly
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    t_eps: float = 1e-3  # t ~ U(eps, 1), stratified over the blocks of a global batch
    # "random": each block input hidden with probability t (the released recipe); "suffix": the
    # last floor(t * S) inputs, matching left-to-right decoding (the left_prefix commit rule)
    mask_pattern: str = "random"
    complementary_masks: bool = False  # Fast-dLLM v2: each sequence twice, with a mask and its complement
    # start the denoiser from a saved two-tower directory, or a registry name's shipped denoiser
    init_from: str | None = None
    loss_weighting: str = "none"  # "none" (released) or "elbo" (1/t)
    # weight of KL(AR || denoiser) at each block's first unknown target, the slot the denoiser
    # must get right to agree with AR greedy; 0: the released objective alone
    ar_distill: float = 0.0
    bf16: bool | None = None  # autocast; None: on where the hardware supports bf16
    gradient_checkpointing: bool = False
    # torch.compile the training forward: minutes of compiling (again when the block size
    # changes), then faster steps (on this 2-core CPU ~1.2x; the gain is larger where small
    # element-wise kernels dominate, as on a GPU)
    compile: bool = False
    fsdp: bool = False  # under torchrun: shard both towers with FSDP2 instead of replicating (DDP)
    seed: int = 0
    # seconds of training time for a time-boxed machine: after a few calibration steps, `steps`
    # is lowered to what fits (the schedule's decay follows) and saved for an exact resume
    time_budget_s: float | None = None
    log_every: int = 10
    eval_every: int = 200
    save_every: int = 200
    keep_checkpoints: int = 2
    val_batches: int = 4  # validation set size in global batches (the same for any number of processes)
    val_prompts: int = 4  # prompts for the tokens-per-NFE check at validation

    def __post_init__(self) -> None:
        _check_types(self)
        checks = {
            "steps": self.steps >= 1, "batch_size": self.batch_size >= 1, "grad_accum": self.grad_accum >= 1,
            "lr": self.lr > 0, "warmup_steps": self.warmup_steps >= 0, "block_size": self.block_size >= 1,
            "seq_len": self.seq_len >= 1, "lora_rank": self.lora_rank >= 1, "lora_alpha": self.lora_alpha > 0,
            "decay_fraction": 0 <= self.decay_fraction <= 1, "min_lr_ratio": 0 <= self.min_lr_ratio <= 1,
            "t_eps": 0 < self.t_eps < 1, "grad_clip": self.grad_clip >= 0, "weight_decay": self.weight_decay >= 0,
            "loss_weighting": self.loss_weighting in ("none", "elbo"), "flavour": self.flavour in ("lora", "full"),
            "time_budget_s": self.time_budget_s is None or self.time_budget_s > 0,
            "mask_pattern": self.mask_pattern in MASK_PATTERNS, "ar_distill": self.ar_distill >= 0,
            "log_every": self.log_every >= 1, "eval_every": self.eval_every >= 1, "save_every": self.save_every >= 1,
            "keep_checkpoints": self.keep_checkpoints >= 1, "val_batches": self.val_batches >= 1,
            "val_prompts": self.val_prompts >= 1, "seed": self.seed >= 0,
            "data": bool(self.data.strip()), "out_dir": bool(self.out_dir.strip()), "model": bool(self.model.strip()),
        }
        bad = [f"{name}={getattr(self, name)!r}" for name, ok in checks.items() if not ok]
        if bad:
            raise UsageError(f"invalid training settings: {', '.join(bad)}")
        for stage in self.curriculum:
            if not (isinstance(stage, list | tuple) and len(stage) == 2 and all(_is_int(v) and v >= 1 for v in stage)):
                raise UsageError(f"curriculum stages are [block_size, until_step] pairs of positive integers, got {stage!r}")
        until = [u for _, u in self.curriculum]
        if until != sorted(until):
            raise UsageError(f"curriculum stages must end at increasing steps, got {self.curriculum}")
        for size in self.block_sizes:
            if self.seq_len % size:
                raise UsageError(f"seq_len {self.seq_len} is not a multiple of block size {size}")
        if self.complementary_masks and self.batch_size % 2:
            raise UsageError("complementary masks pair sequences: batch_size must be even")
        if self.complementary_masks and self.mask_pattern != "random":
            raise UsageError("complementary masks complement random masks: use --mask-pattern random")

    @classmethod
    def from_dict(cls, values: dict, source: str = "the settings") -> TrainConfig:
        """Settings from a dict (say a ``--config`` file): unknown keys and missing required
        ones are errors that name ``source``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"{source}: unknown training setting(s) {', '.join(unknown)}")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in values]
        if missing:
            raise UsageError(f"{source}: {', '.join(missing)} must be given")
        return cls(**values)

    @property
    def block_sizes(self) -> list[int]:
        return [size for size, _ in self.curriculum] + [self.block_size]

    def block_size_at(self, step: int) -> int:
        for size, until in self.curriculum:
            if step < until:
                return size
        return self.block_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# what each annotation accepts (a JSON config gives ints where floats are meant)
_TYPES = {
    "int": _is_int,
    "float": lambda v: _is_int(v) or isinstance(v, float),
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "list[list[int]]": lambda v: isinstance(v, list),
}


def _check_types(cfg: TrainConfig) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        kinds = [k.strip() for k in str(f.type).split("|")]
        if value is None and "None" in kinds:
            continue
        if not any(_TYPES[k](value) for k in kinds if k != "None"):
            raise UsageError(f"training setting {f.name} must be {' or '.join(kinds)}, got {value!r}")
        if isinstance(value, float) and value != value:  # NaN passes no range check below
            raise UsageError(f"training setting {f.name} must be a number, got NaN")
