"""adaLN-single time conditioning (PixArt-alpha), as in the released two-tower model.

t -> sinusoid(256) of t*1000 -> MLP -> t_block = Linear(SiLU(.)) -> (3, H); each sub-layer adds
its own learned (3, H) table to get (shift, scale, gate). Initialised as the identity: the
last Linear of t_block is zero and the tables are (0, 0, 1), so an untrained denoiser computes
exactly what its backbone computes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import exact
from .linear import Linear


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeConditioning(nn.Module):
    def __init__(self, hidden: int, num_layers: int, freq_dim: int = 256, scale: float = 1000.0) -> None:
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale
        # attribute names follow the released checkpoint: t_embedder.mlp.{0,2}, t_block.1
        self.t_embedder = nn.Module()
        # our Linear and SiLU: a row's conditioning does not depend on its batch mates (model/exact.py)
        self.t_embedder.mlp = nn.Sequential(Linear(freq_dim, hidden), exact.SiLU(), Linear(hidden, hidden))
        self.t_block = nn.Sequential(exact.SiLU(), Linear(hidden, 3 * hidden))
        nn.init.zeros_(self.t_block[1].weight)
        nn.init.zeros_(self.t_block[1].bias)
        tables = torch.zeros(num_layers, 3, hidden)
        tables[:, 2] = 1.0  # gate
        self.scale_shift_tables = nn.Parameter(tables)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """(R,) or (R, n) times in [0, 1] -> (R[, n], 3, H) conditioning shared by all sub-layers."""
        shape = t.shape
        emb = timestep_embedding(t.reshape(-1) * self.scale, self.freq_dim).to(self.t_block[1].weight.dtype)
        out = self.t_block(self.t_embedder.mlp(emb))
        return out.view(*shape, 3, -1)

    def layer(self, cond: torch.Tensor, index: int, tokens_per_row: int) -> tuple[torch.Tensor, ...]:
        """(shift, scale, gate) for sub-layer ``index``, each (R, T, H) (a broadcast view: a
        compiled pass must not see a size-1 axis against T, model/compiled.py).
        ``cond`` is (R, 3, H) (one t per row) or (R, n, 3, H) (one t per block of a row)."""
        mod = cond + self.scale_shift_tables[index].to(cond.dtype)
        if mod.dim() == 3:
            mod = mod[:, None].expand(-1, tokens_per_row, -1, -1)  # (R, T, 3, H)
        else:  # (R, n, 3, H): repeat each block's values over its tokens
            mod = mod.repeat_interleave(tokens_per_row // mod.shape[1], dim=1)
        return mod.unbind(dim=2)
