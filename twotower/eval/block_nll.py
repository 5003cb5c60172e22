"""Teacher-forced block NLL on held-out text: the diffusion bound vs the AR model's NLL.

For a window of clean tokens split into blocks of S targets, every block's non-first inputs
are hidden with probability t (t = 1: the whole block is masked, the hardest case and the one
decoding starts from) and the denoiser predicts the hidden targets from the clean context of
the earlier blocks, in one vectorised pass (TwoTower.noisy_blocks / training_logits). The AR
model scores the very same target tokens causally, so the two means are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..files import read_text
from ..model.twotower import TwoTower

HELDOUT = Path(__file__).with_name("heldout.txt")


@dataclass
class BlockNLL:
    t: float
    block_size: int
    tokens: int  # targets scored (hidden in their block input)
    diffusion_nll: float  # mean nats per token
    ar_nll: float  # the AR model on the same targets


def heldout_text(path: str | Path = HELDOUT) -> str:
    return read_text(Path(path).expanduser())


def windows(ids: list[int], length: int) -> list[list[int]]:
    """Non-overlapping windows of ``length`` tokens (a shorter tail is dropped unless it is all)."""
    out = [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)]
    return out or [ids]


@torch.inference_mode()
def block_nll(
    model: TwoTower, token_windows: list[list[int]], block_size: int, t: float = 1.0, seed: int = 0
) -> BlockNLL:
    """Mean NLL per hidden target under the denoiser and under the AR context tower."""
    if not 0.0 < t <= 1.0:
        raise UsageError(f"t must be in (0, 1], got {t}")
    if not model.config.token_shift:
        raise UsageError("block NLL needs the token-shift block layout (targets line up with AR predictions)")
    gen = torch.Generator().manual_seed(seed)
    den_sum = ar_sum = 0.0
    count = 0
    for window in token_windows:
        n = (len(window) - 1) // block_size  # targets are shifted one token right of the inputs
        if n < 1:
            raise UsageError(f"a window of {len(window)} tokens holds no block of {block_size} shifted targets")
        ids = torch.tensor([window[: n * block_size + 1]], device=model.context.device)
        masked = torch.rand(1, n, block_size, generator=gen) < t
        block_inputs, targets, unknown, t_blocks = model.noisy_blocks(ids, masked.to(ids.device))
        logits = model.training_logits(ids, block_inputs, t_blocks)
        den_ce = F.cross_entropy(logits.float().flatten(0, 2), targets.flatten(), reduction="none")
        # AR: output at position i predicts token i + 1, so its logits line up with the shifted targets
        ar_logits = model.context_forward(ids)[:, : n * block_size]
        ar_ce = F.cross_entropy(ar_logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        keep = unknown.flatten()
        den_sum += float(den_ce[keep].sum())
        ar_sum += float(ar_ce[keep].sum())
        count += int(keep.sum())
    return BlockNLL(t, block_size, count, den_sum / count, ar_sum / count)
